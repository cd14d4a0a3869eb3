import io

import pytest
import torch
import torch.nn.functional as F

from qalora_tune._compat import Int4OpaqueTensor, Int4TilePackedTo4dTensor
from qalora_tune.quantization import quantize_rtn
from qalora_tune.quantization.int4_weight import (
    dequantize_int4,
    from_torchao_int4,
    to_torchao_int4,
    zero_points,
)
from tests.reference import (
    CUDA_SKIP_REASON,
    assert_within,
    matmul_error_bound,
    requires_cuda,
)


def _quantized(n=96, k=256, group_size=64):
    return quantize_rtn(torch.randn(n, k), group_size)


@pytest.mark.parametrize("n", [16, 40, 96, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_round_trip_is_exact(n, dtype):
    gq = _quantized(n=n)
    weight = to_torchao_int4(gq, device="cpu", dtype=dtype)
    assert isinstance(weight, Int4OpaqueTensor)
    assert weight.shape == (n, 256) and weight.dtype == dtype and not weight.requires_grad
    back = from_torchao_int4(weight)
    assert torch.equal(back.qdata, gq.qdata)
    assert torch.equal(back.scale, gq.scale.to(dtype))
    assert torch.equal(back.zero, gq.zero.to(dtype))
    assert torch.equal(dequantize_int4(weight, torch.float64), back.dequantize(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchao_linear_matches_float64_dequantized_reference(dtype):
    weight = to_torchao_int4(_quantized(n=40), device="cpu", dtype=dtype)
    x = torch.randn(7, 256).to(dtype)
    dense = dequantize_int4(weight, torch.float64)
    expected = x.double() @ dense.t()
    assert_within(F.linear(x, weight), expected, matmul_error_bound(x, dense, dtype, expected), "int4 mm")


def test_zero_points_view_writes_through():
    weight = to_torchao_int4(_quantized(), device="cpu", dtype=torch.float32)
    zeros = zero_points(weight)
    assert zeros.shape == (96, 4)
    before = dequantize_int4(weight, torch.float64)
    zeros.add_(1.0)
    torch.testing.assert_close(dequantize_int4(weight, torch.float64), before + 1.0, rtol=0, atol=1e-6)


def test_dtype_cast_recasts_scales_and_zeros():
    weight = to_torchao_int4(_quantized(), device="cpu", dtype=torch.float32)
    cast = weight.to(torch.bfloat16)
    assert isinstance(cast, Int4OpaqueTensor)
    assert cast.dtype == cast.scale_and_zero.dtype == torch.bfloat16
    assert torch.equal(from_torchao_int4(cast).qdata, from_torchao_int4(weight).qdata)


def test_torch_save_round_trip_with_weights_only():
    weight = to_torchao_int4(_quantized(), device="cpu", dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save({"w": weight}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["w"]
    assert torch.equal(loaded.qdata, weight.qdata)
    assert torch.equal(loaded.scale_and_zero, weight.scale_and_zero)


def test_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="group_size=16 has no int4 kernel"):
        to_torchao_int4(quantize_rtn(torch.randn(16, 64), 16))
    with pytest.raises(ValueError, match="no int4 kernel for device meta"):
        to_torchao_int4(_quantized(), device="meta")
    with pytest.raises(TypeError, match="expected Int4OpaqueTensor"):
        from_torchao_int4(torch.randn(4, 4))


@pytest.mark.skipif(not requires_cuda, reason=CUDA_SKIP_REASON)
def test_cuda_tile_packed_round_trip_and_device_moves():
    gq = _quantized(n=40)
    weight = to_torchao_int4(gq, device="cuda")
    assert isinstance(weight, Int4TilePackedTo4dTensor)
    back = from_torchao_int4(weight)
    assert torch.equal(back.qdata.cpu(), gq.qdata)
    assert torch.equal(back.zero.cpu(), gq.zero.to(torch.bfloat16))
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    dense = dequantize_int4(weight, torch.float64)
    expected = x.double() @ dense.t()
    bound = matmul_error_bound(x, dense, torch.bfloat16, expected)
    assert_within(F.linear(x, weight), expected, bound, "tinygemm")
    on_cpu = weight.to("cpu")
    assert isinstance(on_cpu, Int4OpaqueTensor)
    assert torch.equal(from_torchao_int4(on_cpu).qdata, gq.qdata)
    again = on_cpu.to("cuda")
    assert isinstance(again, Int4TilePackedTo4dTensor)
    assert torch.equal(again.scale_and_zero, weight.scale_and_zero)


# tinygemm's layout built on CPU (pack_tinygemm_int4): everything but the CUDA kernel itself


def _tinygemm_cpu(gq):
    from qalora_tune.quantization.int4_weight import tinygemm_int4

    return tinygemm_int4(gq, "cpu", torch.bfloat16)


@pytest.mark.parametrize("n,k", [(40, 256), (96, 1536)])
def test_tinygemm_layout_round_trip_on_cpu_is_exact(n, k):
    gq = _quantized(n=n, k=k)
    weight = _tinygemm_cpu(gq)
    assert isinstance(weight, Int4TilePackedTo4dTensor) and weight.shape == (n, k)
    back = from_torchao_int4(weight)
    assert torch.equal(back.qdata, gq.qdata)
    assert torch.equal(back.scale, gq.scale.to(torch.bfloat16))
    assert torch.equal(back.zero, gq.zero.to(torch.bfloat16))
    assert torch.equal(dequantize_int4(weight, torch.float64), back.dequantize(torch.float64))


def test_tinygemm_layout_zero_points_write_through():
    weight = _tinygemm_cpu(_quantized())
    before = from_torchao_int4(weight)
    zero_points(weight).add_(1.0)
    after = from_torchao_int4(weight)
    assert torch.equal(after.qdata, before.qdata) and torch.equal(after.scale, before.scale)
    assert torch.equal(after.zero, before.zero + 1.0)  # the same bf16 rounding


def test_tinygemm_layout_with_eight_bit_scales():
    from qalora_tune.quantization.double_quant import (
        double_quantize_scales,
        is_double_quant,
    )
    from qalora_tune.quantization.int4_weight import (
        _with_scale_codes,
        with_dense_scales,
    )

    gq = _quantized(n=40)
    rounded, codes, scale_min, scale_step = double_quantize_scales(gq)
    weight = _with_scale_codes(_tinygemm_cpu(rounded), codes, scale_min, scale_step)
    assert is_double_quant(weight) and weight.qdata.dim() == 4
    dense = with_dense_scales(weight)
    assert isinstance(dense, Int4TilePackedTo4dTensor)
    back = from_torchao_int4(weight)
    assert torch.equal(back.qdata, gq.qdata)
    assert torch.equal(back.scale, rounded.scale.to(torch.bfloat16))
    assert torch.equal(dequantize_int4(weight), dequantize_int4(dense))


@pytest.mark.parametrize(
    "layout,dtype", [("cpu", torch.bfloat16), ("cpu", torch.float16), ("tinygemm", torch.bfloat16)]
)
def test_sixteen_bit_dequantization_rounds_the_fp32_one_once(layout, dtype):
    from qalora_tune.quantization.int4_weight import dequantize_packed

    gq = _quantized(n=40, k=1536)
    weight = to_torchao_int4(gq, device="cpu", dtype=dtype) if layout == "cpu" else _tinygemm_cpu(gq)
    args = (weight.qdata, weight.scale_and_zero, 64, 40, 1536)
    dense = dequantize_packed(*args)
    assert dense.dtype == dtype and dense.shape == (40, 1536)
    assert torch.equal(dense, dequantize_packed(*args, dtype=torch.float32).to(dtype))


@pytest.mark.skipif(not requires_cuda, reason=CUDA_SKIP_REASON)
def test_cuda_unpacked_weight_equals_the_kernels_identity_product():
    """The tensor-op unpack gives the weight that tinygemm multiplies with: the identity
    through the kernel (the way back before ``tinygemm_layout``) yields the same bf16."""
    from qalora_tune.quantization.int4_weight import dequantize_packed

    weight = to_torchao_int4(_quantized(n=96, k=1536), device="cuda")
    k_pad = weight.qdata.shape[1] * 8 * 16
    eye = torch.eye(k_pad, dtype=torch.bfloat16, device="cuda")
    through_kernel = torch.ops.aten._weight_int4pack_mm(
        eye, weight.qdata, 64, weight.scale_and_zero
    )[:1536, :96].t()
    unpacked = dequantize_packed(weight.qdata, weight.scale_and_zero, 64, 96, 1536)
    assert torch.equal(unpacked, through_kernel)
