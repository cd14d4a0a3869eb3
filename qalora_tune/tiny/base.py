"""The embedded tiny base: its sizes, and making it on a fresh machine (no downloads).

:func:`prepare_tiny_base` pretrains a small llama2-architecture decoder on the generated
glossary task (see :mod:`qalora_tune.tiny.task`) and writes it, atomically, as a Hugging
Face ``LlamaForCausalLM`` checkpoint with the tiny tokenizer and the base's measured
validation metrics in full precision and as an int4 (RTN, group size 32) base.
"""

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torchtune.models.llama2 import llama2

from qalora_tune.checkpointing import (
    atomic_directory,
    find_checkpoint_files,
    load_hf_weights,
    read_hf_config,
)
from qalora_tune.errors import UserValueError
from qalora_tune.tiny.dataset import TinyTaskDataset
from qalora_tune.tiny.hf_checkpoint import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    save_hf_checkpoint,
)
from qalora_tune.tiny.metrics import answer_metrics, to_qalora_
from qalora_tune.tiny.model import TINY_LLAMA_SIZES, build_tiny_base, tiny_llama_sizes
from qalora_tune.tiny.pretrain import pretrain
from qalora_tune.tiny.tokenizer import TOKENIZER_FILENAME, TinyTokenizer

__all__ = [
    "COMPLETE_MARKER",
    "METRICS_FILENAME",
    "is_complete_tiny_base",
    "load_tiny_base",
    "prepare_tiny_base",
]

METRICS_FILENAME = "base_metrics.json"
COMPLETE_MARKER = "TINY_BASE_COMPLETE"
"""Empty file written last: a directory without it is not a finished base."""

_REQUIRED_FILES = (CONFIG_FILENAME, WEIGHTS_FILENAME, TOKENIZER_FILENAME, METRICS_FILENAME)

DEFAULT_STEPS = 700
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 5e-3
# no wall-clock budget by default: a budget makes the base depend on how busy the machine
# is (on a loaded CI machine it stopped early and the base reached 30% accuracy)
DEFAULT_MAX_SECONDS = None
DEFAULT_NUM_VALIDATION = 1000


def is_complete_tiny_base(checkpoint_dir: str) -> bool:
    """Whether ``checkpoint_dir`` holds a finished base (marker and every file present)."""
    return os.path.isfile(os.path.join(checkpoint_dir, COMPLETE_MARKER)) and all(
        os.path.isfile(os.path.join(checkpoint_dir, name)) for name in _REQUIRED_FILES
    )


def prepare_tiny_base(
    checkpoint_dir: str,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    max_seconds: Optional[float] = DEFAULT_MAX_SECONDS,
    num_validation: int = DEFAULT_NUM_VALIDATION,
    log: Optional[Callable[[str], None]] = print,
    embed_dim: int = 128,
) -> str:
    """Make the tiny base in ``checkpoint_dir`` unless a finished one is already there.

    The directory is built under a temporary sibling name and renamed into place only
    once complete (:data:`COMPLETE_MARKER` written last), so an interrupted run never
    leaves a complete-looking base. It holds ``config.json`` (``LlamaForCausalLM``),
    ``model.safetensors`` (fp32, Hugging Face key names), ``tiny_tokenizer.json`` and
    ``base_metrics.json``: validation answer-token loss (nats) and accuracy of the fp32
    base and of its int4 RTN group-32 quantization (every linear, output projection
    included), plus the generation parameters and timings.

    Args:
        checkpoint_dir (str): where the base lives; must be absent, empty, or a finished
            base.
        seed (int): seed of the initialisation and of the training examples.
        steps (int): pretraining steps.
        batch_size (int): pretraining batch size.
        lr (float): peak AdamW learning rate.
        max_seconds (float, optional): stop pretraining early after this long; the base
            then depends on the machine's speed. Default: no limit, all ``steps`` run.
        num_validation (int): validation examples for ``base_metrics.json``.
        log (Callable[[str], None], optional): progress sink; None for quiet.
        embed_dim (int): the base's width (:func:`tiny_llama_sizes`); 128, the embedded
            default's, unless a wider base is wanted.

    Returns:
        str: ``checkpoint_dir``.

    Raises:
        ValueError: if ``checkpoint_dir`` is a non-empty directory that is not a finished
            tiny base, holds a base of another width, or an argument is out of range.
    """
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    sizes = tiny_llama_sizes(embed_dim)
    if is_complete_tiny_base(checkpoint_dir):
        found = _stored_sizes(checkpoint_dir)
        if found != sizes:
            raise UserValueError(
                f"{checkpoint_dir!r} holds a tiny base of width {found.get('embed_dim')}, not "
                f"{embed_dim}; choose another checkpoint_dir for a base of width {embed_dim}"
            )
        if log is not None:
            log(f"[tiny base] reusing {checkpoint_dir}")
        return checkpoint_dir
    if os.path.exists(checkpoint_dir) and (
        not os.path.isdir(checkpoint_dir) or os.listdir(checkpoint_dir)
    ):
        raise UserValueError(
            f"{checkpoint_dir!r} exists but is not a finished tiny base (no "
            f"{COMPLETE_MARKER}); remove it or choose another checkpoint_dir"
        )
    if num_validation <= 0:
        raise UserValueError(f"num_validation must be positive, got {num_validation}")

    start = time.perf_counter()
    if log is not None:
        log(f"[tiny base] no base in {checkpoint_dir}: generating data and pretraining")
    tokenizer = TinyTokenizer()
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = build_tiny_base(embed_dim)
        train_info = pretrain(
            model, tokenizer, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            max_seconds=max_seconds, log=log,
        )
    pretrain_seconds = time.perf_counter() - start

    validation = TinyTaskDataset(tokenizer, "validation", num_examples=num_validation, seed=seed)
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fp32 = answer_metrics(model, validation)
    int4 = answer_metrics(to_qalora_(model, group_size=32), validation)
    metrics = {
        "task": "glossary translation (qalora_tune.tiny.task)",
        "metric": "validation answer tokens: mean cross-entropy (nats) and argmax accuracy",
        "fp32": fp32,
        "int4_rtn_g32": int4,
        "generation": {
            "seed": seed,
            "steps": train_info["steps"],
            "requested_steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "num_validation": num_validation,
            "final_train_loss": train_info["train_loss"],
            "pretrain_seconds": round(pretrain_seconds, 2),
            "seconds": round(time.perf_counter() - start, 2),
        },
        "sizes": sizes,
    }
    _write_atomically(checkpoint_dir, state_dict, tokenizer, metrics)
    if log is not None:
        log(
            f"[tiny base] fp32 acc {fp32['accuracy']:.4f} loss {fp32['loss']:.4f} | int4 g32 "
            f"acc {int4['accuracy']:.4f} loss {int4['loss']:.4f} | "
            f"{time.perf_counter() - start:.1f}s -> {checkpoint_dir}"
        )
    return checkpoint_dir


def _write_atomically(
    checkpoint_dir: str,
    state_dict: Dict[str, torch.Tensor],
    tokenizer: TinyTokenizer,
    metrics: Dict[str, Any],
) -> None:
    # the checkpointer's atomic_directory: built under a temporary name, renamed when done
    # (an empty placeholder directory is replaced; a foreign one was refused earlier)
    with atomic_directory(checkpoint_dir) as staging:
        save_hf_checkpoint(state_dict, metrics["sizes"], str(staging))
        tokenizer.save(str(staging / TOKENIZER_FILENAME))
        (staging / METRICS_FILENAME).write_text(json.dumps(metrics, indent=2))
        (staging / COMPLETE_MARKER).touch()


def _stored_sizes(checkpoint_dir: str) -> Dict[str, Any]:
    """The sizes a finished base records (bases written before other widths: the default)."""
    metrics = json.loads((Path(checkpoint_dir) / METRICS_FILENAME).read_text())
    return metrics.get("sizes", TINY_LLAMA_SIZES)


def load_tiny_base(checkpoint_dir: str) -> torch.nn.Module:
    """The fp32 torchtune decoder stored in a finished tiny base directory (of any width).

    Raises:
        ValueError: if ``checkpoint_dir`` is not a finished tiny base.
    """
    if not is_complete_tiny_base(checkpoint_dir):
        raise UserValueError(f"{checkpoint_dir!r} is not a finished tiny base")
    model = llama2(**_stored_sizes(checkpoint_dir))
    directory = Path(checkpoint_dir)
    load_hf_weights(
        model, find_checkpoint_files(directory, None), "LLAMA2", read_hf_config(directory)
    )
    return model.eval()
