"""Dense matmuls against a CPU-packed int4 weight, dequantized a few row blocks at a time.

The CPU int4 kernel has no fast fp32 path and no transposed product (the input gradient
``grad @ W``), so both go through a dequantized weight. Dequantizing the whole
``(N, K)`` weight at once is slow: a freshly allocated buffer of ``4 N K`` bytes is
page-faulted in on every call, and each elementwise pass runs from main memory. Here
``W^T`` is rebuilt in chunks of about ``_CHUNK_ELEMENTS`` weights into one buffer that
stays in cache, and each chunk is consumed by a BLAS matmul right away:

    x @ W^T:   y^T[rows] = chunk^T @ x^T        grad @ W:   grad_x += grad[:, rows] @ chunk^T

A chunk of row blocks is built from the packed bytes with out= ops over contiguous
memory (no allocation per chunk), then each block is multiplied on its own,
with the same arithmetic as :func:`~qalora_tune.quantization.dequantize_packed`,
``(q - 8) * s + z`` in fp32, so the result is bit-identical to it. For bf16/fp16 weights
the chunk is rounded once to that dtype and the products still run in fp32 (as a bf16
GEMM accumulates), with one rounding of the result. The packed layout (``cpu_int4_layout``) stores row blocks of
``block_n`` rows as ``(K, block_n / 2)`` bytes, so a run of whole blocks is a contiguous
slice: in a full block of a lane layout byte column ``c`` holds row ``c`` (low nibble) and
row ``c + block_n / 2`` (high nibble); in plain pair blocks it holds rows ``2c`` and
``2c + 1``.
"""

from typing import Iterator, Tuple

import torch

from qalora_tune.quantization.cpu_int4_layout import cpu_int4_layout

__all__ = ["chunked_int4_grad_input", "chunked_int4_linear"]

# weights per chunk: 2^19 fp32 values (2 MiB) fit the L2/L3 caches of current x86 cores
_CHUNK_ELEMENTS = 1 << 19


class _ChunkDequantizer:
    """Rebuilds ``W^T[:, rows]`` for runs of packed row blocks, into reused buffers."""

    def __init__(
        self,
        qdata: torch.Tensor,
        scale_and_zero: torch.Tensor,
        group_size: int,
        in_features: int,
        dtype: torch.dtype,
    ):
        layout = cpu_int4_layout()
        self.k = in_features
        self.group_size = group_size
        self.n_groups = in_features // group_size
        self.n_rows = qdata.shape[0]
        self.block_n = layout.block_n
        self.halves = layout.lanes > 1
        self.packed = qdata.reshape(-1)
        self._scale_and_zero = scale_and_zero[: self.n_groups]
        self.dtype = dtype
        self.blocks_per_chunk = max(1, _CHUNK_ELEMENTS // (in_features * self.block_n))
        size = in_features * min(self.blocks_per_chunk * self.block_n, self.n_rows)
        self._codes = torch.empty(size, dtype=torch.uint8)
        self._fp32 = torch.empty(size, dtype=torch.float32)
        self._rounded = None if dtype == torch.float32 else torch.empty(size, dtype=dtype)

    def chunks(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """Yield ``(row_start, row_end, W^T[:, row_start:row_end])`` for each row block, in order.

        The yielded ``(K, rows)`` fp32 tensor (holding values of the compute dtype) is a
        view of a buffer that later blocks overwrite.
        """
        n_full = self.n_rows // self.block_n
        step = self.blocks_per_chunk
        for first in range(0, n_full, step):
            count = min(step, n_full - first)
            start = first * self.block_n
            blocks = self._dequantize(start, count, self.block_n, self.halves)
            for index in range(count):
                block_start = start + index * self.block_n
                yield block_start, block_start + self.block_n, blocks[index]
        tail = self.n_rows - n_full * self.block_n
        if tail:
            start = n_full * self.block_n
            yield start, self.n_rows, self._dequantize(start, 1, tail, False)[0]

    def _dequantize(self, start: int, blocks: int, rows: int, halves: bool) -> torch.Tensor:
        """``W^T`` of ``blocks`` row blocks of ``rows`` rows from ``start``: ``(blocks, K, rows)``."""
        k, half = self.k, rows // 2
        width = blocks * rows
        packed = self.packed[start * k // 2 : (start + width) * k // 2].view(blocks, k, half)
        # written in the packed order, so that every pass runs over contiguous memory
        codes = self._codes[: k * width].view(blocks, k, rows)
        if halves and half % 4 == 0:
            _unpack_halves_by_word(packed, codes)
        else:
            low = codes[..., :half] if halves else codes[..., 0::2]
            high = codes[..., half:] if halves else codes[..., 1::2]
            torch.bitwise_and(packed, 15, out=low)
            torch.bitwise_right_shift(packed, 4, out=high)
        signed = codes.view(torch.int8)
        signed.sub_(8)  # q - 8, exact in int8
        g, n_groups = self.group_size, self.n_groups
        # scales and zeros of row start + b * rows + r, group j, at [b, j, 0, r]
        # (scale_and_zero interleaves them: copied to unit stride, so the passes vectorize)
        scale = self._scale_and_zero[:, start : start + width, 0]
        zero = self._scale_and_zero[:, start : start + width, 1]
        scale = scale.reshape(n_groups, blocks, rows).transpose(0, 1).float().contiguous()
        zero = zero.reshape(n_groups, blocks, rows).transpose(0, 1).float().contiguous()
        dense = self._fp32[: k * width].view(blocks, n_groups, g, rows)
        dense.copy_(signed.view(blocks, n_groups, g, rows))
        dense.mul_(scale.unsqueeze(2))
        dense.add_(zero.unsqueeze(2))
        if self._rounded is not None:  # values of the compute dtype, kept in fp32
            rounded = self._rounded[: k * width]
            rounded.copy_(dense.view(-1))
            dense.view(-1).copy_(rounded)
        return dense.view(blocks, k, rows)


def _unpack_halves_by_word(packed: torch.Tensor, codes: torch.Tensor) -> None:
    """Low nibbles to ``codes[..., :half]``, high nibbles to ``codes[..., half:]``.

    Four bytes at a time: in a 32-bit word ``w`` of packed bytes, ``w & 0x0F0F0F0F`` holds
    each byte's low nibble in place and ``(w >> 4) & 0x0F0F0F0F`` each byte's high nibble
    (the bits shifted in from the next byte are masked off).
    """
    half = packed.shape[-1]
    words = packed.view(torch.int32)
    codes_words = codes.view(torch.int32)
    low, high = codes_words[..., : half // 4], codes_words[..., half // 4 :]
    torch.bitwise_and(words, 0x0F0F0F0F, out=low)
    torch.bitwise_right_shift(words, 4, out=high)
    high.bitwise_and_(0x0F0F0F0F)


def chunked_int4_linear(
    x2d: torch.Tensor,
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    """``x @ W^T`` for a CPU-packed int4 weight, computed in fp32, returned in ``x2d.dtype``.

    Args:
        x2d (torch.Tensor): ``(M, K)`` contiguous.
        qdata (torch.Tensor): ``(N_pad, K / 2)`` uint8 in the CPU kernel's layout.
        scale_and_zero (torch.Tensor): ``(n_groups_pad, N_pad, 2)``.
        group_size (int): quantization group size.
        out_features (int): ``N``; rows beyond it are padding.

    Returns:
        torch.Tensor: ``(M, out_features)``, contiguous.
    """
    chunks = _ChunkDequantizer(qdata, scale_and_zero, group_size, x2d.shape[1], x2d.dtype)
    x_t = x2d.float().t()
    out_t = x_t.new_empty(out_features, x2d.shape[0])
    for start, end, weight_t in chunks.chunks():
        end = min(end, out_features)
        if start >= end:
            break
        torch.mm(weight_t[:, : end - start].t(), x_t, out=out_t[start:end])
    return out_t.t().contiguous().to(x2d.dtype)


def chunked_int4_grad_input(
    grad2d: torch.Tensor,
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``grad @ W`` for a CPU-packed int4 weight, in ``grad2d.dtype``.

    Args:
        grad2d (torch.Tensor): ``(M, N)``, gradient of the layer output.
        qdata (torch.Tensor): ``(N_pad, K / 2)`` uint8 in the CPU kernel's layout.
        scale_and_zero (torch.Tensor): ``(n_groups_pad, N_pad, 2)``.
        group_size (int): quantization group size.
        in_features (int): ``K``.

    Returns:
        torch.Tensor: ``(M, in_features)`` in ``grad2d.dtype``, accumulated in fp32.
    """
    out_features = grad2d.shape[1]
    chunks = _ChunkDequantizer(qdata, scale_and_zero, group_size, in_features, grad2d.dtype)
    grad_fp32 = grad2d.float()
    grad_input = grad_fp32.new_zeros(grad2d.shape[0], in_features)
    for start, end, weight_t in chunks.chunks():
        end = min(end, out_features)
        if start >= end:
            break
        grad_input.addmm_(grad_fp32[:, start:end], weight_t[:, : end - start].t())
    return grad_input.to(grad2d.dtype)
