"""Stream checkpoint tensors into a torchtune model one at a time, whatever the key layout."""

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from qalora_tune._memory import FreeMemoryReleaser, release_free_memory
from qalora_tune._progress import progress_bar
from qalora_tune.checkpointing._safetensors_io import SafetensorsReader
from qalora_tune.errors import UserValueError
from qalora_tune.modules import QuantizedLinear
from qalora_tune.quantization import is_quantized_base

__all__ = ["TIED_KEYS", "guess_key_format", "iter_checkpoint_tensors", "load_tensor_stream"]

# torchtune's keys of the two copies of a tied embedding
TIED_KEYS = ("tok_embeddings.weight", "output.weight")

# Hugging Face attention weights whose rows torchtune's converter regroups by head
_PERMUTED_KEY = re.compile(r"\.self_attn\.(q_proj|k_proj)\.weight$")

# a checkpoint key that only one layout uses, per checkpoint_format value
_LAYOUT_KEYS = (
    ("hf", re.compile(r"^(model\.|lm_head\.)")),
    ("meta", re.compile(
        r"^(layers\.\d+\.(attention|feed_forward|attention_norm|ffn_norm)\.)|^norm\.weight$"
    )),
    ("torchtune", re.compile(r"^(layers\.\d+\.(attn|mlp|sa_norm|mlp_norm)\.)|^norm\.scale$")),
)


def iter_checkpoint_tensors(paths: List[Path]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` from safetensors or PyTorch pickles, one at a time.

    A safetensors tensor is read with ``pread`` into its own memory (no memory map, so a
    tensor the caller has dropped is gone from the process), the next one already being
    read by a background thread while the caller works on the current one (quantizing it,
    say): reading and quantizing overlap, at the cost of one tensor more in memory.
    PyTorch files (``.bin``, ``.pt``, ``.pth``) are memory-mapped
    (``torch.load(..., mmap=True, weights_only=True)``) and each tensor is dropped from the
    loaded dict as it is yielded. A top-level ``{"model": state_dict}`` wrapper, as
    torchtune's recipes write, is unwrapped.

    Raises:
        ValueError: if a file is truncated or corrupt (naming it), or a PyTorch file does
            not hold a state dict.
    """
    for path in paths:
        if path.suffix == ".safetensors":
            for key, tensor in _iter_safetensors_ahead(path):
                yield key, _checked(tensor, key, path)
        else:
            state = _read(
                path, lambda: torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            )
            if not isinstance(state, dict):
                raise UserValueError(
                    f"{path} holds a {type(state).__name__}, not a state dict; save the "
                    "weights with torch.save(model.state_dict(), path)"
                )
            if isinstance(state.get("model"), dict):
                state = state.pop("model")
            for key in list(state):
                yield key, _checked(state.pop(key), key, path)


def _iter_safetensors_ahead(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """One safetensors file's tensors in file order, each read while the previous one is
    in the caller's hands."""
    reader = _read(path, lambda: SafetensorsReader(path))
    with reader, ThreadPoolExecutor(max_workers=1, thread_name_prefix="qalora-read") as pool:
        keys = reader.keys()
        ahead = pool.submit(reader.get_tensor, keys[0]) if keys else None
        for index, key in enumerate(keys):
            tensor = _read(path, ahead.result)
            ahead = pool.submit(reader.get_tensor, keys[index + 1]) if index + 1 < len(keys) else None
            yield key, tensor
            del tensor


def _read(path: Path, read: Callable[[], Any]) -> Any:
    """``read()``, with a failure to parse ``path`` turned into a one-line ``ValueError``.

    safetensors raises its own ``SafetensorError`` (e.g. "incomplete metadata, file not
    fully covered" for a truncated file), ``torch.load`` an ``OSError``, ``RuntimeError``
    or unpickling error; a missing or unreadable file keeps its own error.
    """
    try:
        return read()
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserValueError(
            f"{path} cannot be read ({reason}): the file is truncated or corrupt; download "
            "it again into checkpointer.checkpoint_dir"
        ) from None


# elements per finiteness check where aminmax cannot run (float8, say), and per count of
# the bad values: isfinite holds an abs() copy and three boolean masks of its input, 2.5 x
# a bf16 tensor's bytes (2.7 GB for a 152064 x 3584 vocabulary table); a chunk at a time,
# in float32 (which every float dtype converts to), about 40 MB
_CHECK_CHUNK = 1 << 22


def _non_finite_per_chunk(tensor: torch.Tensor) -> Iterator[int]:
    for chunk in tensor.reshape(-1).split(_CHECK_CHUNK):
        yield int((~torch.isfinite(chunk.float())).sum())


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, without a temporary the size of ``tensor``.

    One ``aminmax`` pass (NaN propagates to both ends, an infinity is an end): no
    temporaries and several times faster than ``isfinite`` (which held 2.7 GB for
    Qwen2.5-7B's vocabulary tables and set its load peak).
    """
    if tensor.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):  # a dtype without aminmax
        return not any(_non_finite_per_chunk(tensor))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _checked(tensor: Any, key: str, path: Path) -> Any:
    """``tensor``, after refusing NaN or infinite values in a floating-point one: a damaged
    base would quantize to NaN scales and surface much later as a NaN loss."""
    if (
        isinstance(tensor, torch.Tensor)
        and type(tensor) is torch.Tensor
        and tensor.is_floating_point()
        and not _all_finite(tensor)
    ):
        bad = sum(_non_finite_per_chunk(tensor))
        raise UserValueError(
            f"{path}: {key} holds {bad} NaN or infinite value(s); the base checkpoint is "
            "damaged: download it again into checkpointer.checkpoint_dir"
        )
    if not isinstance(tensor, torch.Tensor):
        raise UserValueError(
            f"{path}: {key} is a {type(tensor).__name__}, not a tensor; the file is not a "
            "checkpoint of model weights"
        )
    return tensor


def guess_key_format(keys: Iterable[str]) -> Optional[str]:
    """The ``checkpoint_format`` whose key layout ``keys`` use, if one is recognisable."""
    match = _first_layout_key(keys)
    return match[0] if match else None


def _first_layout_key(keys: Iterable[str]) -> Optional[Tuple[str, str]]:
    for key in sorted(keys):
        for checkpoint_format, pattern in _LAYOUT_KEYS:
            if pattern.match(key):
                return checkpoint_format, key
    return None


def load_tensor_stream(
    model: nn.Module,
    tensors: Iterator[Tuple[str, torch.Tensor]],
    convert: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]],
    *,
    tied: bool,
    checkpoint_format: str,
    total_bytes: Optional[int] = None,
) -> None:
    """Load ``tensors`` into ``model``, each converted and loaded on its own.

    Loading one tensor at a time lets int4 layers quantize it on arrival: peak memory stays
    about one full-precision tensor (two, with the one read ahead) above the quantized
    model. A progress bar counts the bytes read and quantized.

    Args:
        model (nn.Module): a torchtune model (adapter weights are not expected).
        tensors (Iterator[Tuple[str, torch.Tensor]]): the checkpoint's ``(key, tensor)``.
        convert (Callable): maps a one-entry checkpoint dict to torchtune's keys; an
            exception means the key is unknown to the layout.
        tied (bool): the model ties its output projection to its token embeddings, so
            either copy in the checkpoint fills ``tok_embeddings.weight``.
        checkpoint_format (str): the layout ``convert`` reads, named in error messages.
        total_bytes (int, optional): the checkpoint's size, for the progress bar.

    Raises:
        ValueError: if the checkpoint lacks weights the model needs, holds weights it does
            not have, or a shape does not match.
    """
    expected = {key for key in model.state_dict() if "lora_" not in key}
    loaded, unexpected, unexpected_raw = set(), [], []
    tied_value: Optional[torch.Tensor] = None
    bar = progress_bar(total_bytes, "loading and quantizing", unit="B")
    releaser = FreeMemoryReleaser()  # the bf16 tensors freed between int4 ones fragment the heap
    for raw_key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        try:
            converted = convert({raw_key: tensor})
        except Exception:  # torchtune raises a bare Exception for keys it cannot map
            # a known Hugging Face key whose rows cannot be regrouped: a wrong shape
            if checkpoint_format == "hf" and _PERMUTED_KEY.search(raw_key):
                raise UserValueError(
                    f"{raw_key}: checkpoint shape {tuple(tensor.shape)} does not fit the model's "
                    "attention heads (a checkpoint of another model or size); check that the "
                    "model builder (model._component_) matches the checkpoint in "
                    "checkpointer.checkpoint_dir"
                ) from None
            unexpected.append(raw_key)
            unexpected_raw.append(raw_key)
            continue
        for key, value in converted.items():
            if tied and key in TIED_KEYS:
                tied_value = value  # checkpoints store either copy of tied weights
            if key not in expected:
                if not (tied and key in TIED_KEYS):
                    unexpected.append(key)
                    unexpected_raw.append(raw_key)
                continue
            _load_one(model, key, value, raw_key)
            loaded.add(key)
        del tensor, converted
        releaser.count(nbytes)
        bar.update(nbytes)
    bar.close()
    release_free_memory()
    missing = expected - loaded
    for key in TIED_KEYS:
        if key in missing and tied_value is not None:
            _load_one(model, key, tied_value)
            missing.discard(key)
    if unexpected:
        raise UserValueError(
            f"the checkpoint holds weights this model does not have (e.g. {sorted(set(unexpected_raw))[:3]}); "
            "check that model and checkpointer.model_type match the checkpoint"
            + _format_hint(unexpected_raw, checkpoint_format)
        )
    if missing:
        raise UserValueError(
            f"the checkpoint lacks weights the model needs (e.g. {sorted(missing)[:3]}); "
            "check that model matches the checkpoint and that every checkpoint file is listed"
        )


def _format_hint(raw_keys: List[str], checkpoint_format: str) -> str:
    match = _first_layout_key(raw_keys)
    if match is None or match[0] == checkpoint_format:
        return ""
    guess, example = match
    return (
        f"; its keys (e.g. {example!r}) are in the {guess!r} layout, not "
        f"{checkpoint_format!r}: set checkpointer.checkpoint_format={guess!r}"
    )


def _load_one(model: nn.Module, key: str, value: torch.Tensor, raw_key: Optional[str] = None) -> None:
    expected = _expected_shape(model, key)
    if expected is not None and not is_quantized_base(value) and tuple(value.shape) != expected:
        name = key if raw_key in (None, key) else f"{raw_key} (torchtune {key})"
        raise UserValueError(
            f"{name}: checkpoint shape {tuple(value.shape)} does not match the model's "
            f"{expected} (a checkpoint of another model or size); check that the model "
            "builder (model._component_) matches the checkpoint in checkpointer.checkpoint_dir"
        )
    owner, _, name = key.rpartition(".")
    module = _submodule(model, owner)
    current = getattr(module, name, None) if module is not None else None
    try:
        if (
            isinstance(current, torch.Tensor) and not isinstance(module, QuantizedLinear)
            and type(current.data) is torch.Tensor and not current.is_meta
        ):
            # take the tensor read as the parameter itself (in the parameter's dtype and
            # device): copying it into the placeholder would hold both, e.g. 2 x 1 GB for
            # a 128k-vocabulary embedding table
            value = value.detach().to(device=current.device, dtype=current.dtype).contiguous()
            model.load_state_dict({key: value}, strict=False, assign=True)
        else:
            model.load_state_dict({key: value}, strict=False)
    except ValueError as error:  # an int4 layer refusing the weight
        raise UserValueError(
            f"{key}: {error}; check that the model builder (model._component_) matches the "
            "checkpoint in checkpointer.checkpoint_dir"
        ) from None


def _submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _expected_shape(model: nn.Module, key: str) -> Optional[Tuple[int, ...]]:
    """The shape ``model`` expects for checkpoint tensor ``key`` (an int4 layer's weight
    arrives in full precision as ``(out_dim, in_dim)``, before any padding), or None."""
    module_path, _, name = key.rpartition(".")
    try:
        owner = model.get_submodule(module_path) if module_path else model
    except AttributeError:
        return None
    if isinstance(owner, QuantizedLinear) and name == "weight":
        return (owner.out_dim, owner.in_dim)
    tensor = getattr(owner, name, None)
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
