"""How a merged model's quantized linears are written, and where each format runs.

| ``merged_format`` | torchao class in the file | runs without qalora-tune | bits/weight (G=64, bf16) |
|---|---|---|---|
| ``intx`` | ``IntxUnpackedToInt8Tensor`` (int8 codes, fp32 scale and zero point) | any device: stock torchao dequantizes | 9.0 |
| ``int4_tile_packed`` | ``Int4TilePackedTo4dTensor`` (tinygemm layout, bf16) | CUDA sm80+ (PyTorch's tinygemm kernel) | 4.5 |
| ``int4_plain`` | ``Int4Tensor`` (two codes per byte) | CUDA with fbgemm-gpu-genai; elsewhere through ``qalora_tune.load_merged`` | 4.5 |

``zero_table`` (``qalora_merge`` only) writes no model: a *task package* of the merged zero
points, 16/G bits per weight in bf16 (64/G from an ``intx`` base, whose zeros it keeps exactly
as float64 ``z = -zp * s``), with the fingerprint of the base's codes and scales
(:mod:`qalora_tune.tasks`); the task-free base is written once in the ``auto`` format.

``auto`` (the default) picks a format that runs, without this package, where the model was
trained: ``int4_tile_packed`` on a CUDA GPU for bases on the int4 kernels, ``intx``
everywhere else. ``qalora_tune.load_merged`` reads all three and repacks them for the
device's int4 kernel. Every format keeps the codes and scales; the merged zero points are
written in the file's convention (``intx`` stores torchao's ``zp = -z / s`` in fp32,
``int4_tile_packed`` rounds to bf16), the only rounding a format adds.
"""

from typing import Any, Dict, List, Tuple

import torch

from qalora_tune._compat import (
    Int4PackingFormat,
    Int4Tensor,
    Int4TilePackedTo4dTensor,
    Int4WeightOnlyConfig,
    IntxUnpackedToInt8Tensor,
    IntxWeightOnlyConfig,
    MappingType,
    PerGroup,
    config_to_dict,
)
from qalora_tune.errors import UserValueError
from qalora_tune.modules import QuantizedLinear
from qalora_tune.quantization.base_weight import (
    from_torchao_base,
    to_base,
    uses_int4_kernel,
)
from qalora_tune.quantization.cpu_int4_blocks import cpu_int4_to_plain_int4, plain_int4_to_cpu_int4
from qalora_tune.quantization.group_quant import GroupQuantizedWeight
from qalora_tune.quantization.int4_weight import (
    CpuInt4Tensor,
    as_int4_base,
    from_torchao_int4,
    tinygemm_int4,
    with_dense_scales,
)
from qalora_tune.quantization.intx_weight import (
    as_intx_base,
    as_stock_intx,
    from_torchao_intx,
    is_intx_weight,
    reorder_intx_rows,
    to_torchao_intx,
)
from qalora_tune.quantization.plain_int4 import (
    from_plain_int4,
    plain_int4_bytes,
    to_plain_int4,
)

__all__ = [
    "MERGED_FORMATS",
    "MERGE_OUTPUT_FORMATS",
    "TASK_FORMAT",
    "RUNS_ON",
    "base_from_file",
    "file_weight_nbytes",
    "is_file_base",
    "choose_merged_format",
    "portable_weight",
    "quantization_config",
    "written_bits",
]

MERGED_FORMATS = ("auto", "intx", "int4_tile_packed", "int4_plain", "gguf")
"""Values of ``merged_format``; ``gguf`` writes the ``auto`` format plus ``model.gguf``."""

TASK_FORMAT = "zero_table"
MERGE_OUTPUT_FORMATS = MERGED_FORMATS + (TASK_FORMAT,)
"""Values of ``qalora_merge``'s ``merged_format``: a model format, or ``zero_table``."""

RUNS_ON = {
    "intx": "any device with stock torch + torchao + transformers (dequantizing)",
    "int4_tile_packed": "CUDA sm80+ with stock torch + torchao + transformers (tinygemm)",
    "int4_plain": "CUDA with fbgemm-gpu-genai (stock), or anywhere through qalora_tune.load_merged",
}

PADDED_RUNS_ON = "only through qalora_tune.load_merged (partial last groups; stock loading refuses it)"


def runs_on(merged_format: str, model: torch.nn.Module) -> str:
    """Where a merged file of ``merged_format`` written from ``model`` runs (one line)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if merged_format == "int4_plain" and any(m.padded_in_dim != m.in_dim for m in layers):
        return PADDED_RUNS_ON
    return RUNS_ON[merged_format]


def choose_merged_format(requested: str, model: torch.nn.Module, device: torch.device) -> str:
    """The file format of ``requested`` (``auto`` resolved) for ``model``'s linears.

    Raises:
        UserValueError: for an unknown name, or a format the model's bases cannot take
            (int4 formats need bits <= 4 and a group size of the int4 kernels; formats
            other than ``int4_plain`` need linears whose ``in_dim`` the group size divides).
    """
    if requested == TASK_FORMAT:
        raise UserValueError(
            f"merged_format={TASK_FORMAT} writes a task package, which only qalora_merge "
            f"writes (tune run qalora_merge ... merged_format={TASK_FORMAT}); set merged_format "
            f"to one of {', '.join(MERGED_FORMATS)}"
        )
    if requested not in MERGED_FORMATS:
        raise UserValueError(
            f"merged_format={requested!r} is not a merged format; set merged_format to one of "
            f"{', '.join(MERGED_FORMATS)}"
        )
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise UserValueError("the model has no quantized linear layers to write")
    int4 = all(uses_int4_kernel(m.bits, m.group_size) for m in layers)
    padded = any(m.padded_in_dim != m.in_dim for m in layers)
    chosen = requested
    if requested in ("auto", "gguf"):
        if padded and int4:
            chosen = "int4_plain"  # the only layout with a partial last group
        elif int4 and device.type == "cuda":
            chosen = "int4_tile_packed"
        else:
            chosen = "intx"
    check_format_holds(chosen, layers)
    return chosen


def check_format_holds(merged_format: str, layers: List[QuantizedLinear]) -> None:
    """Refuse a resolved ``merged_format`` that cannot hold ``layers``' bases.

    Raises:
        UserValueError: int4 formats for intx bases, or a format other than ``int4_plain``
            for linears padded to whole groups.
    """
    int4 = all(uses_int4_kernel(m.bits, m.group_size) for m in layers)
    if merged_format in ("int4_tile_packed", "int4_plain") and not int4:
        raise UserValueError(
            f"merged_format={merged_format} holds int4 kernel bases (bits <= 4, group_size 32/64/128/"
            "256); this model's base is stored as intx: set merged_format=intx"
        )
    if merged_format != "int4_plain" and any(m.padded_in_dim != m.in_dim for m in layers):
        raise UserValueError(
            f"merged_format={merged_format} cannot hold linears padded to whole groups "
            "(model.pad_in_dim=True with a group size that does not divide in_dim); set "
            "merged_format=int4_plain (qalora_tune.load_merged reads it anywhere; int4 bases "
            "only), or train with a model.group_size that divides every linear"
        )


PADDED_INT4_CONFIG_TYPE = "NeedsQaloraTune_LoadWith_qalora_tune_load_merged_PaddedLastGroup"
"""``_type`` written for a plain file with partial last groups, which no stock torchao
kernel runs: stock ``from_pretrained`` then stops at once with a line naming it."""


def quantization_config(
    merged_format: str, group_size: int, bits: int, padded: bool = False
) -> Dict[str, Any]:
    """``config.json``'s ``quantization_config``: what transformers' ``TorchAoConfig``
    writes for this format, so stock ``from_pretrained`` builds the right torchao class.

    A padded ``int4_plain`` file (partial last groups) gets an unknown ``_type`` instead,
    :data:`PADDED_INT4_CONFIG_TYPE`: torchao's config reader refuses it in one line
    naming ``qalora_tune.load_merged``, rather than a kernel error at the first forward.
    """
    if merged_format == "intx":
        config = IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"),
            granularity=PerGroup(group_size),
            mapping_type=MappingType.ASYMMETRIC,
        )
    else:
        packing = (
            Int4PackingFormat.TILE_PACKED_TO_4D
            if merged_format == "int4_tile_packed"
            else Int4PackingFormat.PLAIN
        )
        config = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=packing)
    quant_type = config_to_dict(config)
    if padded and merged_format == "int4_plain":
        quant_type["_type"] = PADDED_INT4_CONFIG_TYPE
    return {
        "quant_method": "torchao",
        "quant_type": {"default": quant_type},
        "modules_to_not_convert": None,
        "include_input_output_embeddings": False,
        "untie_embedding_weights": False,
    }


def portable_weight(
    module: QuantizedLinear, rows: torch.Tensor, merged_format: str
) -> Tuple[torch.Tensor, int]:
    """``module``'s weight in ``merged_format``'s torchao class (torchao's own, which files
    and stock loaders take), rows in the order ``rows``, on CPU; and its bytes."""
    if merged_format == "intx" and is_intx_weight(module.weight):
        intx = as_stock_intx(reorder_intx_rows(module.weight, rows, device="cpu"))
        return intx, _bytes(intx.qdata, intx.scale, intx.zero_point)
    if merged_format == "int4_plain" and isinstance(module.weight, CpuInt4Tensor):
        # the same bits without whole-weight temporaries: a block of rows at a time
        plain = cpu_int4_to_plain_int4(
            with_dense_scales(module.weight), rows.cpu(), in_features=module.in_dim
        )
        return plain, plain_int4_bytes(plain)
    if merged_format == "intx" and isinstance(module.weight, CpuInt4Tensor):
        intx = _intx_from_cpu_int4(module, rows)
        return intx, _bytes(intx.qdata, intx.scale, intx.zero_point)
    gq = _permute_rows(from_torchao_base(module.weight), rows)
    if merged_format == "intx":
        intx = _intx_with_float32_grid(gq, module.weight.dtype)
        return intx, _bytes(intx.qdata, intx.scale, intx.zero_point)
    if merged_format == "int4_tile_packed":
        tile = tinygemm_int4(gq.as_int4(), "cpu", torch.bfloat16)
        stock = Int4TilePackedTo4dTensor(
            tile.qdata, tile.scale_and_zero, list(tile.block_size), tile.shape
        )
        return stock, _bytes(stock.qdata, stock.scale_and_zero)
    plain = to_plain_int4(gq, in_features=module.in_dim)
    return plain, plain_int4_bytes(plain)


def written_bits(module: QuantizedLinear, merged_format: str) -> int:
    """The code width the file declares: an int4 kernel base is written as 4-bit codes
    (narrower grids are a subset of them), an intx base keeps its own."""
    return module.bits if is_intx_weight(module.weight) else 4


def _intx_with_float32_grid(gq: GroupQuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """torchao's ``IntxUnpackedToInt8Tensor`` of an int4 base, computing in ``dtype`` with
    its scale and zero point kept in fp32: the zero point ``-z / s`` then rounds once in
    fp32 (in bf16 it would move each group by up to 1/32 of a step)."""
    intx = to_torchao_intx(
        GroupQuantizedWeight(gq.qdata, gq.scale.float(), gq.zero.float(), gq.group_size, gq.bits),
        device="cpu", dtype=torch.float32,
    )
    return IntxUnpackedToInt8Tensor(
        qdata=intx.qdata, scale=intx.scale, zero_point=intx.zero_point,
        target_dtype=intx.target_dtype, block_size=tuple(intx.block_size), dtype=dtype,
        activation_quantization=None,
    )


def _intx_from_cpu_int4(module: QuantizedLinear, rows: torch.Tensor) -> torch.Tensor:
    """:func:`_intx_with_float32_grid` of a CPU int4 kernel weight, bit for bit, without
    whole-weight temporaries: the weight is first repacked to the plain layout a block of
    rows at a time, whose signed nibbles ``q - 8`` are intx's int4 codes, then unpacked a
    block of rows at a time into the int8 codes (peak: the output and one block)."""
    plain = cpu_int4_to_plain_int4(
        with_dense_scales(module.weight), rows.cpu(), in_features=module.in_dim
    )
    n, k = plain.shape
    codes = torch.empty(n, k, dtype=torch.int8)
    step = max(1, (1 << 22) // k)
    for start in range(0, n, step):
        packed = plain.qdata[start : start + step]
        low, high = (packed << 4) >> 4, packed >> 4  # arithmetic shifts sign-extend
        codes[start : start + step] = torch.stack((low, high), dim=-1).flatten(-2)[:, :k]
    scale = plain.scale.t().float().contiguous()
    zero_point = (-plain.zero_point.t().double() / scale.double()).float().contiguous()
    return IntxUnpackedToInt8Tensor(
        qdata=codes, scale=scale, zero_point=zero_point, target_dtype=torch.int4,
        block_size=(1, plain.block_size[-1]), dtype=module.weight.dtype,
        activation_quantization=None,
    )


def _permute_rows(gq: GroupQuantizedWeight, rows: torch.Tensor) -> GroupQuantizedWeight:
    rows = rows.to(gq.qdata.device)
    return GroupQuantizedWeight(
        qdata=gq.qdata[rows].cpu(), scale=gq.scale[rows].cpu(), zero=gq.zero[rows].cpu(),
        group_size=gq.group_size, bits=gq.bits,
    )


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def file_weight_nbytes(tensor: torch.Tensor) -> int:
    """Bytes a quantized linear of a file format takes: codes, scales and zero points."""
    if isinstance(tensor, Int4Tensor):
        return plain_int4_bytes(tensor)
    if isinstance(tensor, Int4TilePackedTo4dTensor):
        return _bytes(tensor.qdata, tensor.scale_and_zero)
    return _bytes(tensor.qdata, tensor.scale, tensor.zero_point)


def is_file_base(tensor: torch.Tensor) -> bool:
    """Whether a tensor read from a merged file is a quantized linear (any format)."""
    return isinstance(tensor, (Int4Tensor, Int4TilePackedTo4dTensor, IntxUnpackedToInt8Tensor))


def base_from_file(
    tensor: torch.Tensor,
    rows: torch.Tensor,
    module: QuantizedLinear,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A quantized linear read from a file, rows reordered by ``rows``, in the storage
    ``module`` computes with on ``device`` (the int4 kernel class for its device, or intx).

    The codes and scales are the file's; an int4 file's zeros are copied, an intx file's
    ``zp`` converted back to ``z = -zp * s`` in float64 and rounded once.
    """
    if isinstance(tensor, IntxUnpackedToInt8Tensor) and not module.config.uses_int4_kernel:
        return as_intx_base(reorder_intx_rows(tensor, rows, device=device, dtype=dtype))
    if isinstance(tensor, Int4Tensor):
        if device.type == "cpu" and module.config.uses_int4_kernel and not module.double_quant_scales:
            # the same bits without whole-weight temporaries: a block of rows at a time
            return plain_int4_to_cpu_int4(tensor, dtype, rows, module.padded_in_dim)
        gq = from_plain_int4(tensor, module.padded_in_dim)
    elif isinstance(tensor, IntxUnpackedToInt8Tensor):
        gq = from_torchao_intx(tensor)
    else:
        gq = from_torchao_int4(as_int4_base(tensor))
    return to_base(_permute_rows(gq, rows), device=device, dtype=dtype)
