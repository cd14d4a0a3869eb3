"""The quantized linears of a base in one canonical form, and the base's fingerprint.

A task package applies to every base that has the same codes and scales, wherever they
live: a model in memory (``QuantizedLinear`` layers whose weight is a torchao int4 or intx
subclass), a ``merged_int4/`` directory on disk, or a transformers model loaded from one.
Each is read here into :class:`BaseLayer` (Hugging Face key, rows in Hugging Face order):

- ``codes``: ``q - 2**(bits - 1)`` as int8, ``(out_features, in_features)`` (the real
  columns only: a ``pad_in_dim`` layer's padding columns are not part of the base);
- ``scale``: ``(out_features, n_groups)`` in the dtype the base stores (hashed by value);
- ``zero``: the zero points as the storage keeps them, in its dtype: int4 storages keep
  ``z`` of this project's convention ``W = (q - 2**(bits-1)) * s + z`` (``storage="int4"``);
  torchao's intx storage keeps ``zp = -z / s``, ``W = (q - 2**(bits-1) - zp) * s``
  (``storage="intx"``). Keeping them as stored keeps them exact: :mod:`~qalora_tune.tasks.switch`
  converts them to another storage the way :func:`qalora_tune.load_merged` converts a file.

The fingerprint is a sha256 over every layer's codes and scales (never zeros), shapes,
group size and bits: two bases with the same fingerprint differ at most in their zero
points, which is all a task changes. :func:`read_merged_base` is the one place that reads
a merged directory; a new on-disk format needs a change there only.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from qalora_tune._files import read_json
from qalora_tune.checkpointing import HFKeyMap, clean_module_name
from qalora_tune.checkpointing._merged_formats import (
    choose_merged_format,
    is_file_base,
    portable_weight,
)
from qalora_tune.checkpointing._merged_int4 import MERGED_SPEC_NAME, resolve_file_format
from qalora_tune.checkpointing._merged_int4 import _read_tensors as read_torchao_safetensors
from qalora_tune.checkpointing._safetensors_io import safetensors_files
from qalora_tune.errors import UserFileNotFoundError, UserValueError
from qalora_tune.modules import QALoRALinear, QuantizedLinear
from qalora_tune.quantization import SUPPORTED_BITS
from qalora_tune.quantization.int4_weight import from_torchao_int4, is_int4_weight
from qalora_tune.quantization.intx_weight import is_intx_weight
from qalora_tune.quantization.plain_int4 import from_plain_int4, is_plain_int4

__all__ = [
    "BaseLayer",
    "FINGERPRINT_VERSION",
    "base_fingerprint",
    "canonical_layer",
    "fingerprint_layers",
    "fingerprint_model",
    "layer_digest",
    "model_base_layers",
    "model_layers",
    "read_merged_base",
    "read_merged_key_map",
]

FINGERPRINT_VERSION = "qalora-tune base fingerprint v2"


@dataclass(frozen=True)
class BaseLayer:
    """One quantized linear of a base, rows in Hugging Face order.

    Attributes:
        key (str): the Hugging Face weight name, e.g. ``model.layers.0.self_attn.q_proj.weight``.
        codes (torch.Tensor): ``(out_features, in_features)`` int8, ``q - 2**(bits - 1)``.
        scale (torch.Tensor): ``(out_features, n_groups)``, the stored dtype.
        zero (torch.Tensor): ``(out_features, n_groups)``, as stored: ``z`` of
            ``(q - mid) s + z`` (int4 storages) or ``zp = -z / s`` (intx), stored dtype.
        group_size (int): input columns per group.
        bits (int): code width.
        storage (str): ``"int4"`` (zeros stored as ``z``) or ``"intx"`` (as ``zp = -z / s``).
    """

    key: str
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    bits: int
    storage: str

    @property
    def zero_shape(self) -> Tuple[int, int]:
        """``(out_features, n_groups)``: the shape of this layer's zero-point table."""
        return tuple(self.scale.shape)


def canonical_layer(
    key: str,
    weight: torch.Tensor,
    bits: int,
    in_features: int,
    rows: Optional[torch.Tensor] = None,
) -> BaseLayer:
    """A torchao quantized weight (any storage this project reads) as a :class:`BaseLayer`.

    Args:
        key (str): the Hugging Face weight name.
        weight (torch.Tensor): ``Int4OpaqueTensor``, ``Int4TilePackedTo4dTensor``, an int4
            weight with 8-bit scales (decoded), a plain ``Int4Tensor`` or an
            ``IntxUnpackedToInt8Tensor``.
        bits (int): the base's code width (int4 storages hold 2- and 3-bit codes as int4
            codes and cannot tell); an intx weight's own width must agree.
        in_features (int): the real input columns (fewer than the stored ones for a layer
            padded with ``pad_in_dim``).
        rows (torch.Tensor, optional): row order to Hugging Face's (``hf = weight[rows]``).

    Raises:
        ValueError: for a weight that is none of those, or whose bits disagree.
    """
    if is_intx_weight(weight):
        # a 2- or 3-bit base on the int4 kernels is written as int4 codes (q - 8): the
        # values are the same as in memory, so only the values are compared
        codes = weight.qdata[:, :in_features]
        scale = weight.scale
        zero = weight.zero_point
        group_size, storage = weight.block_size[-1], "intx"
    elif is_plain_int4(weight) or is_int4_weight(weight):
        gq = from_plain_int4(weight) if is_plain_int4(weight) else from_torchao_int4(weight)
        codes = (gq.qdata[:, :in_features].to(torch.int16) - gq.mid).to(torch.int8)
        scale, zero = gq.scale, gq.zero
        group_size, storage = gq.group_size, "int4"
    else:
        raise UserValueError(
            f"{key} is a {type(weight).__name__}, not a quantized base weight qalora-tune "
            "reads (Int4Tensor, Int4OpaqueTensor, Int4TilePackedTo4dTensor, "
            "IntxUnpackedToInt8Tensor)"
        )
    if rows is not None:
        rows = rows.to(codes.device)
        codes, scale, zero = codes[rows], scale[rows], zero[rows]
    return BaseLayer(
        key=key,
        codes=codes.contiguous(),
        scale=scale.contiguous(),
        zero=zero.contiguous(),
        group_size=int(group_size),
        bits=int(bits),
        storage=storage,
    )


def _buffer(tensor: torch.Tensor) -> Any:
    """The bytes of ``tensor`` (little-endian, row-major) without another copy on CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def layer_digest(layer: BaseLayer) -> str:
    """sha256 of one layer's key, shapes, group size, bits, codes and scale values."""
    header = {
        "key": layer.key,
        "out_features": layer.codes.shape[0],
        "in_features": layer.codes.shape[1],
        "n_groups": layer.scale.shape[1],
        "group_size": layer.group_size,
        "bits": layer.bits,
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode() + b"\n")
    digest.update(_buffer(layer.codes))
    # scales by value (float64 holds every stored dtype exactly): a base read from an fp32
    # file and the same base in memory in bf16 or fp32 have one fingerprint
    digest.update(_buffer(layer.scale.double()))
    return digest.hexdigest()


def base_fingerprint(digests: Mapping[str, str]) -> str:
    """The base's fingerprint from its layers' digests (any order in, sorted by key).

    Returns:
        str: ``"sha256:<64 hex digits>"``.
    """
    if not digests:
        raise UserValueError("the model has no quantized linear layers: nothing to fingerprint")
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
    for key in sorted(digests):
        digest.update(f"{key} {digests[key]}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def model_layers(
    model: nn.Module, key_map: HFKeyMap
) -> Iterator[Tuple[str, QuantizedLinear, torch.Tensor]]:
    """``(Hugging Face key, layer, rows)`` of every quantized linear of an in-memory model,
    with ``rows`` its row order to Hugging Face's (``hf = weight[rows]``)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            key = f"{clean_module_name(name)}.weight"
            hf_key, rows = key_map.row_order(key, module.out_dim, to_hf=True)
            yield hf_key, module, rows


def model_base_layers(
    model: nn.Module, key_map: HFKeyMap, merged_format: Optional[str] = None
) -> Iterator[BaseLayer]:
    """Every quantized linear of an in-memory model as a :class:`BaseLayer`, one at a time.

    Args:
        model (nn.Module): a merged model.
        key_map (HFKeyMap): its torchtune -> Hugging Face keys.
        merged_format (str, optional): read each layer as a merged file of this format
            (``auto``, ``intx``, ...) would hold it, through the merged writer's own
            conversion (:func:`~qalora_tune.checkpointing._merged_formats.portable_weight`);
            None: as the model holds it.

    Raises:
        ValueError: if a QA-LoRA adapter is not merged (its zeros would leave the adapter
            out), or the format cannot hold the model.
    """
    chosen = None
    if merged_format is not None:  # resolved as the merged writer resolves it
        chosen = choose_merged_format(merged_format, model, next(model.parameters()).device)
        chosen = resolve_file_format(model, chosen)
    for hf_key, module, rows in model_layers(model, key_map):
        if isinstance(module, QALoRALinear) and not module.merged:
            raise UserValueError(
                f"{hf_key}: merge() the adapters first; an unmerged layer's zero points "
                "are the base's, not the task's"
            )
        if chosen is None:
            yield canonical_layer(hf_key, module.weight, module.bits, module.in_dim, rows)
            continue
        portable, _ = portable_weight(module, rows, chosen)
        yield canonical_layer(hf_key, portable, module.bits, module.in_dim)


_FIX = "point to a merged_int4/ directory written by qalora-tune"


def _read_merged_json(merged_dir: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``config.json`` and ``qalora_tune.json`` of a merged directory."""
    for name in ("config.json", MERGED_SPEC_NAME):
        if not (merged_dir / name).is_file():
            raise UserFileNotFoundError(f"{merged_dir / name} not found; {_FIX}")
    hf_config = read_json(merged_dir / "config.json", "the merged model's config", _FIX)
    spec = read_json(merged_dir / MERGED_SPEC_NAME, "the merged model's description", _FIX)
    return hf_config, spec


def read_merged_key_map(merged_dir: Union[str, Path]) -> Tuple[Dict[str, Any], HFKeyMap]:
    """A merged directory's ``config.json`` and its torchtune <-> Hugging Face key map."""
    hf_config, spec = _read_merged_json(Path(merged_dir).expanduser())
    return hf_config, HFKeyMap(str(spec.get("model_type")), hf_config)


def read_merged_base(
    merged_dir: Union[str, Path],
) -> Tuple[Dict[str, Any], Iterator[BaseLayer]]:
    """A ``merged_int4/`` directory's ``config.json`` and its quantized linears, one at a time.

    The one reader of merged directories here: adapt it when the on-disk format changes.

    Args:
        merged_dir (str or Path): written by ``qalora_finetune`` or ``qalora_merge``.

    Returns:
        Tuple[Dict, Iterator[BaseLayer]]: the Hugging Face config, and the layers as the
        files hold them (Hugging Face keys and rows).

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: if a file is unreadable or describes an unknown bit width.
    """
    merged_dir = Path(merged_dir).expanduser()
    hf_config, spec = _read_merged_json(merged_dir)
    model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
    bits = model.get("bits", 4)
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise UserValueError(f"{merged_dir / MERGED_SPEC_NAME} has bits={bits!r}; {_FIX}")
    try:  # model.safetensors, or the shards its index names
        files = safetensors_files(merged_dir)
    except FileNotFoundError as error:
        raise UserFileNotFoundError(f"{error}; {_FIX}") from None

    def layers() -> Iterator[BaseLayer]:
        for path in files:
            for key, value in read_torchao_safetensors(path):
                if is_file_base(value):
                    yield canonical_layer(key, value, bits, value.shape[1])

    return hf_config, layers()


def fingerprint_layers(layers: Iterable[BaseLayer]) -> str:
    """The fingerprint of a base given as layers (consumed one at a time)."""
    return base_fingerprint({layer.key: layer_digest(layer) for layer in layers})


def fingerprint_model(model: nn.Module, key_map: HFKeyMap) -> str:
    """The fingerprint of an in-memory model's base, merged or not (zeros do not count)."""
    return fingerprint_layers(
        canonical_layer(key, module.weight, module.bits, module.in_dim, rows)
        for key, module, rows in model_layers(model, key_map)
    )
