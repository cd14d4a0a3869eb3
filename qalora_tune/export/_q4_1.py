"""A merged QA-LoRA int4 weight as GGML ``Q4_1`` blocks, with the rounding it costs.

``Q4_1`` stores blocks of 32 consecutive weights of a row as ``w = d * q + m`` with ``d`` and
``m`` in fp16 and ``q`` in ``0..15``; the bytes of a block are ``d`` (2), ``m`` (2), then 16
bytes where byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in its
high nibble (checked against ``gguf.quants.Q4_1`` in the tests).

A merged weight is ``(q - 8) * s + z`` per (row, group of G inputs), so with ``d = s`` and
``m = z - 8 s`` it is the same function of the same codes whenever G is a multiple of 32
(each group is G / 32 blocks sharing ``d`` and ``m``) and the row length is a multiple of
32. 2- and 3-bit codes are int4 codes already (:meth:`GroupQuantizedWeight.as_int4`). The
only rounding is fp16 of ``d`` and ``m``::

    |w_gguf - w| <= |fl16(s) - s| q + |fl16(m) - m|  <= 2**-11 (15 |s| + |z - 8 s|)

(normal fp16 numbers; llama.cpp's fp32 evaluation of ``d * q + m`` adds ~2**-23 relative).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from qalora_tune.export._merged_reader import MergedLinearWeight

__all__ = [
    "Q4_1_BLOCK",
    "Q4_1_BYTES_PER_BLOCK",
    "Q4_1Error",
    "pack_q4_1",
    "q4_1_refusal",
]

Q4_1_BLOCK = 32
"""Weights per ``Q4_1`` block."""
Q4_1_BYTES_PER_BLOCK = 20
"""Bytes per ``Q4_1`` block: fp16 ``d``, fp16 ``m``, 16 bytes of codes."""

_INT4_MID = 8  # b-bit codes are stored as int4 codes around this midpoint
_FP16_MAX = float(np.finfo(np.float16).max)
_FP16_UNIT_ROUNDOFF = 2.0**-11
_FP16_SUBNORMAL_HALF_SPACING = 2.0**-25
_FP32_UNIT_ROUNDOFF = 2.0**-24
_ELEMENTS_PER_CHUNK = 2**22  # bounds the float64 temporaries of the error measurement


@dataclass(frozen=True)
class Q4_1Error:
    """How far a ``Q4_1`` tensor is from the merged weight it encodes.

    Attributes:
        max_abs_error (float): ``max |w_gguf - w|`` over the tensor, ``w`` exact (float64 of
            the stored codes, scales and zeros), ``w_gguf`` as llama.cpp evaluates it (fp32).
        max_abs_weight (float): ``max |w|``.
        max_abs_bound (float): the largest per-element bound
            ``|fl16(s) - s| q + |fl16(m) - m|`` plus fp32 evaluation rounding.
        a_priori_bound (float): ``max 2**-11 (15 |s| + |z - 8 s|)`` (+ the fp16 subnormal
            spacing and fp32 rounding), what the fp16 rounding can cost at most.
    """

    max_abs_error: float
    max_abs_weight: float
    max_abs_bound: float
    a_priori_bound: float

    @property
    def max_relative_error(self) -> float:
        """``max |w_gguf - w| / max |w|``."""
        return self.max_abs_error / self.max_abs_weight if self.max_abs_weight else 0.0

    @property
    def relative_bound(self) -> float:
        """``a_priori_bound / max |w|``."""
        return self.a_priori_bound / self.max_abs_weight if self.max_abs_weight else 0.0


def q4_1_refusal(weight: MergedLinearWeight) -> Optional[str]:
    """Why ``weight`` cannot be stored exactly as ``Q4_1`` (None if it can).

    Args:
        weight (MergedLinearWeight): a merged quantized linear.

    Returns:
        str or None: the reason, e.g. ``"in_dim 172 is not a multiple of 32"``.
    """
    gq = weight.quantized
    if gq.bits > 4:
        return f"{gq.bits}-bit codes do not fit Q4_1's 4-bit codes"
    if weight.in_features % Q4_1_BLOCK:
        return f"in_dim {weight.in_features} is not a multiple of {Q4_1_BLOCK}"
    if gq.group_size % Q4_1_BLOCK:
        return f"group size {gq.group_size} is not a multiple of {Q4_1_BLOCK}"
    d, m = _block_parameters(gq.scale, gq.zero, _INT4_MID)
    largest = max(float(np.abs(d).max(initial=0.0)), float(np.abs(m).max(initial=0.0)))
    if not np.isfinite(largest) or largest > _FP16_MAX:
        return f"a scale or minimum ({largest:.3g}) is outside fp16's range"
    return None


def _block_parameters(scale: torch.Tensor, zero: torch.Tensor, mid: int) -> Tuple[np.ndarray, np.ndarray]:
    """``d = s`` and ``m = z - mid * s`` per (row, group) in float64 (exact for fp32 or
    bf16 ``s`` and ``z``): ``(q - mid) s + z = d q + m``."""
    s = scale.detach().cpu().double().numpy()
    z = zero.detach().cpu().double().numpy()
    return s, z - mid * s


def pack_q4_1(weight: MergedLinearWeight) -> Tuple[np.ndarray, Q4_1Error]:
    """Encode a merged weight as ``Q4_1`` bytes and measure the rounding.

    Args:
        weight (MergedLinearWeight): ``(out_dim, in_dim)``, codes of at most 4 bits, group
            size and ``in_dim`` multiples of 32 (see :func:`q4_1_refusal`).

    Returns:
        Tuple[np.ndarray, Q4_1Error]: uint8 ``(out_dim, in_dim / 32 * 20)``, the row-major
        ``Q4_1`` bytes (what ``gguf.GGUFWriter.add_tensor(..., raw_dtype=Q4_1)`` takes), and
        the error against the exact weight.

    Raises:
        ValueError: if the weight cannot be stored exactly (:func:`q4_1_refusal`).
    """
    reason = q4_1_refusal(weight)
    if reason is not None:
        raise ValueError(f"cannot store this weight as Q4_1: {reason}")
    gq = weight.quantized.as_int4()
    n, k = weight.shape
    blocks = k // Q4_1_BLOCK
    block_group = np.arange(blocks) * Q4_1_BLOCK // gq.group_size  # group of each block
    codes = gq.qdata[:, :k].cpu().numpy().astype(np.uint8)
    d, m = _block_parameters(gq.scale, gq.zero, _INT4_MID)
    out = np.empty((n, blocks, Q4_1_BYTES_PER_BLOCK), dtype=np.uint8)
    error = Q4_1Error(0.0, 0.0, 0.0, 0.0)
    chunk = max(1, _ELEMENTS_PER_CHUNK // k)
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        q = codes[rows].reshape(-1, blocks, Q4_1_BLOCK)
        d_exact, m_exact = d[rows][:, block_group], m[rows][:, block_group]  # (rows, blocks)
        d16, m16 = d_exact.astype(np.float16), m_exact.astype(np.float16)
        out[rows, :, 0:2] = d16[..., None].view(np.uint8)
        out[rows, :, 2:4] = m16[..., None].view(np.uint8)
        out[rows, :, 4:] = q[..., :16] | (q[..., 16:] << np.uint8(4))
        error = _combine(error, _measure(q, d_exact, m_exact, d16, m16))
    return out.reshape(n, blocks * Q4_1_BYTES_PER_BLOCK), error


def _measure(
    q: np.ndarray, d: np.ndarray, m: np.ndarray, d16: np.ndarray, m16: np.ndarray
) -> Q4_1Error:
    """Error of ``d16 * q + m16`` (evaluated in fp32, as ggml does) against ``d q + m``."""
    qf = q.astype(np.float64)
    exact = d[..., None] * qf + m[..., None]
    ggml = (d16.astype(np.float32)[..., None] * q.astype(np.float32) + m16.astype(np.float32)[..., None])
    rounding = 3 * _FP32_UNIT_ROUNDOFF * (np.abs(d16.astype(np.float64))[..., None] * qf + np.abs(m16.astype(np.float64))[..., None])
    bound = (
        np.abs(d16.astype(np.float64) - d)[..., None] * qf
        + np.abs(m16.astype(np.float64) - m)[..., None]
        + rounding
    )
    a_priori = (
        _FP16_UNIT_ROUNDOFF * (15 * np.abs(d) + np.abs(m)) + 16 * _FP16_SUBNORMAL_HALF_SPACING
    )[..., None] + rounding
    return Q4_1Error(
        max_abs_error=float(np.abs(ggml.astype(np.float64) - exact).max(initial=0.0)),
        max_abs_weight=float(np.abs(exact).max(initial=0.0)),
        max_abs_bound=float(bound.max(initial=0.0)),
        a_priori_bound=float(a_priori.max(initial=0.0)),
    )


def _combine(a: Q4_1Error, b: Q4_1Error) -> Q4_1Error:
    return Q4_1Error(*(max(x, y) for x, y in zip(
        (a.max_abs_error, a.max_abs_weight, a.max_abs_bound, a.a_priori_bound),
        (b.max_abs_error, b.max_abs_weight, b.max_abs_bound, b.a_priori_bound),
    )))
