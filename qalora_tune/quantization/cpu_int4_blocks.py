"""CPU int4 kernel weights built a block of rows at a time.

Quantizing a full-precision weight and packing it for the CPU kernel, the general way
(:func:`~qalora_tune.quantization.quantize_rtn` then
:func:`~qalora_tune.quantization.to_torchao_int4`), makes a float32 copy of the whole weight,
several float32 temporaries, uint8 codes and an int32 copy of them for the packing op: for
Llama 3's 128256 x 4096 output projection about 8 GB in flight, and slow passes over memory.
Here the same arithmetic runs on blocks of rows (a few MB each): every temporary is a
block's, the float32 work is done in place, and each block is packed into its slice of the
result. The CPU packing lays rows out in blocks of 64 (AVX512) or 32 (AVX2) rows, with only
the last, partial block stored differently, so packing row blocks that start at multiples
of 64 and concatenating them gives the bytes of packing the whole weight: the result is
bit-identical to the general path (tested), only faster and with bounded memory.

The same holds for repacking a stored plain-layout ``Int4Tensor`` (a merged model being
loaded) for the kernel, :func:`plain_int4_to_cpu_int4`, and for the way back when a merged
model is exported, :func:`cpu_int4_to_plain_int4`.
"""

from typing import Optional

import torch

from qalora_tune._compat import (
    Int4Tensor,
    pack_tinygemm_scales_and_zeros,
    unpack_tinygemm_scales_and_zeros,
)
from qalora_tune.quantization.int4_weight import CpuInt4Tensor
from qalora_tune.quantization.cpu_int4_layout import (
    PACK_ROW_MULTIPLE,
    cpu_int4_layout,
    pack_cpu_int4,
    unpack_cpu_int4,
)

__all__ = [
    "BLOCK_BYTES",
    "cpu_int4_to_plain_int4",
    "plain_int4_to_cpu_int4",
    "quantize_rtn_to_cpu_int4",
]

BLOCK_BYTES = 16 << 20
"""float32 bytes of one block of rows (the working set of a step)."""
_ROW_ALIGN = 64  # the widest row block of the CPU packing (AVX512)
_MID = 8
_EPS = 1e-6  # quantize_rtn's smallest scale


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _rows_per_block(columns: int) -> int:
    return max(_ROW_ALIGN, BLOCK_BYTES // (4 * columns) // _ROW_ALIGN * _ROW_ALIGN)


def _pack_block(codes: torch.Tensor) -> torch.Tensor:
    return pack_cpu_int4(codes)


@torch.no_grad()
def quantize_rtn_to_cpu_int4(
    weight: torch.Tensor,
    group_size: int,
    bits: int = 4,
    dtype: Optional[torch.dtype] = None,
    padded_in_features: Optional[int] = None,
) -> CpuInt4Tensor:
    """``to_torchao_int4(quantize_rtn(weight_padded, group_size, bits), "cpu", dtype)``,
    a block of rows at a time.

    Args:
        weight (torch.Tensor): full-precision ``(out_dim, in_dim)`` weight on the CPU.
        group_size (int): 32, 64, 128 or 256.
        bits (int): 2, 3 or 4 (stored as int4 codes with the same values).
        dtype (torch.dtype, optional): of the scales and zeros; default dtype if unset.
        padded_in_features (int, optional): zero columns appended up to this width
            (``pad_in_dim`` layers); a multiple of ``group_size``.

    Returns:
        CpuInt4Tensor: of shape ``(out_dim, padded_in_features or in_dim)``.
    """
    dtype = dtype or torch.get_default_dtype()
    n, k = weight.shape
    k_pad = padded_in_features or k
    groups = k_pad // group_size
    n_pad = _round_up(n, PACK_ROW_MULTIPLE)
    qmax = 2**bits - 1
    mid = (qmax + 1) / 2  # torchao's tinygemm midpoint
    shift = _MID - 2 ** (bits - 1)  # narrower codes sit at the int4 codes of equal value
    packed = torch.empty(n_pad, k_pad // 2, dtype=torch.uint8)
    scale = torch.zeros(n_pad, groups, dtype=torch.float32)
    zero = torch.zeros(n_pad, groups, dtype=torch.float32)
    step = _rows_per_block(k_pad)
    buffer = torch.empty(min(step, n_pad), k_pad, dtype=torch.float32)  # reused by every block
    for start in range(0, n_pad, step):
        stop = min(start + step, n_pad)
        real = max(0, min(stop, n) - start)
        block = buffer[: stop - start]
        block[:real, :k] = weight[start:start + real]
        block[:real, k:] = 0.0  # padded columns quantize as zeros
        x = block[:real].view(real, groups, group_size)
        low, high = x.amin(dim=-1), x.amax(dim=-1)
        s = ((high - low) / float(qmax)).clamp_(min=_EPS)
        z = low + s * mid
        offset = z - s * mid
        x.sub_(offset.unsqueeze(-1)).div_(s.unsqueeze(-1)).round_().clamp_(0, qmax)
        if shift:
            x.add_(shift)
        block[real:] = _MID  # rows past out_dim (the packing's padding): code 8, zero scale
        packed[start:stop] = _pack_block(block)
        scale[start:start + real] = s
        zero[start:start + real] = z
    return CpuInt4Tensor(
        qdata=packed,
        scale_and_zero=pack_tinygemm_scales_and_zeros(scale.to(dtype), zero.to(dtype), dtype),
        block_size=[1, group_size],
        shape=torch.Size([n, k_pad]),
    )


@torch.no_grad()
def plain_int4_to_cpu_int4(
    weight: Int4Tensor,
    dtype: torch.dtype,
    rows: Optional[torch.Tensor] = None,
    padded_in_features: Optional[int] = None,
) -> CpuInt4Tensor:
    """A plain-layout ``Int4Tensor`` repacked for the CPU kernel, a block of rows at a
    time: ``to_torchao_int4(from_plain_int4(weight, padded_in_features)[rows], "cpu",
    dtype)`` without the whole-weight temporaries.

    Args:
        weight (Int4Tensor): 2D, ``block_size`` ``[1, G]`` with ``G`` an int4 kernel group
            size, on the CPU.
        dtype (torch.dtype): of the scales and zeros (and the kernel's compute).
        rows (torch.Tensor, optional): take the rows in this order (a permutation).
        padded_in_features (int, optional): pad the columns with zero-offset codes to
            this width (default: a whole number of groups).

    Returns:
        CpuInt4Tensor: of shape ``(out_dim, padded_in_features)``.
    """
    group_size = int(weight.block_size[-1])
    n, k = weight.shape
    groups = -(-k // group_size)
    k_pad = padded_in_features or groups * group_size
    g_pad = k_pad // group_size
    n_pad = _round_up(n, PACK_ROW_MULTIPLE)
    raw = weight.qdata.view(torch.uint8)
    scale = torch.zeros(n_pad, g_pad, dtype=dtype)
    zero = torch.zeros(n_pad, g_pad, dtype=dtype)
    order = rows if rows is not None else torch.arange(n)
    scale[:n, :groups] = weight.scale.t()[order].to(dtype)
    zero[:n, :groups] = weight.zero_point.t()[order].to(dtype)
    packed = torch.empty(n_pad, k_pad // 2, dtype=torch.uint8)
    step = _rows_per_block(k_pad)
    for start in range(0, n_pad, step):
        stop = min(start + step, n_pad)
        real = max(0, min(stop, n) - start)
        codes = torch.full((stop - start, k_pad), _MID, dtype=torch.uint8)
        if real:
            block = raw[order[start:start + real]]
            pairs = codes[:real, : k - k % 2].view(real, -1, 2)
            pairs[..., 0] = (block & 0xF) ^ _MID
            pairs[..., 1] = (block >> 4) ^ _MID
        packed[start:stop] = _pack_block(codes)
    return CpuInt4Tensor(
        qdata=packed,
        scale_and_zero=pack_tinygemm_scales_and_zeros(scale, zero, dtype),
        block_size=[1, group_size],
        shape=torch.Size([n, k_pad]),
    )


@torch.no_grad()
def cpu_int4_to_plain_int4(
    weight: CpuInt4Tensor,
    rows: Optional[torch.Tensor] = None,
    in_features: Optional[int] = None,
) -> Int4Tensor:
    """A CPU int4 kernel weight as a plain-layout ``Int4Tensor``, a block of rows at a
    time: ``to_plain_int4(from_torchao_int4(weight)[rows], in_features)`` without
    whole-weight temporaries (only the packed blocks the rows come from are unpacked).

    Args:
        weight (CpuInt4Tensor): with dense scales, on the CPU.
        rows (torch.Tensor, optional): take the rows in this order (a permutation).
        in_features (int, optional): keep only the first ``in_features`` columns (even).

    Returns:
        Int4Tensor: ``(out_dim, in_features)``, scales and zeros in the weight's dtype.
    """
    n, k_pad = weight.shape
    k = in_features or k_pad
    group_size = int(weight.block_size[-1])
    groups = -(-k // group_size)
    n_pad = weight.qdata.shape[0]
    order = rows if rows is not None else torch.arange(n)
    scale, zero = unpack_tinygemm_scales_and_zeros(weight.scale_and_zero)
    scale = scale.squeeze(-1)[order, :groups].t().contiguous()
    zero = zero.squeeze(-1)[order, :groups].t().contiguous()
    block_n = cpu_int4_layout().block_n
    flat = weight.qdata.reshape(-1)
    qdata = torch.empty(n, k // 2, dtype=torch.uint8)
    step = _rows_per_block(k_pad)
    for start in range(0, n, step):
        wanted = order[start:start + step]
        codes = torch.empty(wanted.numel(), k, dtype=torch.uint8)
        # unpack only the packed blocks these rows sit in, a run of neighbours at a time
        # (the packed rows of a run start at a block boundary, as the packing needs)
        blocks = torch.unique(wanted // block_n).tolist()
        runs, run = [], [blocks[0]]
        for block in blocks[1:]:
            if block == run[-1] + 1:
                run.append(block)
            else:
                runs.append(run)
                run = [block]
        runs.append(run)
        for run in runs:
            first = run[0] * block_n
            last = min(n_pad, (run[-1] + 1) * block_n)
            packed = flat[first * k_pad // 2:last * k_pad // 2].view(last - first, -1)
            unpacked = unpack_cpu_int4(packed, last - first, k_pad)
            inside = (wanted >= first) & (wanted < last)
            codes[inside] = unpacked[wanted[inside] - first, :k]
        codes ^= _MID  # stored as the signed nibble q - 8
        qdata[start:start + wanted.numel()] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return Int4Tensor(
        qdata=qdata.view(torch.int8),
        scale=scale,
        zero_point=zero,
        block_size=[1, group_size],
        shape=torch.Size([n, k]),
    )
