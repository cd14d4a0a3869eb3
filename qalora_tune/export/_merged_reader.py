"""Reading a ``merged_int4/`` directory, whatever its on-disk layout: the one place that does.

Exporters only see :func:`iter_merged_weights`: Hugging Face keys with either a dense tensor
or a :class:`MergedLinearWeight` (plain codes, scales and float zero points in this
project's convention ``W = (q - mid) * s + z``). The layouts read today:

- ``model.safetensors``, or shards listed by ``model.safetensors.index.json``;
- per file, torchao-flattened tensors (``tensor_names`` metadata, as written by
  ``torchao.prototype.safetensors``) or plain safetensors;
- torchao ``Int4Tensor`` (plain layout), ``IntxUnpackedToInt8Tensor`` (zero points
  converted back: torchao's ``W = (c - zp) * s`` is ``z = -zp * s``), the int4 kernel
  subclasses (``Int4TilePackedTo4dTensor``, ``Int4OpaqueTensor``), and dense tensors.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple, Union

import torch
from safetensors import safe_open

from qalora_tune.checkpointing._merged_int4 import (
    _read_tensors as read_torchao_safetensors,
)
from qalora_tune.quantization import GroupQuantizedWeight
from qalora_tune.quantization.int4_weight import from_torchao_int4, is_int4_weight
from qalora_tune.quantization.intx_weight import from_torchao_intx, is_intx_weight
from qalora_tune.quantization.plain_int4 import from_plain_int4, is_plain_int4

__all__ = [
    "MergedLinearWeight",
    "iter_merged_weights",
    "merged_weight_files",
    "read_merged_config",
]

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class MergedLinearWeight:
    """A quantized linear weight of a merged model, in plain form.

    Attributes:
        quantized (GroupQuantizedWeight): codes ``(out_dim, n_groups * G)`` (a partial last
            group padded with the zero-offset code ``mid``), scales and float zeros
            ``(out_dim, n_groups)``, ``W = (q - mid) * s + z``.
        in_features (int): the real number of input columns (``<=`` the padded width; less
            for a layer trained with ``pad_in_dim``, whose padding columns were dropped).
        stored_as (str): the torchao class it was read from, for reports.
    """

    quantized: GroupQuantizedWeight
    in_features: int
    stored_as: str

    @property
    def shape(self) -> Tuple[int, int]:
        """``(out_dim, in_features)``."""
        return (self.quantized.shape[0], self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``(out_dim, in_features)`` in ``dtype``."""
        return self.quantized.dequantize(dtype)[:, : self.in_features]


MergedWeight = Union[MergedLinearWeight, torch.Tensor]


def read_merged_config(merged_dir: Union[str, Path]) -> Dict[str, Any]:
    """The ``config.json`` of a merged directory.

    Raises:
        FileNotFoundError: if it is missing.
    """
    path = Path(merged_dir).expanduser() / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; point to a merged_int4/ directory")
    return json.loads(path.read_text())


def merged_weight_files(merged_dir: Union[str, Path]) -> List[Path]:
    """The safetensors files of a merged directory, in a stable order.

    Raises:
        FileNotFoundError: if it has neither ``model.safetensors`` nor an index.
    """
    merged_dir = Path(merged_dir).expanduser()
    index = merged_dir / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (merged_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{merged_dir / missing[0]} (listed in {index}) not found")
        return [merged_dir / n for n in names]
    single = merged_dir / _SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"{merged_dir} has neither {_SINGLE_FILE} nor {_INDEX_FILE}; point to a merged_int4/ directory"
    )


def iter_merged_weights(merged_dir: Union[str, Path]) -> Iterator[Tuple[str, MergedWeight]]:
    """``(Hugging Face key, weight)`` of every tensor in a merged directory, one at a time.

    Rows are in Hugging Face order, as written.

    Args:
        merged_dir (str or Path): a ``merged_int4/`` directory.

    Yields:
        Tuple[str, MergedLinearWeight or torch.Tensor]: quantized linears as
        :class:`MergedLinearWeight`, everything else as the stored dense tensor.

    Raises:
        FileNotFoundError: if the weight files are missing.
        TypeError: for a tensor subclass this reader does not know.
    """
    for path in merged_weight_files(merged_dir):
        for key, value in _read_file(path):
            yield key, _plain(key, value)


def _read_file(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        torchao_flattened = "tensor_names" in (handle.metadata() or {})
        if not torchao_flattened:  # a plain safetensors file
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    if torchao_flattened:
        yield from read_torchao_safetensors(path)


def _plain(key: str, value: torch.Tensor) -> MergedWeight:
    if is_plain_int4(value):
        return MergedLinearWeight(from_plain_int4(value), value.shape[1], "Int4Tensor")
    if is_intx_weight(value):
        return MergedLinearWeight(from_torchao_intx(value), value.shape[1], "IntxUnpackedToInt8Tensor")
    if is_int4_weight(value):
        gq = from_torchao_int4(value)
        return MergedLinearWeight(gq, value.shape[1], type(value).__name__)
    if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
        raise TypeError(
            f"{key} is stored as {type(value).__name__}, which the merged-model reader "
            "does not know; re-export the merged model with this version of qalora-tune"
        )
    return value
