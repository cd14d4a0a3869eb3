"""Dense matmuls against a CPU-packed int4 weight, dequantized a chunk at a time.

The CPU int4 kernel has no fast fp32 path and no transposed product (the input gradient
``grad @ W``), so both go through a dequantized weight. Dequantizing the whole
``(N, K)`` weight at once is slow: a freshly allocated buffer of ``4 N K`` bytes is
page-faulted in on every call, and each elementwise pass runs from main memory. Here the
weight is rebuilt in chunks of about ``_CHUNK_ELEMENTS`` values into buffers that are
reused and stay in cache, and each chunk goes to a BLAS matmul right away; every chunk
gives its own slice of the result, so nothing is accumulated across chunks:

    x @ W^T   (forward):   chunks of rows of W,           y[:, rows] = x @ W^T[:, rows]
    grad @ W  (backward):  chunks of whole groups of K,   grad_x^T[cols] = W^T[cols] @ grad^T

For weights of at least ``_cpu_int4_fused.COMPILED_MIN_ELEMENTS`` values, whole row
blocks are rebuilt by one fused kernel compiled with inductor (``_cpu_int4_fused``),
bit-identical to the eager passes below, in larger chunks (``_COMPILED_CHUNK_ELEMENTS``).
Otherwise, and for a partial last block, chunks are built from the packed bytes with out=
ops only, with the arithmetic of
:func:`~qalora_tune.quantization.dequantize_packed`, ``(q - 8) * s + z`` in fp32, so they
are bit-identical to it; for bf16/fp16 weights the chunk is then rounded once to that
dtype (as the unchunked path did). The packed layout (``cpu_int4_layout``) stores blocks
of ``block_n`` rows as ``(K, block_n / 2)`` bytes: in a full block of a lane layout byte
column ``c`` holds row ``c`` (low nibble) and row ``c + block_n / 2`` (high nibble); in
plain pair blocks (and the partial last block) it holds rows ``2c`` and ``2c + 1``.
"""

from typing import Dict, Iterator, Optional, Tuple

import torch

from qalora_tune.ops import _cpu_int4_fused as fused
from qalora_tune.quantization.cpu_int4_layout import cpu_int4_layout

__all__ = ["chunked_int4_grad_input", "chunked_int4_linear"]

# weights per chunk: 2^19 fp32 values (2 MiB) fit the L2/L3 caches of current x86 cores
_CHUNK_ELEMENTS = 1 << 19
# with the fused kernel a chunk is written once and read once, so larger chunks, whose
# GEMMs run closer to BLAS's peak, win (bf16, 11008 x 4096, M = 128: forward 25.2 ms at
# 2^19, 22.8 at 2^21; input gradient 32.6 and 30.3 ms)
_COMPILED_CHUNK_ELEMENTS = 1 << 21


class _Dequantizer:
    """What both chunk directions share: the layout, the weight's views, and the buffers
    a chunk is built in (sized by the first, largest chunk and reused for the others).

    Args:
        qdata (torch.Tensor): ``(N_pad, K / 2)`` uint8 in the CPU kernel's layout.
        scale_and_zero (torch.Tensor): ``(n_groups_pad, N_pad, 2)``.
        group_size (int): quantization group size.
        in_features (int): ``K``.
        dtype (torch.dtype): the compute dtype chunks are returned in.
        compiled (Optional[bool]): build whole blocks with the fused, compiled kernels of
            ``_cpu_int4_fused``; None decides by the weight's size (``use_compiled``).
    """

    def __init__(
        self,
        qdata: torch.Tensor,
        scale_and_zero: torch.Tensor,
        group_size: int,
        in_features: int,
        dtype: torch.dtype,
        compiled: Optional[bool] = None,
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
        self._dtype = dtype
        if compiled is None:
            compiled = fused.use_compiled(self.n_rows * in_features)
        self.compiled = compiled
        self.chunk_elements = _COMPILED_CHUNK_ELEMENTS if compiled else _CHUNK_ELEMENTS
        self._buffers: Dict[torch.dtype, torch.Tensor] = {}

    def _buffer(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        """``size`` values of ``dtype`` in a buffer reused by every chunk (one per dtype,
        allocated at the first, largest chunk that needs it)."""
        buffer = self._buffers.get(dtype)
        if buffer is None:
            buffer = self._buffers[dtype] = torch.empty(size, dtype=dtype)
        return buffer[:size]

    def _output_buffer(self, size: int) -> torch.Tensor:
        """The buffer a chunk is returned in: ``size`` values of the compute dtype."""
        return self._buffer(size, self._dtype)

    def _scale_codes(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: Tuple[int, ...]
    ) -> torch.Tensor:
        """``(q - 8) * s + z`` of the unpacked ``codes`` in fp32, then in the compute dtype.

        Args:
            codes (torch.Tensor): unpacked codes in ``[0, 15]``, as laid out in the buffer.
            scale (torch.Tensor): scales broadcasting against ``codes.view(shape)``.
            zero (torch.Tensor): zeros, the same.
            shape (Tuple[int, ...]): the grouped view of the chunk the scales address.

        Returns:
            torch.Tensor: the chunk, shaped like ``codes``.
        """
        signed = codes.view(torch.int8)
        signed.sub_(8)  # q - 8, exact in int8
        dense = self._buffer(codes.numel(), torch.float32).view(shape)
        torch.mul(signed.view(shape), scale, out=dense)
        dense.add_(zero)
        dense = dense.view(codes.shape)
        if self._dtype == torch.float32:
            return dense
        rounded = self._output_buffer(codes.numel()).view(codes.shape)
        rounded.copy_(dense)
        return rounded


class _ChunkDequantizer(_Dequantizer):
    """Rebuilds ``W^T[:, rows]`` for runs of packed row blocks."""

    def chunks(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """Yield ``(row_start, row_end, W^T[:, row_start:row_end])`` for each row block, in order.

        The yielded ``(K, rows)`` tensor, in the compute dtype, is a view of a buffer that
        later blocks overwrite.
        """
        n_full = self.n_rows // self.block_n
        step = max(1, self.chunk_elements // (self.k * self.block_n))
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
        k, width = self.k, blocks * rows
        packed = self.packed[start * k // 2 : (start + width) * k // 2].view(blocks, k, rows // 2)
        # scales and zeros of row start + b * rows + r, group j, at [b, j, 0, r]; they are
        # interleaved in scale_and_zero, so copied to unit stride for the passes to vectorize
        scale_and_zero = self._scale_and_zero[:, start : start + width]
        scale_and_zero = scale_and_zero.reshape(self.n_groups, blocks, rows, 2).transpose(0, 1)
        scale = scale_and_zero[..., 0].float().contiguous().unsqueeze(2)
        zero = scale_and_zero[..., 1].float().contiguous().unsqueeze(2)
        if self.compiled and rows == self.block_n:  # whole blocks; a partial tail stays eager
            out = self._output_buffer(k * width).view(blocks, k, rows)
            if fused.dequantize(fused.row_blocks, packed, scale, zero, out, halves):
                return out
        # written in the packed order, so that every pass runs over contiguous memory
        codes = self._buffer(k * width, torch.uint8).view(blocks, k, rows)
        _unpack_nibbles(packed, codes, halves)
        return self._scale_codes(codes, scale, zero, (blocks, self.n_groups, self.group_size, rows))


class _ColumnChunkDequantizer(_Dequantizer):
    """Rebuilds ``W^T[k0:k1, :]`` for runs of whole quantization groups.

    Used for ``grad @ W``: a chunk of input columns gives its own slice of the result, so
    nothing is accumulated across chunks and the result is rounded once.
    """

    def chunks(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """Yield ``(k_start, k_end, W^T[k_start:k_end, :N_pad])`` in the compute dtype.

        The yielded ``(columns, N_pad)`` tensor is a view of a buffer that later chunks
        overwrite.
        """
        step = max(1, self.chunk_elements // (self.group_size * self.n_rows))
        for first in range(0, self.n_groups, step):
            last = min(first + step, self.n_groups)
            k_start, k_end = first * self.group_size, last * self.group_size
            yield k_start, k_end, self._dequantize(first, last)

    def _dequantize(self, first_group: int, last_group: int) -> torch.Tensor:
        k, n_rows, block_n = self.k, self.n_rows, self.block_n
        k_start = first_group * self.group_size
        columns = (last_group - first_group) * self.group_size
        n_full = n_rows // block_n
        split = n_full * block_n * k // 2
        scale_and_zero = self._scale_and_zero[first_group:last_group]
        scale = scale_and_zero[..., 0].float().contiguous().unsqueeze(1)
        zero = scale_and_zero[..., 1].float().contiguous().unsqueeze(1)
        if self.compiled and n_full * block_n == n_rows:  # whole blocks only
            packed = self.packed.view(n_full, k, block_n // 2)[:, k_start : k_start + columns]
            out = self._output_buffer(columns * n_rows).view(columns, n_rows)
            if fused.dequantize(fused.columns, packed, scale, zero, out, self.halves):
                return out
        codes = self._buffer(columns * n_rows, torch.uint8).view(columns, n_rows)
        if n_full:
            packed = self.packed[:split].view(n_full, k, block_n // 2)
            destination = codes[:, : n_full * block_n].view(columns, n_full, block_n)
            _unpack_nibbles(
                packed[:, k_start : k_start + columns],
                destination.permute(1, 0, 2),
                self.halves,
            )
        tail = n_rows - n_full * block_n
        if tail:
            packed = self.packed[split:].view(1, k, tail // 2)
            destination = codes[:, n_full * block_n :].view(columns, 1, tail)
            _unpack_nibbles(
                packed[:, k_start : k_start + columns], destination.permute(1, 0, 2), False
            )
        groups = last_group - first_group
        return self._scale_codes(codes, scale, zero, (groups, self.group_size, n_rows))


def _unpack_nibbles(packed: torch.Tensor, codes: torch.Tensor, halves: bool) -> None:
    """Unpack ``(blocks, K', rows / 2)`` bytes into ``(blocks, K', rows)`` codes (views).

    With ``halves``, low nibbles go to ``codes[..., :rows / 2]`` and high nibbles to the
    rest; otherwise to the even and odd positions. Halves are done four bytes at a time
    when the strides allow: in a 32-bit word ``w`` of packed bytes, ``w & 0x0F0F0F0F``
    holds each byte's low nibble in place and ``(w >> 4) & 0x0F0F0F0F`` each byte's high
    nibble (the bits shifted in from the next byte are masked off).
    """
    half = packed.shape[-1]
    if halves and half % 4 == 0 and _word_aligned(packed) and _word_aligned(codes):
        words = packed.view(torch.int32)
        code_words = codes.view(torch.int32)
        low, high = code_words[..., : half // 4], code_words[..., half // 4 :]
        torch.bitwise_and(words, 0x0F0F0F0F, out=low)
        torch.bitwise_right_shift(words, 4, out=high)
        high.bitwise_and_(0x0F0F0F0F)
        return
    low = codes[..., :half] if halves else codes[..., 0::2]
    high = codes[..., half:] if halves else codes[..., 1::2]
    torch.bitwise_and(packed, 15, out=low)
    torch.bitwise_right_shift(packed, 4, out=high)


def _word_aligned(tensor: torch.Tensor) -> bool:
    # a byte tensor can be viewed as int32 when its rows are whole, aligned words
    return (
        tensor.stride(-1) == 1
        and tensor.storage_offset() % 4 == 0
        and all(stride % 4 == 0 for stride in tensor.stride()[:-1])
    )


def chunked_int4_linear(
    x2d: torch.Tensor,
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    out_features: int,
    compiled: Optional[bool] = None,
) -> torch.Tensor:
    """``x @ W^T`` for a CPU-packed int4 weight, in ``x2d.dtype`` (the weight rounded to it).

    Args:
        x2d (torch.Tensor): ``(M, K)`` contiguous.
        qdata (torch.Tensor): ``(N_pad, K / 2)`` uint8 in the CPU kernel's layout.
        scale_and_zero (torch.Tensor): ``(n_groups_pad, N_pad, 2)``.
        group_size (int): quantization group size.
        out_features (int): ``N``; rows beyond it are padding.
        compiled (Optional[bool]): rebuild chunks with the fused, compiled kernels
            (bit-identical to the eager passes); None uses them for weights of at least
            ``_cpu_int4_fused.COMPILED_MIN_ELEMENTS`` values.

    Returns:
        torch.Tensor: ``(M, out_features)``, contiguous.
    """
    chunks = _ChunkDequantizer(
        qdata, scale_and_zero, group_size, x2d.shape[1], x2d.dtype, compiled
    )
    out = x2d.new_empty(x2d.shape[0], out_features)
    for start, end, weight_t in chunks.chunks():
        end = min(end, out_features)
        if start >= end:
            break
        # both operands contiguous and untransposed: the layout BLAS packs fastest (bf16
        # at M = 512 on 11008 -> 4096: 69 ms, against 138 ms for W[rows] @ x^T)
        out[:, start:end] = x2d @ weight_t[:, : end - start]
    return out


def chunked_int4_grad_input(
    grad2d: torch.Tensor,
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    in_features: int,
    compiled: Optional[bool] = None,
) -> torch.Tensor:
    """``grad @ W`` for a CPU-packed int4 weight, in ``grad2d.dtype``.

    Args:
        grad2d (torch.Tensor): ``(M, N)``, gradient of the layer output.
        qdata (torch.Tensor): ``(N_pad, K / 2)`` uint8 in the CPU kernel's layout.
        scale_and_zero (torch.Tensor): ``(n_groups_pad, N_pad, 2)``.
        group_size (int): quantization group size.
        in_features (int): ``K``.
        compiled (Optional[bool]): as for :func:`chunked_int4_linear`.

    Returns:
        torch.Tensor: ``(M, in_features)`` in ``grad2d.dtype`` (products accumulate in
        fp32 inside the GEMM and are rounded once).
    """
    out_features = grad2d.shape[1]
    chunks = _ColumnChunkDequantizer(
        qdata, scale_and_zero, group_size, in_features, grad2d.dtype, compiled
    )
    grad_t = grad2d.t()
    grad_input_t = grad2d.new_empty(in_features, grad2d.shape[0])
    for start, end, weight_t in chunks.chunks():
        # padded rows of W (beyond out_features) have no gradient to meet
        torch.mm(weight_t[:, :out_features], grad_t, out=grad_input_t[start:end])
    return grad_input_t.t().contiguous()
