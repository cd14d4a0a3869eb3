"""The native CPU int4 GEMM (``_cpu_int4_native``): exact weights, float64 products,
thread-count independence, the op's path choice and torch.compile (the fallbacks are in
``test_cpu_int4_native_fallback.py``)."""

import importlib

import pytest
import torch

import qalora_tune.ops._cpu_int4_native as native
from qalora_tune.ops import int4_linear, int4_linear_grad_input
from qalora_tune.quantization import quantize_rtn
from qalora_tune.quantization.int4_weight import dequantize_int4, to_torchao_int4
from qalora_tune.quantization.int4_weight import dequantize_packed
from tests.reference import assert_within, matmul_error_bound, seed_each_test  # noqa: F401

op_module = importlib.import_module("qalora_tune.ops.int4_linear")  # not the op it exports

pytestmark = pytest.mark.skipif(
    not native.available(),
    reason="the native int4 GEMM needs Linux, AVX-512 F/BW/VL + AVX512-BF16 and a C++ compiler",
)


def _weight(n, k, group_size, dtype):
    return to_torchao_int4(quantize_rtn(torch.randn(n, k), group_size), device="cpu", dtype=dtype)


def _bound(x, dense, dtype, expected):
    # the int4 matmul bound, plus the weight's own rounding to a 16-bit compute dtype
    bound = matmul_error_bound(x, dense, dtype, expected)
    if dtype != torch.float32:
        bound = bound + 2.0**-8 * (x.double().abs() @ dense.abs().t())
    return bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_the_kernel_multiplies_exactly_the_dequantized_weight(dtype, group_size):
    # x = I: every output is one weight times 1 plus zeros, so any difference from
    # dequantize_packed's values (codes, nibble order, scales, zeros, rounding) shows
    n, k = 192, 512
    weight = _weight(n, k, group_size, dtype)
    expected = dequantize_packed(weight.qdata, weight.scale_and_zero, group_size, n, k, dtype)
    eye_k, eye_n = torch.eye(k, dtype=dtype), torch.eye(n, dtype=dtype)
    forward = native.linear(eye_k, weight.qdata, weight.scale_and_zero, group_size, n)
    backward = native.grad_input(eye_n, weight.qdata, weight.scale_and_zero, group_size, k)
    assert forward.dtype == backward.dtype == dtype
    assert torch.equal(forward, expected.t())
    assert torch.equal(backward, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16, 67, 130])  # remainders of the 6-row and 16-lane tiles
@pytest.mark.parametrize("n,k,group_size", [(64, 256, 64), (120, 384, 32), (256, 2560, 128)])
def test_products_match_float64(dtype, rows, n, k, group_size):
    # n = 120: 128 packed rows, 8 of them padding; k = 2560: a last panel shorter than 256
    weight = _weight(n, k, group_size, dtype)
    dense = dequantize_int4(weight, torch.float64)
    x = torch.randn(rows, k).to(dtype)
    out = native.linear(x, weight.qdata, weight.scale_and_zero, group_size, n)
    expected = x.double() @ dense.t()
    assert out.shape == (rows, n) and out.is_contiguous()
    assert_within(out, expected, _bound(x, dense, dtype, expected), "forward")
    grad = torch.randn(rows, n).to(dtype)
    grad_x = native.grad_input(grad, weight.qdata, weight.scale_and_zero, group_size, k)
    expected_grad = grad.double() @ dense
    assert grad_x.shape == (rows, k) and grad_x.is_contiguous()
    assert_within(grad_x, expected_grad, _bound(grad, dense.t(), dtype, expected_grad), "input gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(dtype):
    weight = _weight(512, 1024, 64, dtype)
    x = torch.randn(40, 1024).to(dtype)
    grad = torch.randn(40, 512).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append((
                native.linear(x, weight.qdata, weight.scale_and_zero, 64, 512),
                native.grad_input(grad, weight.qdata, weight.scale_and_zero, 64, 1024),
            ))
    finally:
        torch.set_num_threads(threads)
    for out, grad_x in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad_x, results[0][1])


def test_the_op_takes_the_native_gemm_where_it_runs(monkeypatch):
    weight = _weight(128, 256, 64, torch.bfloat16)
    calls = []
    for name in ("linear", "grad_input"):
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    rows = op_module.CPU_NATIVE_MIN_ROWS
    int4_linear(torch.randn(rows - 1, 256).bfloat16(), weight.qdata, weight.scale_and_zero, 64, 128)
    assert calls == []  # few bf16 rows: the CPU int4 kernel
    int4_linear(torch.randn(rows, 256).bfloat16(), weight.qdata, weight.scale_and_zero, 64, 128)
    int4_linear_grad_input(torch.randn(2, 128).bfloat16(), weight.qdata, weight.scale_and_zero, 64, 256)
    assert calls == ["linear", "grad_input"]
    fp32 = _weight(128, 256, 64, torch.float32)
    int4_linear(torch.randn(1, 256), fp32.qdata, fp32.scale_and_zero, 64, 128)
    assert calls[-1] == "linear"  # fp32 at any row count
    # weights of partial 64-row blocks, and fp16, stay on the chunked paths
    assert not native.supports(_weight(112, 256, 64, torch.float32).qdata, fp32.scale_and_zero)
    fp16 = _weight(128, 256, 64, torch.float16)
    assert not native.supports(fp16.qdata, fp16.scale_and_zero)
    monkeypatch.setenv("QALORA_TUNE_NATIVE_INT4", "0")
    assert not native.supports(fp32.qdata, fp32.scale_and_zero)


def test_opcheck_on_the_native_path():
    weight = _weight(64, 256, 64, torch.float32)
    x = torch.randn(3, 256, requires_grad=True)
    torch.library.opcheck(int4_linear, (x, weight.qdata, weight.scale_and_zero, 64, 64))
    grad = torch.randn(2, 3, 64)
    torch.library.opcheck(int4_linear_grad_input, (grad, weight.qdata, weight.scale_and_zero, 64, 256))


def test_native_products_inside_torch_compile_and_inference_mode():
    weight = _weight(128, 256, 64, torch.bfloat16)

    def layer(x):
        return int4_linear(x, weight.qdata, weight.scale_and_zero, 64, 128)

    x = torch.randn(32, 256, dtype=torch.bfloat16, requires_grad=True)
    eager = layer(x)
    eager.float().sum().backward()
    eager_grad = x.grad.clone()
    x.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)(x)
    compiled.float().sum().backward()
    assert torch.equal(compiled, eager) and torch.equal(x.grad, eager_grad)
    with torch.inference_mode():
        assert torch.equal(layer(x.detach()), eager)
