import pytest
import torch

from qalora_tune.ops import int4_linear
from qalora_tune.quantization import dequantize_int4, quantize_rtn, to_torchao_int4
from tests.reference import assert_linear_op_matches_float64


def _weight(n, k, group_size, dtype):
    return to_torchao_int4(quantize_rtn(torch.randn(n, k), group_size), device="cpu", dtype=dtype)


@pytest.mark.parametrize("n,k,group_size", [(48, 128, 32), (96, 256, 64), (40, 512, 128), (64, 512, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_match_float64(n, k, group_size, dtype):
    weight = _weight(n, k, group_size, dtype)
    assert_linear_op_matches_float64(
        lambda x: int4_linear(x, weight.qdata, weight.scale_and_zero, group_size, n),
        dequantize_int4(weight, torch.float64),
        dtype,
    )


def test_opcheck():
    weight = _weight(48, 256, 64, torch.float32)
    x = torch.randn(3, 256, requires_grad=True)
    torch.library.opcheck(int4_linear, (x, weight.qdata, weight.scale_and_zero, 64, 48))
