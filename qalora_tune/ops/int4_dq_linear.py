"""``qalora_tune::int4_dq_linear``: ``x @ W^T`` for an int4 base with 8-bit scales.

A double-quantized base (:class:`~qalora_tune.quantization.DoubleQuantInt4Tensor`) holds
its scales as 8-bit codes on a per-row grid. The int4 kernels read a dense
``scale_and_zero``, so this op rebuilds it (``1/G`` of the weight's values) and runs
:func:`~qalora_tune.ops.int4_linear`'s kernels (its body, ``int4_matmul``, without a second
op dispatch). Autograd saves the 8-bit codes, never the
rebuilt scales, and the backward rebuilds them again for
``qalora_tune::int4_linear_grad_input``: the memory saved at rest is saved during training
too.
"""

from typing import Any, Optional, Tuple

import torch

from qalora_tune.ops.int4_linear import int4_linear_grad_input, int4_matmul
from qalora_tune.quantization.double_quant import rebuild_scale_and_zero

__all__ = ["int4_dq_linear"]


@torch.library.custom_op("qalora_tune::int4_dq_linear", mutates_args=())
def int4_dq_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale_codes: torch.Tensor,
    scale_min: torch.Tensor,
    scale_step: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    """``x @ W^T`` for an int4 weight given by its packed codes, 8-bit scales and zeros.

    Args:
        x (torch.Tensor): ``(..., in_dim)``; computed in ``zero.dtype``.
        qdata (torch.Tensor): packed codes (CPU or tinygemm layout).
        scale_codes (torch.Tensor): ``(n_groups_pad, N_pad)`` uint8.
        scale_min (torch.Tensor): ``(N_pad,)`` float32.
        scale_step (torch.Tensor): ``(N_pad,)`` float32.
        zero (torch.Tensor): ``(n_groups_pad, N_pad)`` float zero points.
        group_size (int): quantization group size.
        out_features (int): ``N``.

    Returns:
        torch.Tensor: ``(..., out_features)`` in ``x.dtype``.
    """
    scale_and_zero = rebuild_scale_and_zero(scale_codes, scale_min, scale_step, zero)
    return int4_matmul(x, qdata, scale_and_zero, group_size, out_features)


@int4_dq_linear.register_fake
def _(x, qdata, scale_codes, scale_min, scale_step, zero, group_size, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
    x, qdata, scale_codes, scale_min, scale_step, zero, group_size, _ = inputs
    ctx.save_for_backward(qdata, scale_codes, scale_min, scale_step, zero)
    ctx.group_size = group_size
    ctx.in_features = x.shape[-1]
    ctx.x_dtype = x.dtype


def _backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    no_grads = (None,) * 7
    if not ctx.needs_input_grad[0]:
        return (None, *no_grads)
    qdata, scale_codes, scale_min, scale_step, zero = ctx.saved_tensors
    scale_and_zero = rebuild_scale_and_zero(scale_codes, scale_min, scale_step, zero)
    grad_x = int4_linear_grad_input(
        grad, qdata, scale_and_zero, ctx.group_size, ctx.in_features
    )
    return (grad_x.to(ctx.x_dtype), *no_grads)


int4_dq_linear.register_autograd(_backward, setup_context=_setup_context)
