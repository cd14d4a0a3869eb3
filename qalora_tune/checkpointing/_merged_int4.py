"""The merged int4 model: written in transformers' TorchAoConfig layout, loaded back anywhere.

``merged_int4/`` is a Hugging Face model directory:

- ``config.json``: the base's config with a ``quantization_config`` that transformers'
  ``TorchAoConfig`` reads (see :mod:`~qalora_tune.checkpointing._merged_format` for the
  storage format: torchao ``Int4Tensor`` linears, or ``IntxUnpackedToInt8Tensor`` for bases
  the int4 kernels cannot hold);
- the weights, flattened by ``torchao.prototype.safetensors`` the way transformers saves
  torchao models, in shards of at most ``max_shard_size`` bytes named as Hugging Face names
  them: ``model.safetensors`` alone, or ``model-0000k-of-0000n.safetensors`` with
  ``model.safetensors.index.json``; every shard carries the whole model's torchao metadata,
  as transformers writes it;
- ``qalora_tune.json``: how to rebuild the torchtune model (:func:`load_merged`);
- tokenizer files and ``merge_report.json`` (written by the caller).

The writer consumes ``(hf_key, tensor)`` pairs produced one at a time
(:func:`merged_state_dict`), flattens each torchao tensor on its own and streams it to its
shard, so exporting holds one tensor beyond the model.
"""

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import nn

from qalora_tune._compat import (
    flatten_tensor_state_dict,
    get_component_from_path,
    unflatten_tensor_state_dict,
)
from qalora_tune._progress import progress_bar
from qalora_tune.checkpointing._hf_keys import HFKeyMap
from qalora_tune.checkpointing._merged_format import (
    is_portable_weight,
    kernel_weight,
    portable_nbytes,
    portable_weight,
    storage_format,
    torchao_quantization_config,
)
from qalora_tune.checkpointing._safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    safetensors_files,
)
from qalora_tune.models import materialize
from qalora_tune.modules import Int4Linear, QALoRALinear

__all__ = [
    "MERGED_DIR_NAME",
    "MERGED_SPEC_NAME",
    "MERGED_WEIGHTS_NAME",
    "MERGE_REPORT_NAME",
    "clean_module_name",
    "load_merged",
    "flatten_one",
    "merged_state_dict",
    "torchao_quantization_config",
    "write_merged_int4",
    "write_merged_tensors",
]

MERGED_DIR_NAME = "merged_int4"
MERGED_WEIGHTS_NAME = "model.safetensors"  # the name when the model fits one shard
MERGED_SPEC_NAME = "qalora_tune.json"
MERGE_REPORT_NAME = "merge_report.json"
_NESTED = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_module_name(name: str) -> str:
    """A module name without activation-checkpointing / compile wrapper segments."""
    for segment in _NESTED:
        name = name.replace(segment, "")
    return name


def merged_state_dict(model: nn.Module, key_map: HFKeyMap) -> Iterator[Tuple[str, torch.Tensor]]:
    """The merged model's tensors under Hugging Face names, made one at a time.

    Each int4 layer's weight is converted to the written format
    (:func:`~qalora_tune.checkpointing._merged_format.portable_weight`, rows in Hugging
    Face order) only when it is asked for; other tensors (embeddings, norms, biases) pass
    through the key map unchanged. Adapter weights are left out.

    Raises:
        ValueError: if an adapter is not merged.
    """
    int4_modules = {}
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            if isinstance(module, QALoRALinear) and not module.merged:
                raise ValueError(f"{name}: merge() the adapters before writing the merged model")
            int4_modules[f"{clean_module_name(name)}.weight"] = module
    for key, value in model.state_dict().items():
        key = clean_module_name(key)
        if ".lora_" in key:
            continue
        module = int4_modules.get(key)
        if module is not None:
            hf_key, rows = key_map.row_order(key, module.out_dim, to_hf=True)
            yield hf_key, portable_weight(module, rows)
        else:
            yield from key_map.to_hf({key: value.detach().cpu().contiguous()}).items()


def write_merged_tensors(
    tensors: Iterable[Tuple[str, torch.Tensor]],
    directory: Path,
    hf_config: Dict[str, Any],
    spec: Dict[str, Any],
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    total: Optional[int] = None,
) -> Dict[str, Any]:
    """Write merged weights, consumed one at a time, with ``config.json`` and
    ``qalora_tune.json``.

    Args:
        tensors (Iterable[Tuple[str, torch.Tensor]]): ``(Hugging Face key, tensor)``; a
            merged linear's weight in the written format (``Int4Tensor`` or
            ``IntxUnpackedToInt8Tensor``), anything else dense.
        directory (Path): an existing (staging) directory.
        hf_config (Dict[str, Any]): the base's ``config.json``.
        spec (Dict[str, Any]): ``model`` (builder ``_component_`` and arguments that build
            the same model without adapters) and ``model_type``.
        max_shard_size (int or str): bytes per weight file at most, e.g. ``"5GB"``.
        total (int, optional): the number of tensors, for the progress bar.

    Returns:
        Dict[str, Any]: sizes: quantized parameters, their bytes and bits per parameter,
        the bytes of all files and the number of shards.

    Raises:
        ValueError: if no weight is a merged linear, or two need different
            ``quantization_config``s.
    """
    writer = ShardedSafetensorsWriter(directory, max_shard_size, metadata={"format": "pt"})
    names, fmt, dtype = [], None, None
    quantized_params = quantized_bytes = 0
    with progress_bar(total, "writing merged int4", unit="tensor") as bar:
        for hf_key, value in tensors:
            if is_portable_weight(value):
                if fmt is None:
                    fmt = storage_format(value)
                elif storage_format(value) != fmt:
                    raise ValueError(
                        f"{hf_key} is stored with another group size or bit width than the "
                        "first linear; one merged file holds one quantization_config"
                    )
                quantized_params += value.shape[0] * value.shape[1]
                quantized_bytes += portable_nbytes(value)
                dtype = value.dtype
            data, metadata = flatten_one(hf_key, value)
            metadata.pop("tensor_names")
            writer.add(data, metadata)
            names.append(hf_key)
            del value, data  # nothing of this tensor stays while the next one is made
            bar.update()
        if fmt is None:
            raise ValueError("the model has no int4 linear layers to write")
        bar.set_description("writing merged int4: shard headers")
        paths = writer.close(metadata={"tensor_names": json.dumps(names)})
    config = dict(hf_config)
    config["quantization_config"] = torchao_quantization_config(*fmt)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / MERGED_SPEC_NAME).write_text(json.dumps(spec, indent=2))
    file_bytes = sum(p.stat().st_size for p in paths)
    return {
        "quantized_parameters": quantized_params,
        "quantized_bytes": quantized_bytes,
        "bits_per_quantized_parameter": 8 * quantized_bytes / quantized_params,
        "file_bytes": file_bytes,
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
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
) -> Dict[str, Any]:
    """Write a merged model's weights, ``config.json`` and ``qalora_tune.json``: the
    tensors of :func:`merged_state_dict` through :func:`write_merged_tensors`.

    Args:
        model (nn.Module): a QA-LoRA model whose adapters are merged.
        directory (Path): an existing (staging) directory.
        key_map (HFKeyMap): torchtune -> Hugging Face key conversion of the model.
        hf_config (Dict[str, Any]): the base's ``config.json``.
        spec (Dict[str, Any]): ``model`` (builder ``_component_`` and arguments that build
            the same model without adapters) and ``model_type``.
        max_shard_size (int or str): bytes per weight file at most.

    Returns:
        Dict[str, Any]: sizes (see :func:`write_merged_tensors`).

    Raises:
        ValueError: if an adapter is not merged.
    """
    total = sum(1 for key in model.state_dict() if ".lora_" not in key)
    return write_merged_tensors(
        merged_state_dict(model, key_map), directory, hf_config, spec, max_shard_size, total
    )


def _read_tensors(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Hugging Face key, tensor or torchao tensor) of one torchao safetensors file, each
    read when asked for (no memory map: only the tensors in use are resident)."""
    with SafetensorsReader(path) as reader:
        metadata = reader.metadata()
        if "tensor_names" not in metadata:
            raise ValueError(f"{path} has no torchao metadata; it is not a merged int4 model")
        present = set(reader.keys())
        for name in json.loads(metadata["tensor_names"]):
            info = json.loads(metadata[name])
            if info.get("_type") == "Tensor":
                if name in present:  # every shard names the whole model's tensors
                    yield name, reader.get_tensor(name)
                continue
            module, param = name.rsplit(".", 1)
            parts = [f"{module}._{param}_{part}" for part in info["_tensor_data_names"]]
            if parts[0] not in present:
                continue
            data = {part: reader.get_tensor(part) for part in parts if part in present}
            one = {name: metadata[name], "tensor_names": json.dumps([name])}
            yield name, unflatten_tensor_state_dict(data, one)[0][name]


def load_merged(
    path: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """A torchtune model from a ``merged_int4/`` directory, its linears torchao int4.

    On CPU the linears are ``Int4OpaqueTensor`` (CPU int4 kernel; fp32 dequantizes per
    call), on CUDA sm80+ ``Int4TilePackedTo4dTensor`` (tinygemm, bf16): the same codes,
    scales and merged zeros as written, so logits equal those of the merged model at the
    end of training when ``dtype`` is the one it was written in. The weights are read one
    tensor at a time (from one file or from the shards its index names), each converted to
    the kernel layout before the next is read.

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
            raise FileNotFoundError(f"{path / name} not found; point to a merged_int4/ directory")
    try:
        files = safetensors_files(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; point to a merged_int4/ directory") from None
    hf_config = json.loads((path / "config.json").read_text())
    spec = json.loads((path / MERGED_SPEC_NAME).read_text())
    device = torch.device(device or "cpu")
    dtype = dtype or getattr(torch, hf_config.get("torch_dtype", "bfloat16"))
    try:
        builder = get_component_from_path(spec["model"]["_component_"])
    except Exception as error:  # torchtune raises InstantiationError
        raise ValueError(
            f"{path / MERGED_SPEC_NAME} names the model builder {spec['model']['_component_']!r}, "
            f"which cannot be imported ({type(error).__name__}); install the package that "
            "provides it"
        ) from None
    kwargs = {k: v for k, v in spec["model"].items() if k != "_component_"}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # every weight comes from the files: no placeholders
            model = builder(**kwargs)
    finally:
        torch.set_default_dtype(previous)
    key_map = HFKeyMap(spec["model_type"], hf_config)
    expected = set(model.state_dict())
    loaded = set()
    total = _count_tensors(path, files)
    with progress_bar(total, f"loading {path.name}", unit="tensor") as bar:
        for file in files:
            for hf_key, value in _read_tensors(file):
                loaded |= _load_one(model, key_map, hf_key, value, expected, path, device, dtype)
                bar.update()
    missing = expected - loaded
    if missing:
        raise ValueError(f"{path} lacks weights the model needs, e.g. {sorted(missing)[:3]}")
    materialize(model, device, dtype)  # what no file holds: the RoPE caches
    return model.eval()


def _count_tensors(path: Path, files) -> Optional[int]:
    """The number of logical tensors the files hold (None if the metadata says nothing)."""
    try:
        with SafetensorsReader(files[-1]) as reader:
            return len(json.loads(reader.metadata()["tensor_names"]))
    except (KeyError, ValueError):
        return None


def _load_one(model, key_map, hf_key, value, expected, path, device, dtype) -> set:
    """Load one read tensor into ``model``; returns the torchtune keys it filled."""
    if is_portable_weight(value):
        key, rows = key_map.row_order(hf_key, value.shape[0], to_hf=False)
        module = _int4_module(model, key)
        packed = kernel_weight(value, module, rows, device, dtype)
        module._check_base(packed)
        module.weight = nn.Parameter(packed, requires_grad=False)
        return {key}
    filled = set()
    for key, tensor in key_map.to_tune({hf_key: value}).items():
        if key not in expected:
            raise ValueError(f"{path}: {hf_key} ({key}) is not a weight of the model it describes")
        if tensor.is_floating_point():
            tensor = tensor.to(device, dtype)
        model.load_state_dict({key: tensor.to(device)}, strict=False, assign=True)
        filled.add(key)
    return filled


def _int4_module(model: nn.Module, key: str) -> Int4Linear:
    try:
        module = model.get_submodule(key.rsplit(".", 1)[0])
    except AttributeError:
        module = None
    if not isinstance(module, Int4Linear):
        raise ValueError(f"{key} is int4 in the file but not an int4 linear of the model")
    return module

