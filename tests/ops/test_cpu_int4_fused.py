"""The compiled chunk kernels: bit-identical to the eager passes, cached, and optional."""

import warnings

import pytest
import torch

import qalora_tune.ops._cpu_int4_chunked as chunked
import qalora_tune.ops._cpu_int4_fused as fused
from qalora_tune.ops import int4_linear, int4_linear_grad_input
from qalora_tune.quantization import quantize_rtn
from qalora_tune.quantization.cpu_int4_layout import CpuInt4Layout, cpu_int4_layout
from qalora_tune.quantization.int4_weight import dequantize_int4, to_torchao_int4
from tests.ops.test_cpu_int4_chunked import plain_pair_weight
from tests.reference import assert_within, matmul_error_bound


@pytest.fixture(autouse=True)
def chunked_paths(monkeypatch):
    # the compiled chunks run where the native GEMM does not; these tests are about them
    monkeypatch.setenv("QALORA_TUNE_NATIVE_INT4", "0")


@pytest.fixture(autouse=True)
def fresh_kernels():
    fused._reset(failed=False)
    yield
    fused._reset(failed=False)


def _weight(n, k, group_size, dtype):
    return to_torchao_int4(quantize_rtn(torch.randn(n, k), group_size), device="cpu", dtype=dtype)


def _chunks(qdata, scale_and_zero, group_size, k, dtype, by_columns, compiled):
    cls = chunked._ColumnChunkDequantizer if by_columns else chunked._ChunkDequantizer
    dequantizer = cls(qdata, scale_and_zero, group_size, k, dtype, compiled)
    parts = [(start, end, w.clone()) for start, end, w in dequantizer.chunks()]
    return torch.cat([w for _, _, w in parts], dim=0 if by_columns else 1), parts


@pytest.mark.parametrize("by_columns", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [128, 112])  # whole blocks; a partial tail block (kept eager)
def test_compiled_chunks_equal_the_eager_chunks_bit_for_bit(monkeypatch, n, dtype, by_columns):
    # two chunks per direction, so the kernel is reused on a second chunk's bytes
    monkeypatch.setattr(chunked, "_COMPILED_CHUNK_ELEMENTS", 256 * 64)
    k, group_size = 256, 64
    weight = _weight(n, k, group_size, dtype)
    args = (weight.qdata, weight.scale_and_zero, group_size, k, dtype, by_columns)
    eager, _ = _chunks(*args, compiled=False)
    compiled, parts = _chunks(*args, compiled=True)
    assert compiled.dtype == dtype
    assert torch.equal(compiled, eager)
    assert len(parts) >= 2
    # a kernel ran: whole-block chunks do not go through the eager code buffer
    if not by_columns or n % cpu_int4_layout().block_n == 0:
        assert fused._kernels


def test_plain_pair_layout_compiled(monkeypatch):
    layout = CpuInt4Layout(block_n=32, lanes=1)
    monkeypatch.setattr(chunked, "cpu_int4_layout", lambda: layout)
    n, k, group_size = 96, 128, 32  # three full blocks of plain pairs
    qdata, scale_and_zero, expected = plain_pair_weight(n, k, group_size, layout.block_n)
    for by_columns in (False, True):
        rebuilt, _ = _chunks(qdata, scale_and_zero, group_size, k, torch.float32, by_columns, True)
        assert torch.equal(rebuilt.t(), expected)
    assert len(fused._kernels) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_with_compiled_chunks_match_float64(monkeypatch, dtype):
    monkeypatch.setattr(fused, "COMPILED_MIN_ELEMENTS", 0)  # every weight compiled
    n, k, group_size = 192, 256, 64
    weight = _weight(n, k, group_size, dtype)
    dense = dequantize_int4(weight, torch.float64)
    x = torch.randn(300, k).to(dtype).requires_grad_()  # past both row thresholds
    out = int4_linear(x, weight.qdata, weight.scale_and_zero, group_size, n)
    expected = x.detach().double() @ dense.t()
    bound = matmul_error_bound(x.detach(), dense, dtype, expected)
    assert_within(out, expected, bound, "forward")
    grad = torch.randn(300, n).to(dtype)
    out.backward(grad)
    expected_grad = grad.double() @ dense
    bound = matmul_error_bound(grad, dense.t(), dtype, expected_grad)
    assert_within(x.grad, expected_grad, bound, "input gradient")
    assert fused._kernels  # the products above went through compiled kernels


def test_kernels_are_compiled_once_per_layout(monkeypatch):
    calls = []
    real = fused.inductor_compile
    monkeypatch.setattr(fused, "inductor_compile", lambda fn, ex: calls.append(1) or real(fn, ex))
    weight = _weight(128, 256, 64, torch.float32)
    x = torch.randn(4, 256)
    first = chunked.chunked_int4_linear(x, weight.qdata, weight.scale_and_zero, 64, 128, compiled=True)
    assert len(calls) == 1
    again = chunked.chunked_int4_linear(x, weight.qdata, weight.scale_and_zero, 64, 128, compiled=True)
    assert len(calls) == 1 and torch.equal(first, again)
    other = _weight(128, 256, 64, torch.float32)  # same shapes, other values: same kernel
    chunked.chunked_int4_linear(x, other.qdata, other.scale_and_zero, 64, 128, compiled=True)
    assert len(calls) == 1


def test_a_failed_compile_warns_once_and_falls_back(monkeypatch):
    calls = []

    def broken(fn, examples):
        calls.append(1)
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(fused, "inductor_compile", broken)
    weight = _weight(128, 256, 64, torch.float32)
    x = torch.randn(4, 256)
    expected = chunked.chunked_int4_linear(
        x, weight.qdata, weight.scale_and_zero, 64, 128, compiled=False
    )
    with pytest.warns(UserWarning, match="could not compile.*no C\\+\\+ compiler.*eager path"):
        out = chunked.chunked_int4_linear(
            x, weight.qdata, weight.scale_and_zero, 64, 128, compiled=True
        )
    assert torch.equal(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        grad_x = chunked.chunked_int4_grad_input(
            torch.randn(4, 128), weight.qdata, weight.scale_and_zero, 64, 256, compiled=True
        )
    assert grad_x.shape == (4, 256) and len(calls) == 1
    assert not fused.use_compiled(1 << 30)


def test_use_compiled_by_size_and_environment(monkeypatch):
    monkeypatch.delenv("QALORA_TUNE_EAGER_DEQUANTIZE", raising=False)
    assert fused.use_compiled(fused.COMPILED_MIN_ELEMENTS)
    assert not fused.use_compiled(fused.COMPILED_MIN_ELEMENTS - 1)
    monkeypatch.setenv("QALORA_TUNE_EAGER_DEQUANTIZE", "1")
    assert not fused.use_compiled(fused.COMPILED_MIN_ELEMENTS)
    monkeypatch.setenv("QALORA_TUNE_EAGER_DEQUANTIZE", "0")
    assert fused.use_compiled(fused.COMPILED_MIN_ELEMENTS)


def test_compiled_chunks_under_inference_mode_and_inside_torch_compile(monkeypatch):
    monkeypatch.setattr(fused, "COMPILED_MIN_ELEMENTS", 0)
    weight = _weight(128, 256, 64, torch.bfloat16)
    x = torch.randn(300, 256).to(torch.bfloat16)
    eager = chunked.chunked_int4_linear(
        x, weight.qdata, weight.scale_and_zero, 64, 128, compiled=False
    )
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")  # compiled, not a fallback
        out = int4_linear(x, weight.qdata, weight.scale_and_zero, 64, 128)
    assert fused._kernels
    assert torch.equal(out, eager)

    @torch.compile(fullgraph=True)
    def step(x, grad):
        y = int4_linear(x, weight.qdata, weight.scale_and_zero, 64, 128)
        return y, int4_linear_grad_input(grad, weight.qdata, weight.scale_and_zero, 64, 256)

    grad = torch.randn(300, 128).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, grad_x = step(x, grad)
    assert torch.equal(y, eager)
    expected_grad = chunked.chunked_int4_grad_input(
        grad, weight.qdata, weight.scale_and_zero, 64, 256, compiled=False
    )
    torch.testing.assert_close(grad_x, expected_grad, rtol=0, atol=0)
