import pytest
import torch

from qalora_tune.ops import int4_linear
from qalora_tune.quantization import dequantize_int4, quantize_rtn, to_torchao_int4
from tests.reference import assert_within, matmul_error_bound


def _weight(n, k, group_size, dtype):
    return to_torchao_int4(quantize_rtn(torch.randn(n, k), group_size), device="cpu", dtype=dtype)


@pytest.mark.parametrize("n,k,group_size", [(48, 128, 32), (96, 256, 64), (40, 512, 128), (64, 512, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_match_float64(n, k, group_size, dtype):
    weight = _weight(n, k, group_size, dtype)
    dense = dequantize_int4(weight, torch.float64)
    x = torch.randn(2, 5, k, requires_grad=True)
    out = int4_linear(x, weight.qdata, weight.scale_and_zero, group_size, n)
    assert out.shape == (2, 5, n) and out.dtype == torch.float32
    expected = x.detach().double() @ dense.t()
    assert_within(out, expected, matmul_error_bound(x.detach(), dense, dtype, expected), "forward")

    grad = torch.randn(2, 5, n)
    out.backward(grad)
    expected_grad = grad.double() @ dense
    # the backward runs in the weight's dtype: grad rounded to it, fp32 accumulation over n
    bound = matmul_error_bound(grad, dense.t(), dtype, expected_grad)
    assert_within(x.grad, expected_grad, bound, "input gradient")


def test_opcheck():
    weight = _weight(48, 256, 64, torch.float32)
    x = torch.randn(3, 256, requires_grad=True)
    torch.library.opcheck(int4_linear, (x, weight.qdata, weight.scale_and_zero, 64, 48))
