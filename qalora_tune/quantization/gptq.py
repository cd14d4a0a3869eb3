"""GPTQ (Frantar et al., 2022, arXiv 2210.17323) on QA-LoRA's grid: asymmetric, contiguous
input groups, float zero points, so the quantized weight is a :class:`GroupQuantizedWeight`
and the QA-LoRA merge stays a zero-point update.

GPTQ quantizes a linear's weight one input column at a time and, after each column, moves
the rounding error onto the columns not yet quantized, weighted by the inverse Hessian of
the layer's reconstruction loss ``||X W^T - X W_hat^T||^2`` (``H = 2 X^T X`` over
calibration inputs ``X``). Groups are contiguous (no activation-order permutation, which
would scatter a group's columns and break the pooled adapter); each group's scale and zero
come from min-max over the group's columns as they are when the group is reached, i.e.
after the updates from the groups before it.

    hessian = HessianAccumulator(in_dim)
    for x in calibration_inputs:          # (..., in_dim), what the linear sees
        hessian.add(x)
    gq = quantize_gptq(linear.weight, group_size=64, bits=4, hessian=hessian.matrix())
"""

from typing import Optional

import torch

from qalora_tune._compat import MappingType, choose_qparams_tinygemm
from qalora_tune.errors import UserTypeError, UserValueError
from qalora_tune.quantization.group_quant import (
    SUPPORTED_BITS,
    GroupQuantizedWeight,
    validate_group_size,
)

__all__ = ["HessianAccumulator", "quantize_gptq"]


class HessianAccumulator:
    """Running ``H = 2 X^T X / n`` of a linear's inputs, in float64.

    Args:
        in_dim (int): the linear's input features.
        device (torch.device, optional): where ``H`` lives (that of the inputs by default).
    """

    def __init__(self, in_dim: int, device: Optional[torch.device] = None):
        self.in_dim = in_dim
        self.device = device
        self.count = 0
        self._sum: Optional[torch.Tensor] = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` of shape ``(..., in_dim)``: every row is one sample."""
        if x.shape[-1] != self.in_dim:
            raise UserValueError(f"expected inputs (..., {self.in_dim}), got {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_dim).to(self.device or x.device, torch.float64)
        if self._sum is None:
            self._sum = torch.zeros(self.in_dim, self.in_dim, dtype=torch.float64, device=rows.device)
        self._sum.addmm_(rows.t(), rows)
        self.count += rows.shape[0]

    def matrix(self) -> torch.Tensor:
        """``2 X^T X / n`` of shape ``(in_dim, in_dim)``, float64.

        Raises:
            ValueError: if no input was added.
        """
        if self._sum is None or self.count == 0:
            raise UserValueError("no calibration inputs were added; GPTQ needs some")
        return 2.0 * self._sum / self.count


def _group_qparams(columns: torch.Tensor, bits: int):
    """tinygemm min-max scale and float zero of ``(N, G)`` columns, as ``(N, 1)`` each."""
    scale, zero = choose_qparams_tinygemm(
        columns.float(),
        MappingType.ASYMMETRIC,
        (1, columns.shape[1]),
        torch.int32,
        0,
        2**bits - 1,
        1e-6,
        torch.float32,
        torch.float32,
    )
    return scale.reshape(-1, 1).to(columns.dtype), zero.reshape(-1, 1).to(columns.dtype)


@torch.no_grad()
def quantize_gptq(
    weight: torch.Tensor,
    group_size: int,
    bits: int = 4,
    hessian: Optional[torch.Tensor] = None,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> GroupQuantizedWeight:
    """Quantize ``weight`` with GPTQ's error feedback, on contiguous groups.

    Args:
        weight (torch.Tensor): full-precision weight of shape ``(out_dim, in_dim)``.
        group_size (int): input columns per group (a divisor of ``in_dim``).
        bits (int): bit width of the codes (2, 3 or 4).
        hessian (torch.Tensor, optional): ``(in_dim, in_dim)`` Hessian of the layer's
            reconstruction loss, ``2 X^T X / n`` (see :class:`HessianAccumulator`). Without
            it (or with the identity) no error is fed back and the result is RTN's.
        damp (float): added to the diagonal, as a fraction of its mean, before inverting
            (numerical stability with few or correlated calibration inputs).
        block_size (int): columns updated together (lazy batch updates; the result does
            not depend on it beyond floating-point rounding).

    Returns:
        GroupQuantizedWeight: codes, float32 scales and zero points, ``w = (q - mid) s + z``.

    Raises:
        ValueError: for a group size that does not divide ``in_dim``, an unsupported bit
            width, a Hessian of the wrong shape, or a negative ``damp``.
        TypeError: if ``weight`` is not a 2D floating-point tensor.
    """
    if weight.ndim != 2 or not weight.is_floating_point():
        raise UserTypeError(
            f"expected a 2D floating-point weight (out_dim, in_dim), got {tuple(weight.shape)} "
            f"of dtype {weight.dtype}"
        )
    n, k = weight.shape
    validate_group_size(k, group_size)
    if bits not in SUPPORTED_BITS:
        raise UserValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    if damp < 0:
        raise UserValueError(f"damp must be >= 0, got {damp}")
    w = weight.detach().to(torch.float64).clone()
    h = (
        torch.eye(k, dtype=torch.float64, device=w.device)
        if hessian is None
        else hessian.detach().to(w.device, torch.float64).clone()
    )
    if h.shape != (k, k):
        raise UserValueError(f"hessian must have shape ({k}, {k}), got {tuple(h.shape)}")
    # inputs that never fire: nothing to preserve, quantize those columns freely
    dead = torch.diag(h) == 0
    h.diagonal()[dead] = 1.0  # their rows and columns are zero: a unit diagonal inverts
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.diag(h).mean())
    # upper Cholesky factor of H^-1: row i holds the update coefficients of column i
    h_inv = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True
    )

    mid, qmax = 2 ** (bits - 1), 2**bits - 1
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, k // group_size, dtype=torch.float64, device=w.device)
    zeros = torch.empty_like(scales)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        errors = torch.zeros(n, end - start, dtype=torch.float64, device=w.device)
        for i in range(start, end):
            if i % group_size == 0:
                g = i // group_size
                scale, zero = _group_qparams(w[:, i : i + group_size], bits)
                scales[:, g : g + 1], zeros[:, g : g + 1] = scale, zero
            scale, zero = scales[:, i // group_size], zeros[:, i // group_size]
            column = w[:, i]
            q = torch.clamp(torch.round((column - (zero - mid * scale)) / scale), 0, qmax)
            codes[:, i] = q.to(torch.uint8)
            error = (column - ((q - mid) * scale + zero)) / h_inv[i, i]
            # feed the error to the block's remaining columns now, to the rest below
            w[:, i + 1 : end] -= error[:, None] * h_inv[i, i + 1 : end][None, :]
            errors[:, i - start] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return GroupQuantizedWeight(
        qdata=codes, scale=scales.float(), zero=zeros.float(), group_size=group_size, bits=bits
    )
