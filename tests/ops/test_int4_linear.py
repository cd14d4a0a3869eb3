import pytest
import torch

from qalora_tune.ops import int4_linear
from qalora_tune.quantization import quantize_rtn
from qalora_tune.quantization.int4_weight import dequantize_int4, to_torchao_int4
from tests.reference import (
    CUDA_SKIP_REASON,
    assert_linear_op_matches_float64,
    assert_within,
    matmul_error_bound,
    requires_cuda,
)


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


# ------------------------------------------------------------- tinygemm layout (CUDA's packing)


def _tinygemm_weight(n, k, group_size, device="cpu"):
    from qalora_tune.quantization.int4_weight import tinygemm_int4

    return tinygemm_int4(quantize_rtn(torch.randn(n, k), group_size), device, torch.bfloat16)


@pytest.mark.parametrize("n,k,group_size", [(48, 128, 32), (96, 256, 64), (40, 1536, 128)])
def test_tinygemm_layout_dense_path_matches_float64(n, k, group_size):
    # the path CUDA takes for many rows and for every input gradient, run here on CPU
    weight = _tinygemm_weight(n, k, group_size)
    assert weight.qdata.dim() == 4
    assert_linear_op_matches_float64(
        lambda x: int4_linear(x, weight.qdata, weight.scale_and_zero, group_size, n),
        dequantize_int4(weight, torch.float64),
        torch.bfloat16,
    )


def test_opcheck_tinygemm_layout():
    weight = _tinygemm_weight(48, 256, 64)
    x = torch.randn(3, 256, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(int4_linear, (x, weight.qdata, weight.scale_and_zero, 64, 48))


@pytest.mark.skipif(not requires_cuda, reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("rows", [1, 16, 200])
def test_cuda_kernel_and_dense_paths_agree(monkeypatch, rows):
    import importlib

    op_module = importlib.import_module("qalora_tune.ops.int4_linear")  # not the op it exports

    weight = _tinygemm_weight(96, 1536, 64, "cuda")
    dense = dequantize_int4(weight, torch.float64)
    x = torch.randn(rows, 1536, device="cuda", dtype=torch.bfloat16)
    expected = x.double() @ dense.t()
    bound = matmul_error_bound(x, dense, torch.bfloat16, expected)
    outputs = []
    for threshold in (1 << 30, 0):  # tinygemm for every row count, then never
        monkeypatch.setattr(op_module, "CUDA_DEQUANTIZE_MIN_ROWS", threshold)
        outputs.append(int4_linear(x, weight.qdata, weight.scale_and_zero, 64, 96))
        assert_within(outputs[-1], expected, bound, f"threshold {threshold}")
    # the same bf16 weight values: the two differ only by summation order
    assert_within(outputs[0], outputs[1].double(), 2 * bound, "kernel vs dense")
    grad = torch.randn(rows, 96, device="cuda", dtype=torch.bfloat16)
    from qalora_tune.ops import int4_linear_grad_input

    grad_x = int4_linear_grad_input(grad, weight.qdata, weight.scale_and_zero, 64, 1536)
    expected_grad = grad.double() @ dense
    assert_within(grad_x, expected_grad, matmul_error_bound(grad, dense.t(), torch.bfloat16, expected_grad), "grad")
