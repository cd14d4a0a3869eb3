"""``qalora_tune::int4_linear``: ``x @ W^T`` through the torchao int4 kernels, with an input
gradient.

torchao's int4 subclasses run inference only: the kernels have no derivative and the
subclasses are created with ``requires_grad=False``. QA-LoRA backpropagates through the
frozen base to the adapters of earlier layers, so this op supplies
``grad_x = grad_y @ W`` as the op ``qalora_tune::int4_linear_grad_input``. In the CPU
layout, bf16 and fp32 products run a C++ GEMM that dequantizes the weight into its own
packed panels (``_cpu_int4_native``); where it cannot run (no AVX512-BF16, no compiler,
fp16), the weight is dequantized one cache-sized chunk at a time for BLAS
(``_cpu_int4_chunked``). Either way no dense copy of the layer exists. In tinygemm's layout (CUDA) the codes are unpacked
with tensor ops (``tinygemm_layout``) and the current layer is dequantized whole, used by
one GEMM and freed; tinygemm itself runs only the forward of few rows (decode), where it
is built to win. The ops take the subclass's inner tensors, so ``torch.compile`` sees one
opaque node per base matmul and per input gradient.
"""

from typing import Any, Optional, Tuple

import torch

from qalora_tune._compat import cpu_int4pack_mm, tinygemm_int4pack_mm
from qalora_tune.ops._cpu_int4_chunked import (
    chunked_int4_grad_input,
    chunked_int4_linear,
)
from qalora_tune.ops import _cpu_int4_native as native
from qalora_tune.ops._cpu_int4_fused import use_compiled
from qalora_tune.quantization.int4_weight import (
    dequantize_packed,
    tinygemm_padded_in_features,
)

__all__ = ["int4_linear", "int4_linear_grad_input", "int4_matmul", "one_row_int4_linear"]


# From this many rows of x on, dequantizing chunks for a bf16/fp16 GEMM beats the CPU int4
# kernel (AVX512-BF16 EPYC, 11008x4096: 130 vs 89 ms at M = 512, 32 vs 40 ms at M = 128).
CPU_DEQUANTIZE_MIN_ROWS = 256
# The same when the chunks are built by the fused, compiled kernel (``_cpu_int4_fused``,
# weights of at least ``COMPILED_MIN_ELEMENTS`` values): at 128 rows it is 1.4-1.6x faster
# than the kernel on a Llama-2-7B layer's shapes, at 64 within 7% either way
# (``benchmarks/int4_matmul.py``, docs/results/int4_matmul_cpu_fused.md).
CPU_COMPILED_DEQUANTIZE_MIN_ROWS = 128


# From this many rows of x on, the bf16 forward leaves the CPU int4 kernel for the native
# GEMM (``_cpu_int4_native``), which has no fast path for a handful of rows: on a Llama-2-7B
# layer's shapes it was 0.5-0.9x the kernel's time at 16 rows and 1.3-13x at 1 row
# (1 thread, docs/results/performance.md, fast path 7). fp32 always takes it.
CPU_NATIVE_MIN_ROWS = 16


def _cpu_takes_native(rows: int, dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or rows >= CPU_NATIVE_MIN_ROWS


def _cpu_takes_chunks(rows: int, dtype: torch.dtype, compiled: bool) -> bool:
    # The CPU int4 kernel has no fast fp32 path (11008x4096 at M = 128: ~120x slower than
    # in bf16): fp32 always, and other dtypes for large M, run BLAS on dequantized chunks.
    min_rows = CPU_COMPILED_DEQUANTIZE_MIN_ROWS if compiled else CPU_DEQUANTIZE_MIN_ROWS
    return dtype == torch.float32 or rows >= min_rows


def _cpu_forward(x2d, qdata, scale_and_zero, group_size, out_features):
    if _cpu_takes_native(x2d.shape[0], scale_and_zero.dtype) and native.supports(
        qdata, scale_and_zero
    ):
        return native.linear(x2d, qdata, scale_and_zero, group_size, out_features)
    compiled = use_compiled(qdata.numel() * 2)
    if _cpu_takes_chunks(x2d.shape[0], scale_and_zero.dtype, compiled):
        return chunked_int4_linear(
            x2d, qdata, scale_and_zero, group_size, out_features, compiled=compiled
        )
    return cpu_int4pack_mm(x2d, qdata, group_size, scale_and_zero)


# From this many rows of x on, the forward in tinygemm's layout dequantizes the layer for
# a dense GEMM instead of calling tinygemm, whose kernel is built for few rows. The value
# is an estimate from tinygemm's published scaling, not a measurement on this project's
# hardware: `benchmarks/int4_matmul.py --device cuda` measures the crossover.
CUDA_DEQUANTIZE_MIN_ROWS = 128


def _tinygemm_forward(x2d, qdata, scale_and_zero, group_size, out_features):
    if x2d.is_cuda and x2d.shape[0] < CUDA_DEQUANTIZE_MIN_ROWS:
        k_pad = tinygemm_padded_in_features(qdata)
        x2d = torch.nn.functional.pad(x2d, (0, k_pad - x2d.shape[-1]))
        return tinygemm_int4pack_mm(x2d, qdata, group_size, scale_and_zero)
    # unpacked with tensor ops (tinygemm_layout), rounded once to bf16
    weight = dequantize_packed(qdata, scale_and_zero, group_size, out_features, x2d.shape[-1])
    return x2d @ weight.t()


def int4_matmul(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    """The body of :func:`int4_linear` (same arguments), for ops that build
    ``scale_and_zero`` themselves and should not dispatch a second op."""
    x2d = x.reshape(-1, x.shape[-1]).to(scale_and_zero.dtype).contiguous()
    if qdata.dim() == 2:
        y = _cpu_forward(x2d, qdata, scale_and_zero, group_size, out_features)
    else:
        y = _tinygemm_forward(x2d, qdata, scale_and_zero, group_size, out_features)
    return y[:, :out_features].reshape(*x.shape[:-1], out_features).to(x.dtype).contiguous()


def one_row_int4_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    out_features: int,
) -> Optional[torch.Tensor]:
    """Decode's fast path: ``x @ W^T`` for one row of ``x`` straight through the CPU int4
    kernel, or ``None`` where :func:`int4_linear` must run instead.

    At one row the kernel reads the weight at about 80% of the memory bandwidth, and the
    op's eager dispatch and its body's checks around it cost 9-17% on top of it over a
    Llama-2-7B layer's linears; through this path, 1% (``benchmarks/decode_roofline.py``,
    docs/results/performance.md). This path applies
    only where the op would call that same kernel with the same arguments, so the result
    is the op's bit for bit: eager (not while ``torch.compile`` traces, which keeps the
    op as one node), no gradient wanted for ``x``, the CPU layout, one row, and ``x``
    already in the scales' dtype, bf16 or fp16 (fp32 takes the native GEMM).

    Args:
        x (torch.Tensor): ``(..., in_dim)`` with one row (``x.numel() == in_dim``).
        qdata, scale_and_zero, group_size, out_features: as :func:`int4_linear`.

    Returns:
        Optional[torch.Tensor]: ``(..., out_features)`` in ``x.dtype``, or ``None``.
    """
    if (
        x.numel() != x.shape[-1]
        or qdata.dim() != 2
        or x.dtype is not scale_and_zero.dtype
        or x.dtype is torch.float32
        or x.device.type != "cpu"
        or (x.requires_grad and torch.is_grad_enabled())
        or torch.compiler.is_compiling()
    ):
        return None
    y = cpu_int4pack_mm(x.reshape(1, -1).contiguous(), qdata, group_size, scale_and_zero)
    if y.shape[-1] != out_features:  # rows padded for the packing
        y = y[:, :out_features].contiguous()
    return y.view(*x.shape[:-1], out_features)


@torch.library.custom_op("qalora_tune::int4_linear", mutates_args=())
def int4_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    """``x @ W^T`` for an int4 weight given by its packed codes and scales/zeros.

    Args:
        x (torch.Tensor): ``(..., in_dim)``; computed in ``scale_and_zero.dtype``.
        qdata (torch.Tensor): packed codes (CPU or tinygemm layout).
        scale_and_zero (torch.Tensor): ``(n_groups_pad, N_pad, 2)``.
        group_size (int): quantization group size.
        out_features (int): ``N``.

    Returns:
        torch.Tensor: ``(..., out_features)`` in ``x.dtype``.
    """
    return int4_matmul(x, qdata, scale_and_zero, group_size, out_features)


@int4_linear.register_fake
def _(x, qdata, scale_and_zero, group_size, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
    x, qdata, scale_and_zero, group_size, out_features = inputs
    ctx.save_for_backward(qdata, scale_and_zero)
    ctx.group_size = group_size
    ctx.in_features = x.shape[-1]
    ctx.x_dtype = x.dtype


@torch.library.custom_op("qalora_tune::int4_linear_grad_input", mutates_args=())
def int4_linear_grad_input(
    grad: torch.Tensor,
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``grad @ W``, the input gradient of :func:`int4_linear`.

    An op of its own, so that compiled backward graphs keep it as one node.

    Args:
        grad (torch.Tensor): ``(..., out_features)``.
        qdata (torch.Tensor): packed codes (CPU or tinygemm layout).
        scale_and_zero (torch.Tensor): ``(n_groups_pad, N_pad, 2)``.
        group_size (int): quantization group size.
        in_features (int): ``K``.

    Returns:
        torch.Tensor: ``(..., in_features)`` in ``scale_and_zero.dtype``.
    """
    grad2d = grad.reshape(-1, grad.shape[-1]).to(scale_and_zero.dtype)
    if qdata.dim() == 2 and native.supports(qdata, scale_and_zero):
        grad_x = native.grad_input(grad2d, qdata, scale_and_zero, group_size, in_features)
    elif qdata.dim() == 2:  # CPU layout: dequantized chunk by chunk, as in the forward
        grad_x = chunked_int4_grad_input(
            grad2d, qdata, scale_and_zero, group_size, in_features
        )
    else:
        weight = dequantize_packed(qdata, scale_and_zero, group_size, grad.shape[-1], in_features)
        grad_x = grad2d @ weight
    return grad_x.reshape(*grad.shape[:-1], in_features)


@int4_linear_grad_input.register_fake
def _(grad, qdata, scale_and_zero, group_size, in_features):
    return grad.new_empty((*grad.shape[:-1], in_features), dtype=scale_and_zero.dtype)


def _backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    qdata, scale_and_zero = ctx.saved_tensors
    grad_x = int4_linear_grad_input(
        grad, qdata, scale_and_zero, ctx.group_size, ctx.in_features
    )
    return grad_x.to(ctx.x_dtype), None, None, None, None


int4_linear.register_autograd(_backward, setup_context=_setup_context)
