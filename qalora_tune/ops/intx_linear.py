"""``qalora_tune::intx_linear``: ``x @ W^T`` for a dequantizing intx base, with an input
gradient.

The base of an 8-bit model, or of a group size the int4 kernels lack, is a torchao
``IntxUnpackedToInt8Tensor`` (int8 codes, float scale and zero point per group). torchao
runs it by dequantizing and calling a dense matmul; so does this op, but as an op of its
own with its input gradient as another op (``qalora_tune::intx_linear_grad_input``): the
dense weight lives only inside each call, never in autograd's saved tensors, which hold
the int8 codes instead.
"""

from typing import Any, Optional, Tuple

import torch

from qalora_tune.quantization.intx_weight import dequantize_intx

__all__ = ["intx_linear", "intx_linear_grad_input"]


@torch.library.custom_op("qalora_tune::intx_linear", mutates_args=())
def intx_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
) -> torch.Tensor:
    """``x @ W^T`` for an intx weight given by its codes, scales and zero points.

    Args:
        x (torch.Tensor): ``(..., in_dim)``; computed in ``scale.dtype``.
        qdata (torch.Tensor): int8 codes ``(out_dim, in_dim)``.
        scale (torch.Tensor): ``(out_dim, n_groups)``.
        zero_point (torch.Tensor): ``(out_dim, n_groups)``.

    Returns:
        torch.Tensor: ``(..., out_dim)`` in ``x.dtype``.
    """
    weight = dequantize_intx(qdata, scale, zero_point, scale.dtype)
    return torch.nn.functional.linear(x.to(scale.dtype), weight).to(x.dtype)


@intx_linear.register_fake
def _(x, qdata, scale, zero_point):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


@torch.library.custom_op("qalora_tune::intx_linear_grad_input", mutates_args=())
def intx_linear_grad_input(
    grad: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
) -> torch.Tensor:
    """``grad @ W``, the input gradient of :func:`intx_linear`.

    Args:
        grad (torch.Tensor): ``(..., out_dim)``.
        qdata (torch.Tensor): int8 codes ``(out_dim, in_dim)``.
        scale (torch.Tensor): ``(out_dim, n_groups)``.
        zero_point (torch.Tensor): ``(out_dim, n_groups)``.

    Returns:
        torch.Tensor: ``(..., in_dim)`` in ``scale.dtype``.
    """
    weight = dequantize_intx(qdata, scale, zero_point, scale.dtype)
    return grad.to(scale.dtype) @ weight


@intx_linear_grad_input.register_fake
def _(grad, qdata, scale, zero_point):
    return grad.new_empty((*grad.shape[:-1], qdata.shape[1]), dtype=scale.dtype)


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
    x, qdata, scale, zero_point = inputs
    ctx.save_for_backward(qdata, scale, zero_point)
    ctx.x_dtype = x.dtype


def _backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    qdata, scale, zero_point = ctx.saved_tensors
    grad_x = intx_linear_grad_input(grad, qdata, scale, zero_point)
    return grad_x.to(ctx.x_dtype), None, None, None


intx_linear.register_autograd(_backward, setup_context=_setup_context)
