"""``qalora_tune::int4_dq_linear``: registration (opcheck), forward and input gradient
against float64, what autograd saves, and torch.compile of a layer with 8-bit scales."""


import pytest
import torch
from torch import nn

from qalora_tune import QALoRALinear
from qalora_tune.ops import int4_dq_linear, int4_linear
from qalora_tune.quantization import quantize_rtn
from qalora_tune.quantization.double_quant import is_double_quant
from qalora_tune.quantization.int4_weight import (
    dequantize_int4,
    to_torchao_int4,
    with_dense_scales,
)
from tests.reference import (
    assert_compiled_matches_eager,
    assert_linear_op_matches_float64,
    seed_each_test,  # noqa: F401 (an autouse fixture: importing it activates it)
)


def _weight(n, k, group_size, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=generator) + 0.5 * torch.randn(n, 1, generator=generator)
    return to_torchao_int4(quantize_rtn(w, group_size), device="cpu", dtype=dtype, double_quant=True)


def _args(weight, group_size, n):
    return (weight.qdata, weight.scale_codes, weight.scale_min, weight.scale_step, weight.zero,
            group_size, n)


@pytest.mark.parametrize("n,k,group_size", [(48, 128, 32), (96, 256, 64), (40, 512, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_match_float64(n, k, group_size, dtype):
    weight = _weight(n, k, group_size, dtype, seed=n)
    assert_linear_op_matches_float64(
        lambda x: int4_dq_linear(x, *_args(weight, group_size, n)),
        dequantize_int4(weight, torch.float64),
        dtype,
    )


@pytest.mark.parametrize("n,k,group_size,batch", [(48, 256, 64, (3,)), (40, 128, 32, (2, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(n, k, group_size, batch, dtype):
    weight = _weight(n, k, group_size, dtype)
    x = torch.randn(*batch, k, dtype=dtype, requires_grad=True)
    torch.library.opcheck(int4_dq_linear, (x, *_args(weight, group_size, n)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_as_the_int4_op_on_the_decoded_scales(dtype):
    """The rebuilt scale_and_zero is what with_dense_scales holds, so both ops run the same
    kernel on the same operands: output and input gradient equal bit for bit."""
    weight = _weight(40, 256, 64, dtype, seed=5)
    dense = with_dense_scales(weight)
    x = torch.randn(6, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = int4_dq_linear(x, *_args(weight, 64, 40))
    ref = int4_linear(x_ref, dense.qdata, dense.scale_and_zero, 64, 40)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


def test_autograd_saves_the_eight_bit_codes_not_dense_scales():
    weight = _weight(48, 256, 64, torch.float32)
    saved = []
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        int4_dq_linear(x, *_args(weight, 64, 48))
    dense_shape = (*weight.zero.shape, 2)
    assert not any(tuple(t.shape) == dense_shape for t in saved)
    assert any(t.dtype == torch.uint8 and t.shape == weight.scale_codes.shape for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) < (
        weight.qdata.numel() + weight.scale_codes.numel() + 4 * weight.zero.numel() + 8 * 48 + 1
    )
    # apart from the input, nothing saved is a float tensor as large as the dense scales
    assert not any(
        t.is_floating_point() and t.shape != x.shape and t.numel() >= 2 * weight.zero.numel()
        for t in saved
    )


@pytest.mark.parametrize(
    "out_dim,dtype",
    # 40 rows are padded to 48 in the CPU layout: the kernel's output is a slice of it
    [(96, torch.float32), (40, torch.float32), (40, torch.bfloat16)],
)
def test_compile_fullgraph_matches_eager(out_dim, dtype):
    layer = QALoRALinear.from_linear(nn.Linear(256, out_dim).to(dtype), rank=8, alpha=16.0,
                                     group_size=64, double_quant_scales=True)
    assert is_double_quant(layer.weight) and layer.weight.dtype == dtype
    with torch.no_grad():
        layer.lora_b.weight.normal_(0.0, 0.05)
    assert_compiled_matches_eager(layer, torch.randn(3, 7, 256, dtype=dtype, requires_grad=True))
