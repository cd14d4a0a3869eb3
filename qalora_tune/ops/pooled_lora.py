"""``qalora_tune::pooled_lora``: QA-LoRA's low-rank update on group-averaged inputs.

    p = mean of x over each run of ``group_size`` consecutive input features   (..., K/G)
    y = scale * (p @ A^T) @ B^T                                                 (..., N)

with ``A`` of shape ``(rank, K/G)`` and ``B`` of shape ``(N, rank)``. The backward keeps
only the pooled input ``p`` (``G`` times smaller than ``x``) and ``p @ A^T``.
"""

from typing import Any, Optional, Tuple

import torch

__all__ = ["pool_groups", "pooled_lora"]


def pool_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Average each run of ``group_size`` features: ``(..., K)`` -> ``(..., K / group_size)``."""
    return x.unflatten(-1, (-1, group_size)).mean(dim=-1)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to returns its input when nothing changes; ops below autograd must not
    return t if t.dtype == dtype else t.to(dtype)


def _check(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, group_size: int):
    if group_size <= 0 or x.shape[-1] % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must divide the input's last dimension {x.shape[-1]}"
        )
    n_groups = x.shape[-1] // group_size
    if lora_a.ndim != 2 or lora_a.shape[1] != n_groups:
        raise ValueError(
            f"lora_a must have shape (rank, {n_groups}), got {tuple(lora_a.shape)}"
        )
    if lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"lora_b must have shape (out_dim, {lora_a.shape[0]}), got {tuple(lora_b.shape)}"
        )


@torch.library.custom_op("qalora_tune::pooled_lora", mutates_args=())
def pooled_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    group_size: int,
    scale: float,
) -> torch.Tensor:
    """Pooled low-rank update ``scale * B (A pool(x))``.

    Args:
        x (torch.Tensor): input of shape ``(..., in_dim)``.
        lora_a (torch.Tensor): ``(rank, in_dim // group_size)``.
        lora_b (torch.Tensor): ``(out_dim, rank)``.
        group_size (int): features averaged per pooled input.
        scale (float): ``alpha / rank``.

    Returns:
        torch.Tensor: ``(..., out_dim)`` in ``x.dtype``.
    """
    _check(x, lora_a, lora_b, group_size)
    pooled = pool_groups(x, group_size)
    hidden = pooled @ _cast(lora_a, x.dtype).t()
    return (hidden @ _cast(lora_b, x.dtype).t()) * scale


@pooled_lora.register_fake
def _(x, lora_a, lora_b, group_size, scale):
    _check(x, lora_a, lora_b, group_size)
    return x.new_empty((*x.shape[:-1], lora_b.shape[0]))


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
    x, lora_a, lora_b, group_size, scale = inputs
    # Recomputed rather than saving x: O(M K) work next to the base's O(M K N) matmul,
    # and G times less activation memory kept for the backward.
    pooled = pool_groups(x, group_size)
    hidden = pooled @ _cast(lora_a, x.dtype).t()
    ctx.save_for_backward(pooled, hidden, lora_a, lora_b)
    ctx.group_size = group_size
    ctx.scale = scale
    ctx.in_dim = x.shape[-1]


def _backward(
    ctx: Any, grad: torch.Tensor
) -> Tuple[Optional[torch.Tensor], ...]:
    pooled, hidden, lora_a, lora_b = ctx.saved_tensors
    grad = grad * ctx.scale
    grad_x = grad_a = grad_b = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[0]:
        grad_hidden = grad @ _cast(lora_b, grad.dtype)  # (..., rank)
    if ctx.needs_input_grad[0]:
        grad_pooled = (grad_hidden @ _cast(lora_a, grad.dtype)) / ctx.group_size
        grad_x = grad_pooled.unsqueeze(-1).expand(*grad_pooled.shape, ctx.group_size)
        grad_x = grad_x.reshape(*grad_pooled.shape[:-1], ctx.in_dim)
    if ctx.needs_input_grad[1]:
        grad_a = grad_hidden.reshape(-1, grad_hidden.shape[-1]).t() @ pooled.reshape(
            -1, pooled.shape[-1]
        )
        grad_a = _cast(grad_a, lora_a.dtype)
    if ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).t() @ hidden.reshape(
            -1, hidden.shape[-1]
        )
        grad_b = _cast(grad_b, lora_b.dtype)
    return grad_x, grad_a, grad_b, None, None


pooled_lora.register_autograd(_backward, setup_context=_setup_context)
