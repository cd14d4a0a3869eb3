"""Checks a recipe runs at start-up, before any work: device, dtype, CUDA-only options,
the output directory, and the tokenizer against the model."""

import errno
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import training, utils

__all__ = [
    "check_cuda_only_options",
    "check_device",
    "check_output_dir",
    "check_tokenizer_fits",
    "resolve_dtype",
    "text_vocab_size",
    "tokenizer_vocab_size",
]

log = utils.get_logger("INFO")

# errno values that mean "this directory cannot be written", not a missing parent
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)

# why a dtype is refused, where it is
_DTYPE_REASONS = {
    "fp16": " (training entirely in fp16 overflows: AdamW's updates in fp16 turned the "
    "tiny_qalora loss into NaN at its second step; bf16 has fp32's range)",
    "fp64": " (the int4 kernels compute in fp32, bf16 or fp16)",
}


def check_device(device: str) -> None:
    """Refuse ``device=cuda...`` on a machine without CUDA.

    Raises:
        ValueError: naming ``device``.
    """
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device={device} but CUDA is not available; set device=cpu "
            "(with dtype=fp32 or bf16)"
        )


def resolve_dtype(
    dtype: Optional[str], device: torch.device, allowed: Iterable[str] = ("fp32", "bf16", "fp16")
) -> torch.dtype:
    """torchtune's ``training.get_dtype`` with one-line errors naming ``dtype``.

    Args:
        dtype (str, optional): the ``dtype`` setting (``None``: fp32).
        device (torch.device): where the model runs.
        allowed (Iterable[str]): the values this recipe accepts.

    Raises:
        ValueError: for a value not in ``allowed``, or bf16 on a CUDA device without it.
    """
    allowed = tuple(allowed)
    if dtype is not None and dtype not in allowed:
        reason = _DTYPE_REASONS.get(dtype, "")
        raise ValueError(
            f"dtype={dtype} is not supported here{reason}; set dtype to one of {', '.join(allowed)}"
        )
    try:
        return training.get_dtype(dtype, device=device)
    except RuntimeError as error:  # bf16 asked for on a GPU that lacks it
        raise ValueError(f"dtype={dtype}: {error}; set dtype=fp32") from None


def check_cuda_only_options(cfg: Union[DictConfig, Mapping[str, Any]], device: torch.device) -> None:
    """Refuse options that need CUDA when running elsewhere.

    ``enable_activation_offloading`` (CUDA streams and pinned memory) is an error off
    CUDA. (``log_peak_memory_stats`` works everywhere: off CUDA it logs the process's
    resident memory, now and at its peak.)

    Raises:
        ValueError: naming the option to turn off.
    """
    if device.type == "cuda":
        return
    if cfg.get("enable_activation_offloading", False):
        raise ValueError(
            f"enable_activation_offloading=True needs a CUDA device (device={device.type}); "
            "set enable_activation_offloading=False"
        )


def check_output_dir(output_dir: Union[str, Path], setting: str = "output_dir") -> Path:
    """Create ``output_dir`` and prove it writable with a probe file, before any work.

    Args:
        output_dir (str or Path): the directory.
        setting (str): the config key that sets it, for the messages.

    Returns:
        Path: the directory, ``~`` expanded.

    Raises:
        PermissionError: if it cannot be created or written.
        ValueError: if it is not a directory (e.g. a file, or under one).
    """
    path = Path(output_dir).expanduser()
    probe = path / f".qalora-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        message = (
            f"{setting}={path} is not writable ({error.strerror or error}); set {setting} "
            "to a directory you can write"
        )
        if error.errno in _NOT_WRITABLE:
            raise PermissionError(message) from None
        raise ValueError(message) from None
    return path


def tokenizer_vocab_size(tokenizer: Any) -> Optional[int]:
    """The number of token ids ``tokenizer`` can produce, as best it says.

    The largest of its ``vocab_size``, its highest special token id + 1 and its highest
    encoder id + 1 (Qwen2's tokenizer has no ``vocab_size``); None when it tells none.
    """
    sizes = []
    vocab_size = getattr(tokenizer, "vocab_size", None)
    if isinstance(vocab_size, int):
        sizes.append(vocab_size)
    for attribute in ("special_tokens", "encoder"):
        ids = getattr(tokenizer, attribute, None)
        if isinstance(ids, Mapping) and ids:
            values = [v for v in ids.values() if isinstance(v, int)]
            if values:
                sizes.append(max(values) + 1)
    return max(sizes) if sizes else None


# special tokens only multimodal inputs produce (torchtune's Llama 3 tokenizer has
# "<|image|>" at id 128256, one past the text models' 128256-row table)
_MEDIA_TOKEN_WORDS = ("image", "video", "audio", "vision")


def text_vocab_size(tokenizer: Any) -> Optional[int]:
    """:func:`tokenizer_vocab_size` without the multimodal placeholder tokens at the top of
    the id range, which text never produces (None when the tokenizer tells none)."""
    size = tokenizer_vocab_size(tokenizer)
    specials = getattr(tokenizer, "special_tokens", None)
    if size is None or not isinstance(specials, Mapping):
        return size
    media = {
        i for name, i in specials.items()
        if isinstance(i, int) and any(word in str(name).lower() for word in _MEDIA_TOKEN_WORDS)
    }
    while size - 1 in media:
        size -= 1
    return size


def check_tokenizer_fits(tokenizer: Any, model: nn.Module, setting: str = "tokenizer.path") -> None:
    """Refuse a tokenizer that produces ids the model's embedding table does not have.

    Multimodal placeholder tokens at the top of the id range (``<|image|>`` of torchtune's
    Llama 3 tokenizer, one past Llama 3's table) are not counted: text never produces them.

    Args:
        tokenizer: the built tokenizer.
        model (nn.Module): a torchtune decoder (``tok_embeddings``).
        setting (str): the config key that chose the tokenizer, for the message.

    Raises:
        ValueError: naming ``setting`` and both sizes.
    """
    embeddings = getattr(model, "tok_embeddings", None)
    rows = getattr(embeddings, "num_embeddings", None)
    size = text_vocab_size(tokenizer)
    if rows is None or size is None or size <= rows:
        return
    raise ValueError(
        f"the tokenizer ({setting}) has {size} token ids but the model's embedding table "
        f"has {rows} rows; set {setting} to the tokenizer of the base model in "
        "checkpointer.checkpoint_dir (or check model._component_)"
    )
