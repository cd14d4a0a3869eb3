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


# ------------------------------------------------------------- the one-row (decode) path


def _calls_of_the_op(monkeypatch):
    """Count the calls of ``qalora_tune::int4_linear`` that ``F.linear`` on a base makes."""
    from qalora_tune.ops import base_linear

    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return int4_linear(*args)

    monkeypatch.setattr(base_linear, "int4_linear", counted)
    return calls


@pytest.mark.parametrize("shape", [(256,), (1, 256), (1, 1, 256)])
@pytest.mark.parametrize("n", [48, 40, 200])  # 40, 200: the packing pads the rows
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_row_takes_the_kernel_directly_and_matches_the_op_bit_for_bit(monkeypatch, shape, n, dtype):
    import torch.nn.functional as F

    weight = _weight(n, 256, 64, dtype)
    calls = _calls_of_the_op(monkeypatch)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        fast = F.linear(x, weight)
        reference = int4_linear(x, weight.qdata, weight.scale_and_zero, 64, n)
    assert calls == []  # the op was not called: the kernel was
    assert fast.shape == (*shape[:-1], n) and fast.dtype == dtype and fast.is_contiguous()
    assert torch.equal(fast, reference)
    dense = dequantize_int4(weight, torch.float64)
    assert_within(fast, x.double() @ dense.t(), matmul_error_bound(x, dense, dtype), "one row")


@pytest.mark.parametrize("case", ["two rows", "input gradient", "fp32", "dtype mismatch", "compiling"])
def test_other_calls_go_through_the_op(monkeypatch, case):
    import torch.nn.functional as F

    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    weight = _weight(48, 256, 64, dtype)
    calls = _calls_of_the_op(monkeypatch)
    x = torch.randn(2 if case == "two rows" else 1, 256, dtype=dtype)
    if case == "dtype mismatch":
        x = x.float()
    if case == "input gradient":
        x.requires_grad_(True)
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = F.linear(x, weight)
    assert len(calls) == 1
    if case == "input gradient":  # the op's autograd carries it
        out.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


def test_one_row_with_grad_mode_off_needs_no_autograd(monkeypatch):
    """A tensor that requires grad, under no_grad (generation inside a training run), takes
    the kernel: nothing would be recorded for it anyway."""
    import torch.nn.functional as F

    weight = _weight(48, 256, 64, torch.bfloat16)
    calls = _calls_of_the_op(monkeypatch)
    x = torch.randn(1, 256, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        out = F.linear(x, weight)
    assert calls == [] and not out.requires_grad
