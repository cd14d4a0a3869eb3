"""Checks a recipe runs at start-up, before any work: device, dtype, CUDA-only options,
the output directory, and the tokenizer against the model."""

import errno
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping, Optional, Union

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import training, utils

from qalora_tune.errors import UserError, UserPermissionError, UserValueError
from qalora_tune.recipe_utils._settings import join_problems

__all__ = [
    "Problems",
    "check_cuda_only_options",
    "component_file_problems",
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


def check_device(device: Any) -> None:
    """Refuse a device that is not ``cpu``, ``cuda`` or ``cuda:N``, and CUDA on a machine
    without it (or without GPU ``N``).

    Raises:
        UserValueError: naming ``device`` and what to set.
    """
    kind, _, index = str(device).partition(":") if isinstance(device, str) else ("", "", "")
    if not ((kind == "cpu" and not index) or (kind == "cuda" and (not index or index.isdigit()))):
        raise UserValueError(
            f"device={device!r} is not a device these recipes run on; set device=cpu, "
            "device=cuda or device=cuda:N"
        )
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserValueError(
            f"device={device} but CUDA is not available; set device=cpu "
            "(with dtype=fp32 or bf16)"
        )
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UserValueError(
            f"device={device} but this machine has {torch.cuda.device_count()} GPU(s); set "
            f"device=cuda:0 ... cuda:{torch.cuda.device_count() - 1}"
        )


class Problems:
    """Collects the problems a preflight finds, to report them all in one error.

    ``problems.check(function, *args)`` runs a check and records its
    :class:`~qalora_tune.errors.UserError` instead of raising; :meth:`raise_if_any`
    raises one :class:`~qalora_tune.errors.UserValueError` listing them all.
    """

    def __init__(self) -> None:
        self.messages: List[str] = []

    def add(self, message: Optional[str]) -> None:
        if message:
            self.messages.append(" ".join(str(message).split()))

    def extend(self, messages: Iterable[str]) -> None:
        for message in messages:
            self.add(message)

    def check(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)``, or None after recording its user error."""
        try:
            return function(*args, **kwargs)
        except UserError as error:
            self.add(str(error))
            return None

    def raise_if_any(self) -> None:
        if self.messages:
            raise UserValueError(join_problems(self.messages))


def component_file_problems(section: Any, setting: str) -> List[str]:
    """Local files a config section names (``path``, ``data_files``) that do not exist.

    Hub dataset names and URLs are not checked (they are not local files).
    """
    if not isinstance(section, Mapping):
        return []
    problems = []
    for key in ("path", "data_files"):
        value = section.get(key)
        values = value if isinstance(value, (list, tuple)) or _is_list(value) else [value]
        for item in values:
            if not isinstance(item, str) or not item or "://" in item:
                continue
            if key == "data_files" and not item.startswith(("/", ".", "~")) and "/" not in item:
                continue
            path = Path(item).expanduser()
            if not path.exists():
                problems.append(f"{setting}.{key}={item} not found; set {setting}.{key} to an existing file")
            elif path.is_dir() and key == "path" and section.get("_component_") != "qalora_tune.tiny.prepare_tiny_base":
                problems.append(f"{setting}.{key}={item} is a directory; set {setting}.{key} to a file")
    return problems


def _is_list(value: Any) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.is_list(value)


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
        raise UserValueError(
            f"dtype={dtype} is not supported here{reason}; set dtype to one of {', '.join(allowed)}"
        )
    try:
        return training.get_dtype(dtype, device=device)
    except RuntimeError as error:  # bf16 asked for on a GPU that lacks it
        raise UserValueError(f"dtype={dtype}: {error}; set dtype=fp32") from None


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
        raise UserValueError(
            f"enable_activation_offloading=True needs a CUDA device (device={device.type}); "
            "set enable_activation_offloading=False"
        )


def check_output_dir(output_dir: Union[str, Path], setting: str = "output_dir") -> Path:
    """Prove that ``output_dir`` can be written, before any work, without creating it.

    An existing directory gets a probe file (written and removed at once); a missing one
    is checked through its nearest existing parent, which must be a writable directory.
    Nothing is left behind: a run refused later has not created any directory.

    Args:
        output_dir (str or Path): the directory.
        setting (str): the config key that sets it, for the messages.

    Returns:
        Path: the directory, ``~`` expanded.

    Raises:
        UserPermissionError: if it (or the parent it would be created in) is not writable.
        UserValueError: if it, or a parent, is a file.
    """
    path = Path(output_dir).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = existing / f".qalora-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        where = "" if existing == path else f" (in {existing})"
        message = (
            f"{setting}={path} is not writable{where} ({error.strerror or error}); set "
            f"{setting} to a directory you can write"
        )
        if error.errno in _NOT_WRITABLE:
            raise UserPermissionError(message) from None
        raise UserValueError(message) from None
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
    raise UserValueError(
        f"the tokenizer ({setting}) has {size} token ids but the model's embedding table "
        f"has {rows} rows; set {setting} to the tokenizer of the base model in "
        "checkpointer.checkpoint_dir (or check model._component_)"
    )
