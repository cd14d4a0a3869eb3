"""The base checkpoint formats torchtune reads: Hugging Face, Meta, and torchtune's own.

Each format fixes where the weights are found by default, which config file it carries and
how its keys map to torchtune's. The tensors themselves are streamed one at a time by
:func:`~qalora_tune.checkpointing._streaming.load_tensor_stream` in every format.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from qalora_tune._compat import meta_to_tune
from qalora_tune._files import read_json
from qalora_tune.checkpointing._hf_weights import load_hf_weights, read_hf_config
from qalora_tune.checkpointing._streaming import (
    TIED_KEYS,
    iter_checkpoint_tensors,
    load_tensor_stream,
)
from qalora_tune.errors import UserFileNotFoundError, UserValueError

__all__ = [
    "CHECKPOINT_FORMATS",
    "check_checkpoint_format",
    "find_checkpoint_files",
    "load_checkpoint_weights",
    "read_checkpoint_config",
]

CHECKPOINT_FORMATS = ("hf", "meta", "torchtune")

# weight files found when checkpoint_files is not given: the first pattern with a match
_DEFAULT_PATTERNS = {
    "hf": ("*.safetensors", "*.bin"),
    "meta": ("*.pth",),
    "torchtune": ("*.pt", "*.bin", "*.safetensors"),
}
# the optional config file of the formats other than hf (which requires config.json)
_CONFIG_NAMES = {"meta": "params.json", "torchtune": "config.json"}


def check_checkpoint_format(checkpoint_format: str) -> None:
    """Raise a ValueError naming the allowed values if ``checkpoint_format`` is unknown."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise UserValueError(
            f"checkpointer.checkpoint_format={checkpoint_format!r} is not supported; "
            f"use one of {CHECKPOINT_FORMATS}"
        )


def find_checkpoint_files(
    checkpoint_dir: Path, checkpoint_files: Optional[List[str]], checkpoint_format: str = "hf"
) -> List[Path]:
    """The weight files to read: the given ones, or the directory's files of the format.

    By default: every ``*.safetensors`` (else ``*.bin``) file for ``hf``, every ``*.pth``
    file for ``meta``, and every ``*.pt`` (else ``*.bin``, else ``*.safetensors``) file for
    ``torchtune``; adapter files and ``recipe_state.pt`` are never weights.

    Args:
        checkpoint_dir (Path): directory of the base checkpoint.
        checkpoint_files (List[str], optional): file names in ``checkpoint_dir``.
        checkpoint_format (str): ``"hf"``, ``"meta"`` or ``"torchtune"``.

    Returns:
        List[Path]: the weight files, sorted.

    Raises:
        FileNotFoundError: if a named file is missing or the directory has no weights.
        ValueError: if ``checkpoint_format`` is unknown, if the directory holds another
            format's weights instead, or if a Meta checkpoint is split into shards.
    """
    check_checkpoint_format(checkpoint_format)
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_files:
        paths = [checkpoint_dir / name for name in checkpoint_files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserFileNotFoundError(f"checkpoint files not found: {', '.join(missing)}")
    else:
        paths = _default_files(checkpoint_dir, checkpoint_format)
    if checkpoint_format == "meta" and len(paths) > 1:
        raise UserValueError(
            f"checkpoint_format='meta' reads one consolidated file, got {[p.name for p in paths]}: "
            "model-parallel shards hold slices of the same tensors; use the Hugging Face "
            "checkpoint (checkpoint_format='hf') or name one file in checkpointer.checkpoint_files"
        )
    return paths


def _default_files(checkpoint_dir: Path, checkpoint_format: str) -> List[Path]:
    patterns = _DEFAULT_PATTERNS[checkpoint_format]
    for pattern in patterns:
        paths = sorted(p for p in checkpoint_dir.glob(pattern) if _is_weight_file(p))
        if paths:
            return paths
    _raise_if_another_format(checkpoint_dir, checkpoint_format)
    raise UserFileNotFoundError(f"no {' or '.join(patterns)} weights in {checkpoint_dir}")


def _is_weight_file(path: Path) -> bool:
    return "adapter" not in path.name and not path.name.startswith("recipe_state")


def _raise_if_another_format(checkpoint_dir: Path, checkpoint_format: str) -> None:
    """When the directory has no weights of the format, name the format it does hold."""

    def has(directory: Path, *patterns: str) -> bool:
        return any(_is_weight_file(p) for pattern in patterns for p in directory.glob(pattern))

    if checkpoint_format == "meta" and has(checkpoint_dir / "original", "*.pth"):
        raise UserValueError(
            f"no *.pth weights in {checkpoint_dir}, but {checkpoint_dir / 'original'} has Meta "
            f"weights: set checkpointer.checkpoint_dir={str(checkpoint_dir / 'original')!r}"
        )
    signatures = {  # files that only that format's checkpoints have
        "meta": has(checkpoint_dir, "*.pth"),
        "torchtune": has(checkpoint_dir, "*.pt"),
        "hf": (checkpoint_dir / "config.json").is_file()
        and has(checkpoint_dir, "*.safetensors", "*.bin"),
    }
    found = next((f for f, seen in signatures.items() if seen and f != checkpoint_format), None)
    if found is None:
        return
    raise UserValueError(
        f"{checkpoint_dir} holds no {' or '.join(_DEFAULT_PATTERNS[checkpoint_format])} "
        f"weights for checkpoint_format={checkpoint_format!r} but looks like a {found!r} "
        f"checkpoint: set checkpointer.checkpoint_format={found!r}"
    )


def read_checkpoint_config(checkpoint_dir: Path, checkpoint_format: str) -> Dict[str, Any]:
    """The checkpoint's config: ``config.json`` (required for ``hf``, optional for
    ``torchtune``) or Meta's ``params.json`` (optional); ``{}`` when an optional one is absent.

    Raises:
        FileNotFoundError: if an ``hf`` checkpoint has no ``config.json``.
        ValueError: if ``checkpoint_format`` is unknown.
    """
    check_checkpoint_format(checkpoint_format)
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_format == "hf":
        return read_hf_config(checkpoint_dir)
    path = checkpoint_dir / _CONFIG_NAMES[checkpoint_format]
    return read_json(path, "the checkpoint's config", "use the file that came with the weights") if path.is_file() else {}


def load_checkpoint_weights(
    model: nn.Module,
    paths: List[Path],
    checkpoint_format: str,
    model_type: str,
    config: Dict[str, Any],
) -> None:
    """Stream a checkpoint of any format into ``model``, one tensor at a time.

    ``hf`` keys go through torchtune's converter for ``model_type`` (sizes from
    ``config``); ``meta`` keys through torchtune's ``meta_to_tune``; ``torchtune`` keys are
    loaded as they are. For ``meta`` and ``torchtune`` the model's own structure says
    whether the embeddings are tied (it has no separate ``output.weight``), and then a
    checkpoint holding either copy loads.

    Args:
        model (nn.Module): a torchtune (or QA-LoRA) model built by a model builder.
        paths (List[Path]): the weight files (see :func:`find_checkpoint_files`).
        checkpoint_format (str): ``"hf"``, ``"meta"`` or ``"torchtune"``.
        model_type (str): torchtune model type; used by ``hf`` only.
        config (Dict[str, Any]): the checkpoint's config; used by ``hf`` only.

    Raises:
        ValueError: for an unknown format or model type, or a checkpoint that lacks
            weights the model needs, holds weights it does not have, or has a wrong shape.
    """
    check_checkpoint_format(checkpoint_format)
    if checkpoint_format == "hf":
        load_hf_weights(model, paths, model_type, config)
        return
    keys = model.state_dict().keys()
    load_tensor_stream(
        model,
        iter_checkpoint_tensors(paths),
        meta_to_tune if checkpoint_format == "meta" else _unchanged,
        tied=TIED_KEYS[0] in keys and TIED_KEYS[1] not in keys,
        checkpoint_format=checkpoint_format,
        total_bytes=sum(p.stat().st_size for p in paths),
    )


def _unchanged(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    return state_dict
