"""The merged int4 model: written in transformers' TorchAoConfig layout, loaded back anywhere.

``merged_int4/`` is a Hugging Face model directory:

- ``config.json``: the base's config with a ``quantization_config`` that transformers'
  ``TorchAoConfig`` reads (``Int4WeightOnlyConfig``, plain int4 packing);
- ``model.safetensors``: every quantized linear as a torchao ``Int4Tensor`` (codes, scales
  and the merged zero points), flattened by ``torchao.prototype.safetensors`` the way
  transformers saves and loads torchao models; embeddings and norms as plain tensors.
  A base the int4 kernels cannot hold (8-bit codes, other group sizes) is written as
  torchao ``IntxUnpackedToInt8Tensor`` instead, with an ``IntxWeightOnlyConfig``;
- ``qalora_tune.json``: how to rebuild the torchtune model (:func:`load_merged`);
- tokenizer files and ``merge_report.json`` (written by the caller).
"""

import json
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qalora_tune._compat import (
    WRAPPER_NAME_SEGMENTS,
    flatten_tensor_state_dict,
    read_torchao_safetensors_tensor,
)
from qalora_tune._files import read_json
from qalora_tune.checkpointing._hf_keys import HFKeyMap
from qalora_tune.checkpointing._merged_formats import (
    base_from_file,
    check_format_holds,
    is_file_base,
    portable_weight,
    quantization_config,
    written_bits,
)
from qalora_tune.checkpointing._model_spec import build_from_spec, check_model_spec
from qalora_tune.errors import UserFileNotFoundError, UserValueError
from qalora_tune.modules import QALoRALinear, QuantizedLinear
from qalora_tune.quantization import GroupQuantizedWeight
from qalora_tune.quantization.intx_weight import is_intx_weight

__all__ = [
    "MERGED_DIR_NAME",
    "clean_module_name",
    "MERGED_SPEC_NAME",
    "MERGED_WEIGHTS_NAME",
    "MERGE_REPORT_NAME",
    "load_merged",
    "write_merged_int4",
]

MERGED_DIR_NAME = "merged_int4"
MERGED_WEIGHTS_NAME = "model.safetensors"
MERGED_SPEC_NAME = "qalora_tune.json"
MERGE_REPORT_NAME = "merge_report.json"
_STORED_DTYPES = ("float32", "bfloat16", "float16")
_NESTED = WRAPPER_NAME_SEGMENTS


def clean_module_name(name: str) -> str:
    """A module name without activation-checkpointing / compile wrapper segments."""
    for segment in _NESTED:
        name = name.replace(segment, "")
    return name


def _permute_rows(gq: GroupQuantizedWeight, rows: torch.Tensor) -> GroupQuantizedWeight:
    return GroupQuantizedWeight(
        qdata=gq.qdata[rows], scale=gq.scale[rows], zero=gq.zero[rows],
        group_size=gq.group_size, bits=gq.bits,
    )


def _merged_tensors(model: nn.Module) -> Iterator[Tuple[str, Union[torch.Tensor, QuantizedLinear]]]:
    """torchtune key -> dense tensor, or the QuantizedLinear owning that int4 weight."""
    int4_modules = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            if isinstance(module, QALoRALinear) and not module.merged:
                raise UserValueError(f"{name}: merge() the adapters before writing the merged model")
            int4_modules[f"{clean_module_name(name)}.weight"] = module
    for key, value in model.state_dict().items():
        key = clean_module_name(key)
        if ".lora_" in key:
            continue
        yield key, int4_modules.get(key, value)


def write_merged_int4(
    model: nn.Module,
    directory: Path,
    key_map: HFKeyMap,
    hf_config: Dict[str, Any],
    spec: Dict[str, Any],
    merged_format: str = "int4_plain",
) -> Dict[str, Any]:
    """Write a merged model's ``model.safetensors``, ``config.json`` and ``qalora_tune.json``.

    Args:
        model (nn.Module): a QA-LoRA model whose adapters are merged.
        directory (Path): an existing (staging) directory.
        key_map (HFKeyMap): torchtune -> Hugging Face key conversion of the model.
        hf_config (Dict[str, Any]): the base's ``config.json``.
        spec (Dict[str, Any]): ``model`` (builder ``_component_`` and arguments that build
            the same model without adapters) and ``model_type``.
        merged_format (str): the file format of the quantized linears, resolved by
            :func:`~qalora_tune.checkpointing._merged_formats.choose_merged_format`.

    Returns:
        Dict[str, Any]: sizes: quantized parameters, their bytes and bits per parameter,
        and the file size.

    Raises:
        ValueError: if an adapter is not merged.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if any(is_intx_weight(m.weight) for m in layers):
        merged_format = "intx"  # the only file layout of an intx base
    check_format_holds(merged_format, layers)
    tensors: Dict[str, torch.Tensor] = {}
    quantized_params, quantized_bytes, group_size, bits, dtype = 0, 0, None, 4, None
    for key, value in _merged_tensors(model):
        if isinstance(value, QuantizedLinear):
            hf_key, rows = key_map.row_order(key, value.out_dim, to_hf=True)
            portable, nbytes = portable_weight(value, rows, merged_format)
            tensors[hf_key] = portable
            quantized_params += value.out_dim * value.in_dim
            quantized_bytes += nbytes
            group_size, bits = value.group_size, written_bits(value, merged_format)
            dtype = value.weight.dtype
        else:
            tensors.update(key_map.to_hf({key: value.detach().cpu().contiguous()}))
    if group_size is None:
        raise UserValueError("the model has no int4 linear layers to write")
    data, metadata = flatten_tensor_state_dict(tensors)
    metadata["format"] = "pt"
    path = directory / MERGED_WEIGHTS_NAME
    save_file(data, str(path), metadata=metadata)
    config = dict(hf_config)
    padded = any(m.padded_in_dim != m.in_dim for m in layers)
    config["quantization_config"] = quantization_config(merged_format, group_size, bits, padded)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / MERGED_SPEC_NAME).write_text(json.dumps(dict(spec, format=merged_format), indent=2))
    return {
        "quantized_parameters": quantized_params,
        "quantized_bytes": quantized_bytes,
        "bits_per_quantized_parameter": 8 * quantized_bytes / quantized_params,
        "file_bytes": path.stat().st_size,
    }


def _read_tensors(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Hugging Face key, tensor or Int4Tensor) from a torchao safetensors file, one at a time."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own error types for bad files
        raise UserValueError(
            f"{path} cannot be read ({' '.join(str(error).split())}): the file is truncated "
            "or corrupt; merge again (tune run qalora_merge ...)"
        ) from None
    with handle:
        metadata = handle.metadata() or {}
        if "tensor_names" not in metadata:
            raise UserValueError(f"{path} has no torchao metadata; it is not a merged int4 model")
        try:
            names = json.loads(metadata["tensor_names"])
        except json.JSONDecodeError:
            raise UserValueError(f"{path} has corrupt torchao metadata (tensor_names)") from None
        for name in names:
            try:
                yield name, read_torchao_safetensors_tensor(handle, metadata, name)
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
    """A torchtune model from a ``merged_int4/`` directory, its linears torchao int4.

    On CPU the linears are ``Int4OpaqueTensor`` (CPU int4 kernel; fp32 dequantizes per
    call), on CUDA sm80+ ``Int4TilePackedTo4dTensor`` (tinygemm, bf16): the same codes,
    scales and merged zeros as written, so logits equal those of the merged model at the
    end of training when ``dtype`` is the one it was written in.

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
    for name in ("config.json", MERGED_SPEC_NAME, MERGED_WEIGHTS_NAME):
        if not (path / name).is_file():
            raise UserFileNotFoundError(f"{path / name} not found; point to a merged_int4/ directory")
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
        with device:
            model = build_from_spec(spec["model"], path / MERGED_SPEC_NAME)
    finally:
        torch.set_default_dtype(previous)
    key_map = HFKeyMap(str(spec.get("model_type")), hf_config)
    expected = set(model.state_dict())
    loaded = set()
    for hf_key, value in _read_tensors(path / MERGED_WEIGHTS_NAME):
        if is_file_base(value):
            key, rows = key_map.row_order(hf_key, value.shape[0], to_hf=False)
            module = _quantized_module(model, key)
            base = base_from_file(value, rows, module, device, dtype)
            try:  # the layer's load hook checks the base (groups, bits, shape)
                model.load_state_dict({key: base}, strict=False)
            except UserValueError as error:
                raise UserValueError(f"{path}: {hf_key}: {error}") from None
            loaded.add(key)
            continue
        for key, tensor in key_map.to_tune({hf_key: value}).items():
            if key not in expected:
                raise UserValueError(f"{path}: {hf_key} ({key}) is not a weight of the model it describes")
            wanted = tuple(model.state_dict()[key].shape)
            if tuple(tensor.shape) != wanted:
                raise UserValueError(
                    f"{path}: {hf_key} has shape {tuple(tensor.shape)} where the model it "
                    f"describes has {wanted}; the files do not belong together"
                )
            model.load_state_dict({key: tensor}, strict=False)
            loaded.add(key)
    missing = expected - loaded
    if missing:
        raise UserValueError(f"{path} lacks weights the model needs, e.g. {sorted(missing)[:3]}")
    return model.eval()


def _quantized_module(model: nn.Module, key: str) -> QuantizedLinear:
    try:
        module = model.get_submodule(key.rsplit(".", 1)[0])
    except AttributeError:
        module = None
    if not isinstance(module, QuantizedLinear):
        raise UserValueError(f"{key} is int4 in the file but not an int4 linear of the model")
    return module
