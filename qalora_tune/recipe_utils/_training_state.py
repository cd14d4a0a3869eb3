"""What an exact resume needs beyond the adapter: RNG streams, data order, and the checks
that a saved state fits the run that loads it."""

import contextlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from qalora_tune.errors import UserError, UserValueError
from qalora_tune.recipe_utils._distributed import gather_objects

__all__ = [
    "apply_recipe_state",
    "capture_rng",
    "check_data_order",
    "check_saved_adapter",
    "recipe_state",
    "restore_rng",
    "unreadable_state",
]


def capture_rng(device: torch.device) -> Dict[str, Any]:
    """This process's RNG states (CPU, and CUDA when ``device`` is a GPU)."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng(rng_per_rank: List[Dict[str, Any]], rank: int, device: torch.device) -> None:
    """Restore rank ``rank``'s saved RNG states; a rank the checkpoint did not have keeps
    its fresh ``seed + rank`` stream."""
    if rank >= len(rng_per_rank):
        return
    torch.set_rng_state(rng_per_rank[rank]["cpu"])
    if device.type == "cuda" and rng_per_rank[rank]["cuda"] is not None:
        torch.cuda.set_rng_state(rng_per_rank[rank]["cuda"], device)


def check_saved_adapter(
    saved: Mapping[str, torch.Tensor], params: Mapping[str, torch.nn.Parameter], path: Path
) -> None:
    """Refuse saved adapter weights that the run's parameters cannot take: missing, of
    another shape, or not finite.

    Raises:
        UserValueError: naming the checkpoint, the weight and what to do.
    """
    missing = set(params) - set(saved)
    if missing:
        raise UserValueError(
            f"the checkpoint in {path} lacks adapter weights {sorted(missing)[:3]}; resume with "
            "the config it was trained with"
        )
    for name, param in params.items():
        stored = saved[name]
        if tuple(stored.shape) != tuple(param.shape):
            problem = f"shape {tuple(stored.shape)} where the model has {tuple(param.shape)}"
        elif not bool(torch.isfinite(stored).all()):
            problem = "NaN or infinite values"
        else:
            continue
        raise UserValueError(
            f"the checkpoint in {path} has {name} with {problem}; resume with the config it was "
            "trained with, or delete it to resume from the one before"
        )


def check_data_order(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """A mid-epoch checkpoint continues its epoch's data order: the settings that fix it
    (world size, batch size, accumulation, shuffle, seed) must be the ones it was saved with.

    Raises:
        UserValueError: naming the setting and the value to resume with.
    """
    for key, value in saved.items():
        if current.get(key) != value:
            setting = f"--nproc_per_node {value}" if key == "world_size" else f"{key}={value}"
            raise UserValueError(
                f"{path} was saved in the middle of an epoch with {key}={value}, and this run "
                f"has {key}={current.get(key)}; resume with {setting} to continue its data order "
                "exactly"
            )


@contextlib.contextmanager
def unreadable_state(state_file: Path) -> Iterator[None]:
    """Turn a saved state that lacks what the run needs (a missing key, a wrong type) into
    one line naming the file; user errors pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except (KeyError, TypeError, IndexError, ValueError, RuntimeError) as error:
        raise UserValueError(
            f"{state_file} does not hold the recipe state this run needs "
            f"({type(error).__name__}: {' '.join(str(error).split())[:160]}); delete "
            f"{state_file.parent} to resume from the checkpoint before it, or set "
            "resume_from_checkpoint=False"
        ) from None


def recipe_state(
    progress: Dict[str, int],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Optional[Any],
    run: Dict[str, Any],
    data_order: Dict[str, Any],
    dataloader: Any,
    device: torch.device,
) -> Dict[str, Any]:
    """Everything an exact resume needs beyond the adapter, gathered from every rank (call
    it on all ranks): progress, optimizer and scheduler states, the run's fixed settings
    (``run``: seed, total epochs, steps per epoch), the data order, and each rank's data
    loader position and RNG streams."""
    return {
        "progress": progress,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "epochs_run": progress["epochs_run"],
        "global_step": progress["global_step"],
        **run,
        "data_order": data_order,
        "dataloader_per_rank": gather_objects(dataloader.state_dict()),
        "rng_per_rank": gather_objects(capture_rng(device)),
    }


def apply_recipe_state(
    state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Optional[Any],
    rank: int,
    device: torch.device,
) -> Tuple[Dict[str, int], Optional[Dict[str, Any]]]:
    """Load a :func:`recipe_state` into the optimizer, scheduler and RNG of rank ``rank``.

    Returns:
        Tuple[Dict[str, int], Optional[Dict[str, Any]]]: the saved progress, and this
        rank's data loader state when the state was saved in the middle of an epoch.
    """
    optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None and state["lr_scheduler"] is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    restore_rng(state["rng_per_rank"], rank, device)
    progress = dict(state["progress"], epochs_run=state["epochs_run"], global_step=state["global_step"])
    mid_epoch = progress["steps_done_in_epoch"] > 0
    return progress, state["dataloader_per_rank"][rank] if mid_epoch else None
