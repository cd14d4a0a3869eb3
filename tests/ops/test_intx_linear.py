"""``qalora_tune::intx_linear``: registration (opcheck), forward and input gradient against
a float64 reference, and torch.compile of a QALoRALinear whose base is intx."""

import pytest
import torch
from torch import nn

from qalora_tune import QALoRALinear
from qalora_tune.ops import intx_linear
from qalora_tune.ops.intx_linear import dequantize_intx, intx_linear_grad_input
from qalora_tune.quantization import quantize_rtn
from qalora_tune.quantization.intx_weight import is_intx_weight, to_torchao_intx
from tests.reference import (
    UNIT_ROUNDOFF,
    assert_compiled_matches_eager,
    assert_within,
    matmul_error_bound,
)


def _weight(n, k, group_size, bits, dtype):
    weight = torch.randn(n, k) + 0.5 * torch.randn(n, 1)  # groups off-centre: zp far from 0
    return to_torchao_intx(quantize_rtn(weight, group_size, bits), device="cpu", dtype=dtype)


def _dense(weight):
    """(c - zp) s from the stored codes, scales and zero points, in float64."""
    return dequantize_intx(weight.qdata, weight.scale, weight.zero_point, torch.float64)


def intx_matmul_bound(x, dense, dtype, y_ref):
    """|x W^T computed by intx_linear in ``dtype`` - exact x W^T|, elementwise.

    Besides matmul_error_bound's terms (x rounded to dtype, fp32 accumulation, output
    rounded), the op forms the weight in ``dtype``: c - zp rounded (u |c - zp| s = u |W|)
    and the product with s rounded (u |W|), i.e. 2u |x| |W| more.
    """
    u = UNIT_ROUNDOFF[dtype]
    return matmul_error_bound(x, dense, dtype, y_ref) + 2 * u * (x.double().abs() @ dense.abs().t())


SHAPES = [((3, 64), 24, 8), ((2, 5, 96), 40, 16), ((1, 7, 128), 16, 32)]


@pytest.mark.parametrize("x_shape,n,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(x_shape, n, group_size, dtype):
    weight = _weight(n, x_shape[-1], group_size, 8, dtype)
    args = (weight.qdata, weight.scale, weight.zero_point)
    x = torch.randn(*x_shape, dtype=dtype, requires_grad=True)
    torch.library.opcheck(intx_linear, (x, *args))
    grad = torch.randn(*x_shape[:-1], n, dtype=dtype)
    torch.library.opcheck(intx_linear_grad_input, (grad, *args))


@pytest.mark.parametrize("x_shape,n,group_size", SHAPES)
@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_match_float64(x_shape, n, group_size, bits, dtype):
    weight = _weight(n, x_shape[-1], group_size, bits, dtype)
    dense = _dense(weight)
    x = torch.randn(*x_shape, requires_grad=True)  # fp32 input, computed in dtype
    out = intx_linear(x, weight.qdata, weight.scale, weight.zero_point)
    assert out.shape == (*x_shape[:-1], n) and out.dtype == torch.float32
    expected = x.detach().double() @ dense.t()
    assert_within(out, expected, intx_matmul_bound(x.detach(), dense, dtype, expected), "forward")
    # not vacuous (fp32): a zero point off by one step in every group breaks the bound
    off = x.detach().double() @ (dense + weight.scale.double().repeat_interleave(group_size, 1)).t()
    if dtype == torch.float32:
        assert ((off - expected).abs() > intx_matmul_bound(x.detach(), dense, dtype, expected)).double().mean() > 0.5

    grad = torch.randn(*x_shape[:-1], n)
    out.backward(grad)
    assert x.grad.dtype == torch.float32 and x.grad.shape == x.shape
    expected_grad = grad.double() @ dense
    bound = intx_matmul_bound(grad, dense.t(), dtype, expected_grad)
    assert_within(x.grad, expected_grad, bound, "input gradient")


def test_input_in_another_dtype_is_computed_in_the_weights_and_returned_in_its_own():
    weight = _weight(24, 64, 8, 8, torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.float32, requires_grad=True)
    out = intx_linear(x, weight.qdata, weight.scale, weight.zero_point)
    assert out.dtype == torch.float32
    assert torch.equal(out, intx_linear(x.detach().bfloat16(), weight.qdata, weight.scale, weight.zero_point).float())
    out.sum().backward()
    assert x.grad.dtype == torch.float32


def test_no_input_gradient_is_computed_when_not_needed():
    weight = _weight(24, 64, 8, 8, torch.float32)
    x = torch.randn(4, 64)
    out = intx_linear(x, weight.qdata, weight.scale, weight.zero_point)
    assert not out.requires_grad


def test_autograd_saves_codes_not_the_dense_weight():
    weight = _weight(64, 256, 16, 8, torch.float32)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        intx_linear(x, weight.qdata, weight.scale, weight.zero_point)
    assert any(t.dtype == torch.int8 for t in saved)
    assert not any(t.is_floating_point() and t.shape == (64, 256) for t in saved)


def test_compile_fullgraph_qalora_layer_with_intx_base():
    torch.manual_seed(0)
    layer = QALoRALinear.from_linear(nn.Linear(64, 48), rank=4, alpha=8.0, group_size=8, bits=8)
    assert is_intx_weight(layer.weight)
    with torch.no_grad():
        layer.lora_b.weight.normal_(0.0, 0.05)
    assert_compiled_matches_eager(layer, torch.randn(2, 3, 64, requires_grad=True))
    assert layer.weight.grad is None
