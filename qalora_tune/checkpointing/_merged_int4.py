"""The merged model: written in transformers' TorchAoConfig layout, loaded back anywhere.

``merged_int4/`` is a Hugging Face model directory:

- ``config.json``: the base's config with a ``quantization_config`` that transformers'
  ``TorchAoConfig`` reads for the file's format (see
  :mod:`~qalora_tune.checkpointing._merged_formats`, the one place that chooses it);
- the weights, every quantized linear as the format's torchao tensor (codes, scales and
  the merged zero points), flattened by ``torchao.prototype.safetensors`` the way
  transformers saves torchao models, embeddings and norms as plain tensors; in shards of
  at most ``max_shard_size`` bytes named as Hugging Face names them: ``model.safetensors``
  alone, or ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``.
  Every shard carries the whole model's torchao metadata, as transformers writes it;
- ``qalora_tune.json``: how to rebuild the torchtune model (:func:`load_merged`);
- tokenizer files and ``merge_report.json`` (written by the caller).

The writer consumes ``(hf_key, tensor)`` pairs produced one at a time
(:func:`merged_state_dict`), flattens each torchao tensor on its own and streams it to its
shard, so exporting holds one tensor beyond the model.
"""

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from qalora_tune._compat import (
    WRAPPER_NAME_SEGMENTS,
    flatten_tensor_state_dict,
    read_torchao_safetensors_tensor,
)
from qalora_tune._files import read_json
from qalora_tune._memory import FreeMemoryReleaser
from qalora_tune._progress import progress_bar
from qalora_tune.checkpointing._atomic import atomic_write_text
from qalora_tune.checkpointing._hf_keys import HFKeyMap
from qalora_tune.checkpointing._merged_formats import (
    base_from_file,
    check_format_holds,
    file_weight_nbytes,
    is_file_base,
    portable_weight,
    quantization_config,
    written_bits,
)
from qalora_tune.checkpointing._model_spec import build_from_spec, check_model_spec
from qalora_tune.checkpointing._safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    safetensors_files,
    tensor_bytes,
)
from qalora_tune.errors import UserFileNotFoundError, UserValueError
from qalora_tune.models import materialize
from qalora_tune.modules import QALoRALinear, QuantizedLinear
from qalora_tune.quantization.intx_weight import is_intx_weight

__all__ = [
    "MERGED_DIR_NAME",
    "MERGED_SPEC_NAME",
    "MERGED_WEIGHTS_NAME",
    "MERGE_REPORT_NAME",
    "clean_module_name",
    "flatten_one",
    "load_merged",
    "merged_state_dict",
    "write_merged_int4",
    "write_merged_tensors",
]

MERGED_DIR_NAME = "merged_int4"
MERGED_WEIGHTS_NAME = "model.safetensors"  # the name when the model fits one shard
MERGED_SPEC_NAME = "qalora_tune.json"
MERGE_REPORT_NAME = "merge_report.json"
_STORED_DTYPES = ("float32", "bfloat16", "float16")
_NESTED = WRAPPER_NAME_SEGMENTS


def clean_module_name(name: str) -> str:
    """A module name without activation-checkpointing / compile wrapper segments."""
    for segment in _NESTED:
        name = name.replace(segment, "")
    return name


def _quantized_modules(model: nn.Module) -> Dict[str, QuantizedLinear]:
    """torchtune weight key -> the QuantizedLinear owning it (every adapter merged)."""
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            if isinstance(module, QALoRALinear) and not module.merged:
                raise UserValueError(f"{name}: merge() the adapters before writing the merged model")
            modules[f"{clean_module_name(name)}.weight"] = module
    return modules


def resolve_file_format(model: nn.Module, merged_format: str) -> str:
    """``merged_format`` for ``model``'s linears: an intx base has only the intx layout.

    Raises:
        UserValueError: if the format cannot hold the bases (see ``check_format_holds``).
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise UserValueError("the model has no quantized linear layers to write")
    if any(is_intx_weight(m.weight) for m in layers):
        merged_format = "intx"
    check_format_holds(merged_format, layers)
    return merged_format


def merged_state_dict(
    model: nn.Module, key_map: HFKeyMap, merged_format: str
) -> Iterator[Tuple[str, torch.Tensor]]:
    """The merged model's tensors under Hugging Face names, made one at a time.

    Each quantized layer's weight is converted to ``merged_format``'s torchao class
    (:func:`~qalora_tune.checkpointing._merged_formats.portable_weight`, rows in Hugging
    Face order) only when it is asked for; other tensors (embeddings, norms, biases) pass
    through the key map unchanged. Adapter weights are left out.

    Raises:
        UserValueError: if an adapter is not merged.
    """
    quantized = _quantized_modules(model)
    for key, value in model.state_dict().items():
        key = clean_module_name(key)
        if ".lora_" in key:
            continue
        module = quantized.get(key)
        if module is not None:
            hf_key, rows = key_map.row_order(key, module.out_dim, to_hf=True)
            yield hf_key, portable_weight(module, rows, merged_format)[0]
        else:
            yield from key_map.to_hf({key: value.detach().cpu().contiguous()}).items()


def write_merged_tensors(
    tensors: Iterable[Tuple[str, torch.Tensor]],
    directory: Path,
    hf_config: Dict[str, Any],
    spec: Dict[str, Any],
    quantization: Dict[str, Any],
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    total: Optional[int] = None,
) -> Dict[str, Any]:
    """Write merged weights, consumed one at a time, with ``config.json`` and
    ``qalora_tune.json``.

    Args:
        tensors (Iterable[Tuple[str, torch.Tensor]]): ``(Hugging Face key, tensor)``; a
            merged linear's weight as its file format's torchao tensor, anything else dense.
        directory (Path): an existing (staging) directory.
        hf_config (Dict[str, Any]): the base's ``config.json``.
        spec (Dict[str, Any]): what ``qalora_tune.json`` holds (``model``, ``model_type``,
            ``format``).
        quantization (Dict[str, Any]): ``config.json``'s ``quantization_config``.
        max_shard_size (int or str): bytes per weight file at most, e.g. ``"5GB"``.
        total (int, optional): the number of tensors, for the progress bar.

    Returns:
        Dict[str, Any]: sizes: quantized parameters, their bytes and bits per parameter,
        the bytes of all files and the number of shards.

    Raises:
        UserValueError: if no weight is a quantized linear.
    """
    writer = ShardedSafetensorsWriter(directory, max_shard_size, metadata={"format": "pt"})
    releaser = FreeMemoryReleaser()  # each converted layer's temporaries fragment the heap
    names: List[str] = []
    dtype = None
    quantized_params = quantized_bytes = 0
    with progress_bar(total, "writing the merged model", unit="tensor") as bar:
        for hf_key, value in tensors:
            if is_file_base(value):
                quantized_params += value.shape[0] * value.shape[1]
                quantized_bytes += file_weight_nbytes(value)
                dtype = value.dtype
            data, metadata = flatten_one(hf_key, value)
            metadata.pop("tensor_names")
            writer.add(data, metadata)
            names.append(hf_key)
            releaser.count(sum(tensor_bytes(t) for t in data.values()))
            del value, data  # nothing of this tensor stays while the next one is made
            bar.update()
        if dtype is None:
            raise UserValueError("the model has no quantized linear layers to write")
        bar.set_description("writing the merged model: shard headers")
        paths = writer.close(metadata={"tensor_names": json.dumps(names)})
    config = dict(hf_config)
    config["quantization_config"] = quantization
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2))
    atomic_write_text(directory / MERGED_SPEC_NAME, json.dumps(spec, indent=2))
    return {
        "quantized_parameters": quantized_params,
        "quantized_bytes": quantized_bytes,
        "bits_per_quantized_parameter": 8 * quantized_bytes / quantized_params,
        "file_bytes": sum(p.stat().st_size for p in paths),
        "shards": len(paths),
    }


def flatten_one(key: str, value: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``torchao.prototype.safetensors``' flattening of one tensor, without its copy.

    torchao's ``flatten_tensor_state_dict`` clones a subclass's inner tensors, which for a
    large layer doubles what the export holds. Its metadata depends only on the subclass's
    non-tensor attributes, so the same function is run on a shell of the tensor whose inner
    tensors are on ``meta`` (cloned for free), and the names it returns are mapped to the
    real inner tensors: the same entries and metadata as torchao's, without the copy.

    Returns:
        Tuple[Dict[str, torch.Tensor], Dict[str, str]]: safetensors entries and metadata.
    """
    if type(value) is torch.Tensor:
        return flatten_tensor_state_dict({key: value})
    names, context = value.__tensor_flatten__()
    inner = {name: getattr(value, name) for name in names}
    shell = type(value).__tensor_unflatten__(
        {name: torch.empty_like(t, device="meta") for name, t in inner.items()},
        context, value.shape, value.stride(),
    )
    entries, metadata = flatten_tensor_state_dict({key: shell})
    module, param = key.rsplit(".", 1)
    prefix = f"{module}._{param}_"
    return {name: inner[name[len(prefix):]].detach() for name in entries}, metadata


def write_merged_int4(
    model: nn.Module,
    directory: Path,
    key_map: HFKeyMap,
    hf_config: Dict[str, Any],
    spec: Dict[str, Any],
    merged_format: str = "int4_plain",
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
) -> Dict[str, Any]:
    """Write a merged model's weights, ``config.json`` and ``qalora_tune.json``: the
    tensors of :func:`merged_state_dict` streamed through :func:`write_merged_tensors`.

    Args:
        model (nn.Module): a QA-LoRA model whose adapters are merged.
        directory (Path): an existing (staging) directory.
        key_map (HFKeyMap): torchtune -> Hugging Face key conversion of the model.
        hf_config (Dict[str, Any]): the base's ``config.json``.
        spec (Dict[str, Any]): ``model`` (builder ``_component_`` and arguments that build
            the same model without adapters) and ``model_type``.
        merged_format (str): the file format of the quantized linears, resolved by
            :func:`~qalora_tune.checkpointing._merged_formats.choose_merged_format`.
        max_shard_size (int or str): bytes per weight file at most.

    Returns:
        Dict[str, Any]: sizes (see :func:`write_merged_tensors`).

    Raises:
        UserValueError: if an adapter is not merged, or the format cannot hold the bases.
    """
    merged_format = resolve_file_format(model, merged_format)
    layers = list(_quantized_modules(model).values())
    padded = any(m.padded_in_dim != m.in_dim for m in layers)
    quantization = quantization_config(
        merged_format, layers[0].group_size, written_bits(layers[0], merged_format), padded
    )
    total = sum(1 for key in model.state_dict() if ".lora_" not in key)
    return write_merged_tensors(
        merged_state_dict(model, key_map, merged_format), directory, hf_config,
        dict(spec, format=merged_format), quantization, max_shard_size, total,
    )


def _read_tensors(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Hugging Face key, tensor or torchao tensor) of one torchao safetensors file (one
    shard), each read when asked for (``pread``, no memory map: only the tensors in use are
    resident)."""
    try:
        reader = SafetensorsReader(path)
    except Exception as error:  # a short or garbled header
        raise UserValueError(
            f"{path} cannot be read ({' '.join(str(error).split())}): the file is truncated "
            "or corrupt; merge again (tune run qalora_merge ...)"
        ) from None
    with reader:
        metadata = reader.metadata()
        if "tensor_names" not in metadata:
            raise UserValueError(f"{path} has no torchao metadata; it is not a merged model")
        try:
            names = json.loads(metadata["tensor_names"])
        except json.JSONDecodeError:
            raise UserValueError(f"{path} has corrupt torchao metadata (tensor_names)") from None
        present = set(reader.keys())
        for name in names:
            try:
                info = json.loads(metadata[name])
                if info.get("_type") == "Tensor":
                    first = name
                else:
                    module, param = name.rsplit(".", 1)
                    first = f"{module}._{param}_{info['_tensor_data_names'][0]}"
                if first not in present:  # every shard names the whole model's tensors
                    continue
                yield name, read_torchao_safetensors_tensor(reader, metadata, name)
            except UserValueError:
                raise
            except Exception as error:  # corrupt metadata or data: safetensors/torchao errors
                raise UserValueError(
                    f"{path}: {name} cannot be read ({type(error).__name__}: "
                    f"{' '.join(str(error).split())[:200]}); the file is corrupt: merge again"
                ) from None


def load_merged(
    path: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """A torchtune model from a ``merged_int4/`` directory, its linears quantized.

    On CPU the int4 linears use the CPU int4 kernel (fp32 dequantizes per call), on CUDA
    sm80+ tinygemm (bf16); intx bases stay intx: the same codes, scales and merged zeros as
    written, so logits equal those of the merged model at the end of training when
    ``dtype`` is the one it was written in. The model is built on ``meta`` and the weights
    are read one tensor at a time (from one file or from the shards its index names), each
    converted to the device's layout and assigned before the next is read.

    Args:
        path (str or Path): the ``merged_int4/`` directory.
        device (str or torch.device, optional): defaults to ``"cpu"``.
        dtype (torch.dtype, optional): compute dtype; defaults to the stored one
            (``config.json``'s ``torch_dtype``); CUDA needs bf16.

    Returns:
        nn.Module: the model in eval mode.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: if the files do not match the model they describe.
    """
    path = Path(path).expanduser()
    for name in ("config.json", MERGED_SPEC_NAME):
        if not (path / name).is_file():
            raise UserFileNotFoundError(f"{path / name} not found; point to a merged_int4/ directory")
    try:
        files = safetensors_files(path)
    except FileNotFoundError as error:
        raise UserFileNotFoundError(f"{error}; point to a merged_int4/ directory") from None
    fix = "point to a merged_int4/ directory written by qalora-tune"
    hf_config = read_json(path / "config.json", "the merged model's config", fix)
    spec = read_json(path / MERGED_SPEC_NAME, "the merged model's description", fix)
    check_model_spec(spec.get("model"), path / MERGED_SPEC_NAME)  # before anything is built
    device = torch.device(device or "cpu")
    stored = hf_config.get("torch_dtype", "bfloat16")
    if stored not in _STORED_DTYPES:
        raise UserValueError(
            f"{path / 'config.json'} has torch_dtype={stored!r}; a merged model is stored in "
            f"{', '.join(_STORED_DTYPES)}"
        )
    dtype = dtype or getattr(torch, stored)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # every weight comes from the files: no placeholders
            model = build_from_spec(spec["model"], path / MERGED_SPEC_NAME)
    finally:
        torch.set_default_dtype(previous)
    key_map = HFKeyMap(str(spec.get("model_type")), hf_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loaded = set()
    releaser = FreeMemoryReleaser()  # each layer's conversion temporaries
    with progress_bar(_count_tensors(files), f"loading {path.name}", unit="tensor") as bar:
        for file in files:
            for hf_key, value in _read_tensors(file):
                releaser.count(tensor_bytes(value))  # of a subclass: numel x its dtype's size
                loaded |= _load_one(model, key_map, hf_key, value, expected, path, device, dtype)
                bar.update()
    missing = set(expected) - loaded
    if missing:
        raise UserValueError(f"{path} lacks weights the model needs, e.g. {sorted(missing)[:3]}")
    materialize(model, device, dtype)  # what no file holds: the RoPE caches
    return model.eval()


def _count_tensors(files: List[Path]) -> Optional[int]:
    """The number of logical tensors the files hold (None if the metadata says nothing)."""
    try:
        with SafetensorsReader(files[-1]) as reader:
            return len(json.loads(reader.metadata()["tensor_names"]))
    except (KeyError, ValueError, OSError):
        return None


def _load_one(model, key_map, hf_key, value, expected, path, device, dtype) -> set:
    """Assign one read tensor to ``model`` (built on ``meta``); the torchtune keys filled."""
    if is_file_base(value):
        key, rows = key_map.row_order(hf_key, value.shape[0], to_hf=False)
        module = _quantized_module(model, key)
        try:
            base = base_from_file(value, rows, module, device, dtype)
            module._check_base(base)  # groups, bits, shape
        except UserValueError as error:
            raise UserValueError(f"{path}: {hf_key}: {error}") from None
        module.weight = nn.Parameter(module._in_storage(base), requires_grad=False)
        return {key}
    filled = set()
    for key, tensor in key_map.to_tune({hf_key: value}).items():
        if key not in expected:
            raise UserValueError(f"{path}: {hf_key} ({key}) is not a weight of the model it describes")
        if tuple(tensor.shape) != expected[key]:
            raise UserValueError(
                f"{path}: {hf_key} has shape {tuple(tensor.shape)} where the model it "
                f"describes has {expected[key]}; the files do not belong together"
            )
        if tensor.is_floating_point():
            tensor = tensor.to(device, dtype)
        model.load_state_dict({key: tensor.to(device)}, strict=False, assign=True)
        filled.add(key)
    return filled


def _quantized_module(model: nn.Module, key: str) -> QuantizedLinear:
    try:
        module = model.get_submodule(key.rsplit(".", 1)[0])
    except AttributeError:
        module = None
    if not isinstance(module, QuantizedLinear):
        raise UserValueError(f"{key} is int4 in the file but not an int4 linear of the model")
    return module
