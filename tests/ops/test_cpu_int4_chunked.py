import pytest
import torch

import qalora_tune.ops._cpu_int4_chunked as chunked
from qalora_tune.ops import int4_linear, int4_linear_grad_input
from qalora_tune.quantization import quantize_rtn
from qalora_tune.quantization.cpu_int4_layout import CpuInt4Layout, cpu_int4_layout
from qalora_tune.quantization.int4_weight import (
    dequantize_int4,
    dequantize_packed,
    to_torchao_int4,
)
from tests.reference import assert_within, matmul_error_bound


@pytest.fixture(autouse=True)
def chunked_paths(monkeypatch):
    # these tests are about the chunked paths, which the native GEMM replaces where it runs
    monkeypatch.setenv("QALORA_TUNE_NATIVE_INT4", "0")


def _weight(n, k, group_size, dtype=torch.float32):
    return to_torchao_int4(quantize_rtn(torch.randn(n, k), group_size), device="cpu", dtype=dtype)


def _rebuilt(weight, group_size, dtype, by_columns=False):
    """The chunks of one direction, checked to cover the weight in order, concatenated."""
    n_pad, k = weight.qdata.shape[0], weight.shape[1]
    cls = chunked._ColumnChunkDequantizer if by_columns else chunked._ChunkDequantizer
    dequantizer = cls(weight.qdata, weight.scale_and_zero, group_size, k, dtype)
    parts, seen = [], 0
    for start, end, weight_t in dequantizer.chunks():
        assert start == seen  # chunks cover the weight in order, without gaps
        seen = end
        parts.append(weight_t.clone())
    assert seen == (k if by_columns else n_pad)
    return torch.cat(parts, dim=0 if by_columns else 1)


@pytest.mark.parametrize("by_columns", [False, True])  # row blocks (forward), groups (backward)
@pytest.mark.parametrize("chunk_elements", [1 << 19, 1])  # one chunk; one block/group per chunk
@pytest.mark.parametrize("n", [64, 112, 16, 200 * 16])  # full blocks, a partial tail, tail only
def test_chunks_rebuild_the_dequantized_weight_bit_for_bit(monkeypatch, n, chunk_elements, by_columns):
    monkeypatch.setattr(chunked, "_CHUNK_ELEMENTS", chunk_elements)
    k, group_size = 256, 64
    weight = _weight(n, k, group_size)
    expected = dequantize_packed(weight.qdata, weight.scale_and_zero, group_size, n, k)
    rebuilt = _rebuilt(weight, group_size, torch.float32, by_columns)
    assert torch.equal(rebuilt[:, :n].t(), expected)


def test_other_dtypes_round_the_fp32_dequantization_once():
    weight = _weight(112, 128, 32, torch.bfloat16)
    exact = dequantize_packed(weight.qdata, weight.scale_and_zero, 32, 112, 128, torch.float32)
    rebuilt = _rebuilt(weight, 32, torch.bfloat16)
    assert rebuilt.dtype == torch.bfloat16
    assert torch.equal(rebuilt[:, :112].t(), exact.to(torch.bfloat16))
    by_columns = _rebuilt(weight, 32, torch.bfloat16, by_columns=True)
    assert torch.equal(by_columns[:, :112].t(), exact.to(torch.bfloat16))


def _pack_pairs(codes, block_n):
    # the plain-pairs layout: per block of rows, byte (k, j) holds rows 2j (low), 2j+1 (high)
    n, k = codes.shape
    blocks = []
    for start in range(0, n, block_n):
        block = codes[start : start + block_n].to(torch.uint8)
        blocks.append((block[0::2] | block[1::2] << 4).t().reshape(-1))
    return torch.cat(blocks).view(n, k // 2)


def plain_pair_weight(n, k, group_size, block_n):
    """Random codes, scales and zeros packed in plain pairs, and their fp32 dequantization:
    ``(qdata, scale_and_zero, expected (n, k))``."""
    codes = torch.randint(0, 16, (n, k))
    scale = torch.rand(k // group_size, n) + 0.1
    zero = torch.randn(k // group_size, n)
    scale_and_zero = torch.stack([scale, zero], dim=-1)
    expected = (codes.float() - 8).unflatten(-1, (-1, group_size))
    expected = (expected * scale.t().unsqueeze(-1) + zero.t().unsqueeze(-1)).flatten(-2)
    return _pack_pairs(codes, block_n), scale_and_zero, expected


def test_plain_pair_layout(monkeypatch):
    # builds without AVX pack rows as plain pairs; emulate one to cover that branch
    layout = CpuInt4Layout(block_n=32, lanes=1)
    monkeypatch.setattr(chunked, "cpu_int4_layout", lambda: layout)
    monkeypatch.setattr(chunked, "_CHUNK_ELEMENTS", 1)
    n, k, group_size = 80, 128, 32  # two full blocks of 32 rows and a tail of 16
    qdata, scale_and_zero, expected = plain_pair_weight(n, k, group_size, layout.block_n)
    dequantizer = chunked._ChunkDequantizer(qdata, scale_and_zero, group_size, k, torch.float32)
    rebuilt = torch.cat([w.clone() for _, _, w in dequantizer.chunks()], dim=1).t()
    assert torch.equal(rebuilt, expected)
    dequantizer = chunked._ColumnChunkDequantizer(
        qdata, scale_and_zero, group_size, k, torch.float32
    )
    by_columns = torch.cat([w.clone() for _, _, w in dequantizer.chunks()], dim=0).t()
    assert torch.equal(by_columns, expected)


@pytest.mark.parametrize("chunk_elements", [1 << 19, 1])
@pytest.mark.parametrize("n,k,group_size", [(112, 256, 64), (4 * 64 + 48, 512, 128)])
def test_chunked_products_match_float64(monkeypatch, chunk_elements, n, k, group_size):
    monkeypatch.setattr(chunked, "_CHUNK_ELEMENTS", chunk_elements)
    weight = _weight(n, k, group_size)
    dense = dequantize_int4(weight, torch.float64)
    x = torch.randn(3, 7, k, requires_grad=True)
    out = int4_linear(x, weight.qdata, weight.scale_and_zero, group_size, n)
    expected = x.detach().double() @ dense.t()
    bound = matmul_error_bound(x.detach(), dense, torch.float32, expected)
    assert_within(out, expected, bound, "forward")
    grad = torch.randn(3, 7, n)
    out.backward(grad)
    expected_grad = grad.double() @ dense
    bound = matmul_error_bound(grad, dense.t(), torch.float32, expected_grad)
    assert_within(x.grad, expected_grad, bound, "input gradient")


def test_bf16_input_gradient_rounds_once_after_fp32_accumulation(monkeypatch):
    monkeypatch.setattr(chunked, "_CHUNK_ELEMENTS", 1)  # one row block per chunk
    n, k = 64 * 40, 128
    weight = _weight(n, k, 32, torch.bfloat16)
    dense = dequantize_packed(weight.qdata, weight.scale_and_zero, 32, n, k, torch.float32)
    grad = torch.randn(4, n).to(torch.bfloat16)
    grad_x = int4_linear_grad_input(grad, weight.qdata, weight.scale_and_zero, 32, k)
    expected = grad.double() @ dense.to(torch.bfloat16).double()
    # fp32 accumulation over n terms, then one bf16 rounding (not one per row block)
    bound = 2.0**-8 * expected.abs() + n * 2.0**-24 * (grad.double().abs() @ dense.double().abs())
    assert grad_x.dtype == torch.bfloat16
    assert_within(grad_x, expected, 2 * bound + 1e-30, "bf16 input gradient")


def test_large_bf16_batches_use_a_dequantized_gemm_within_bf16_rounding():
    from qalora_tune.ops.int4_linear import CPU_DEQUANTIZE_MIN_ROWS

    n, k = 112, 256
    weight = _weight(n, k, 64, torch.bfloat16)
    dense = dequantize_int4(weight, torch.float64)
    x = torch.randn(CPU_DEQUANTIZE_MIN_ROWS, k).to(torch.bfloat16)
    out = int4_linear(x, weight.qdata, weight.scale_and_zero, 64, n)
    expected = x.double() @ dense.t()
    # the matmul bound of the int4 kernel, plus the weight's own rounding to bf16
    bound = matmul_error_bound(x, dense, torch.bfloat16, expected)
    bound = bound + 2.0**-8 * (x.double().abs() @ dense.abs().t())
    assert_within(out, expected, bound, "bf16 forward through dequantized chunks")
    # and the int4 kernel on the first rows (below the threshold) agrees as closely
    few = int4_linear(x[:8], weight.qdata, weight.scale_and_zero, 64, n)
    assert_within(few, expected[:8], bound[:8], "bf16 forward through the int4 kernel")


def test_chunks_use_the_detected_layout():
    weight = _weight(64, 128, 32)
    dequantizer = chunked._ChunkDequantizer(
        weight.qdata, weight.scale_and_zero, 32, 128, torch.float32
    )
    assert dequantizer.block_n == cpu_int4_layout().block_n


def test_grad_input_opcheck():
    weight = _weight(48, 256, 64)
    grad = torch.randn(2, 3, 48)
    torch.library.opcheck(
        int4_linear_grad_input, (grad, weight.qdata, weight.scale_and_zero, 64, 256)
    )
