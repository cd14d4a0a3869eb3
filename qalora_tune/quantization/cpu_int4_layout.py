"""Unpacking of the CPU int4 kernel's weight layout.

``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` shuffles the ``(N, K)`` int4 codes
into an ISA-dependent layout (see ``aten/src/ATen/native/cpu/int4mm_kernel.cpp``): rows
are cut into blocks of ``block_n`` rows; block ``b`` holds, for every ``k``, its
``block_n`` codes in ``block_n / 2`` bytes. A full block interleaves its rows in lanes of
16 (AVX512: 64 rows in 4 lanes; AVX2: 32 rows in 2 lanes); a partial last block and the
non-vectorized build store plain (even, odd) row pairs. The layout is detected once by
packing a probe, so an unknown layout fails loudly instead of unpacking garbage.

torchao's ``Int4OpaqueTensor`` keeps this layout opaque and cannot dequantize; QA-LoRA needs
the codes for the input gradient, device moves and serialization.
"""

from typing import NamedTuple

import torch

from qalora_tune._compat import cpu_int4pack

__all__ = ["CpuInt4Layout", "cpu_int4_layout", "pack_cpu_int4", "unpack_cpu_int4"]

PACK_ROW_MULTIPLE = 16


class CpuInt4Layout(NamedTuple):
    """How a full block of rows is laid out.

    Attributes:
        block_n (int): rows per block.
        lanes (int): lanes of 16 rows interleaved in a full block (1 means plain pairs).
    """

    block_n: int
    lanes: int


_CANDIDATES = (CpuInt4Layout(64, 4), CpuInt4Layout(32, 2), CpuInt4Layout(32, 1))


def _pack_with_op(q: torch.Tensor) -> torch.Tensor:
    return cpu_int4pack(q.to(torch.int32).contiguous())


def pack_cpu_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack codes of shape ``(N, K)`` (values in [0, 15], N a multiple of 16) for the CPU kernel.

    Written as tensor ops over uint8 codes for the layout this build uses (the inverse of
    :func:`unpack_cpu_int4`): about 3x faster than PyTorch's packing op, which also wants
    int32 codes (4 bytes per code). At import the two are compared on a probe; if they
    differ, the op is used.
    """
    if not _PACK_WITH_TENSOR_OPS:
        return _pack_with_op(q)
    return _pack_with(q.to(torch.uint8), _LAYOUT)


def _pack_with(q: torch.Tensor, layout: "CpuInt4Layout") -> torch.Tensor:
    n, k = q.shape
    n_full = n // layout.block_n
    out = torch.empty(n * k // 2, dtype=torch.uint8, device=q.device)
    split = n_full * layout.block_n * k // 2
    if n_full:
        full = q[: n_full * layout.block_n].view(n_full, layout.block_n, k).transpose(1, 2)
        if layout.lanes == 1:  # rows (2j, 2j + 1) in (low, high) nibbles
            full = full.reshape(n_full, k, layout.block_n // 2, 2)
            low, high = full[..., 0], full[..., 1]
        else:  # lanes of 16 rows: the first half in the low nibbles, the rest in the high
            full = full.reshape(n_full, k, layout.lanes, 16)
            half = layout.lanes // 2
            low, high = full[:, :, :half], full[:, :, half:]
        out[:split].view(n_full, k, -1).copy_((low | (high << 4)).reshape(n_full, k, -1))
    tail = n - n_full * layout.block_n
    if tail:  # a partial block: plain row pairs
        pairs = q[n_full * layout.block_n:].t().reshape(k, tail // 2, 2)
        out[split:].view(k, tail // 2).copy_(pairs[..., 0] | (pairs[..., 1] << 4))
    return out.view(n, k // 2)


def _unpack_pairs(block: torch.Tensor, n_rows: int, k: int) -> torch.Tensor:
    # block: (n_blocks, K, n_rows / 2) bytes holding rows (2j, 2j + 1) in (low, high) nibbles
    low, high = block & 0xF, block >> 4
    codes = torch.stack([low, high], dim=-1).reshape(-1, k, n_rows)
    return codes.transpose(1, 2).reshape(-1, k)


def _unpack_lanes(block: torch.Tensor, layout: CpuInt4Layout, k: int) -> torch.Tensor:
    # block: (n_blocks, K, block_n / 2) bytes; byte column (h, d) holds row h*16 + d in its
    # low nibble and row (h + lanes/2)*16 + d in its high nibble
    half = layout.lanes // 2
    block = block.reshape(-1, k, half, 16)
    codes = torch.cat([block & 0xF, block >> 4], dim=2)  # (n_blocks, K, lanes, 16)
    codes = codes.reshape(-1, k, layout.block_n)
    return codes.transpose(1, 2).reshape(-1, k)


def _unpack_with(
    packed: torch.Tensor, n: int, k: int, layout: CpuInt4Layout
) -> torch.Tensor:
    flat = packed.reshape(-1)
    n_full = n // layout.block_n
    split = n_full * layout.block_n * k // 2
    parts = []
    if n_full:
        full = flat[:split].reshape(n_full, k, layout.block_n // 2)
        if layout.lanes == 1:
            parts.append(_unpack_pairs(full, layout.block_n, k))
        else:
            parts.append(_unpack_lanes(full, layout, k))
    tail = n - n_full * layout.block_n
    if tail:
        parts.append(_unpack_pairs(flat[split:].reshape(1, k, tail // 2), tail, k))
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def _detect_layout() -> CpuInt4Layout:
    generator = torch.Generator().manual_seed(0)
    # explicit device: importing under torch.device("meta"/"cuda") must still probe the CPU
    probe = torch.randint(
        0, 16, (112, 4), generator=generator, dtype=torch.int32, device="cpu"
    )
    packed = _pack_with_op(probe)
    for layout in _CANDIDATES:
        if torch.equal(_unpack_with(packed, 112, 4, layout).to(torch.int32), probe):
            return layout
    raise RuntimeError(
        "unrecognised CPU int4 weight layout from "
        "aten._convert_weight_to_int4pack_for_cpu; this PyTorch build is not supported"
    )


def _tensor_ops_pack_like_the_op(layout: CpuInt4Layout) -> bool:
    generator = torch.Generator().manual_seed(1)
    for rows in (112, 16, 192):  # a partial block, a lone partial block, whole blocks
        probe = torch.randint(0, 16, (rows, 8), generator=generator, dtype=torch.int32, device="cpu")
        if not torch.equal(_pack_with(probe.to(torch.uint8), layout), _pack_with_op(probe)):
            return False
    return True


# Detected at import: outside any tracing, and the unpack below stays a pure function.
_LAYOUT = _detect_layout()
_PACK_WITH_TENSOR_OPS = _tensor_ops_pack_like_the_op(_LAYOUT)


def cpu_int4_layout() -> CpuInt4Layout:
    """The layout this build of PyTorch packs with (found by round-tripping a probe)."""
    return _LAYOUT


def unpack_cpu_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Invert :func:`pack_cpu_int4`.

    Args:
        packed (torch.Tensor): packed codes of shape ``(N, K / 2)``, dtype uint8.
        n (int): packed rows ``N`` (a multiple of 16).
        k (int): input dimension ``K``.

    Returns:
        torch.Tensor: codes of shape ``(N, K)``, dtype uint8.
    """
    return _unpack_with(packed, n, k, _LAYOUT)
