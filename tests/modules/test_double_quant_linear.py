"""QuantizedLinear / QALoRALinear with 8-bit scales (``double_quant_scales=True``): numerics
against float64, the exact merge, and conversion between the two scale storages."""

import io

import pytest
import torch
from torch import nn

from qalora_tune import QALoRALinear, QuantizedLinear
from qalora_tune._compat import Int4OpaqueTensor
from qalora_tune.quantization import DoubleQuantInt4Tensor, quantize_rtn
from qalora_tune.quantization.double_quant import double_quantize_scales
from qalora_tune.quantization.int4_weight import (
    dequantize_int4,
    from_torchao_int4,
    to_torchao_int4,
    zero_points,
)
from tests.modules.test_qalora_linear import _check_forward_and_gradients
from tests.reference import (
    CUDA_SKIP_REASON,
    UNIT_ROUNDOFF,
    assert_within,
    matmul_error_bound,
    pooled_lora_reference,
    requires_cuda,
    seed_each_test,  # noqa: F401 (an autouse fixture: importing it activates it)
)


def _layer(in_dim=256, out_dim=96, group_size=64, dtype=torch.float32, **kwargs):
    layer = QALoRALinear.from_linear(
        nn.Linear(in_dim, out_dim), rank=8, alpha=16.0, group_size=group_size, dtype=dtype,
        double_quant_scales=True, **kwargs,
    )
    with torch.no_grad():
        layer.lora_b.weight.normal_(0.0, 0.05)
    return layer


@pytest.mark.parametrize("in_dim,out_dim,group_size", [(128, 48, 32), (256, 200, 64), (512, 64, 128)])
@pytest.mark.parametrize("bits", [2, 4])
def test_forward_and_gradients_match_float64(in_dim, out_dim, group_size, bits):
    layer = _layer(in_dim, out_dim, group_size, bits=bits)
    assert isinstance(layer.weight, DoubleQuantInt4Tensor)
    x = torch.randn(3, 7, in_dim, requires_grad=True)
    _check_forward_and_gradients(layer, x, dequantize_int4(layer.weight, torch.float64), matmul_error_bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_forward_and_input_gradient_match_float64(dtype):
    layer = QuantizedLinear.from_linear(nn.Linear(256, 40).to(dtype), group_size=32,
                                   double_quant_scales=True)
    assert isinstance(layer.weight, DoubleQuantInt4Tensor) and layer.weight.dtype == dtype
    dense = dequantize_int4(layer.weight, torch.float64)
    x = torch.randn(2, 5, 256, requires_grad=True)
    out = layer(x)
    expected = x.detach().double() @ dense.t() + layer.bias.double()
    bound = matmul_error_bound(x.detach(), dense, dtype, expected) + 2 * UNIT_ROUNDOFF[dtype] * (
        expected.abs() + layer.bias.double().abs()
    )
    assert_within(out, expected, bound, "forward")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_grad = grad.double() @ dense
    assert_within(x.grad, expected_grad, matmul_error_bound(grad, dense.t(), dtype, expected_grad),
                  "input gradient")


def test_the_base_is_the_rounded_quantization_of_the_weight():
    linear = nn.Linear(256, 96)
    layer = QuantizedLinear.from_linear(linear, group_size=64, double_quant_scales=True)
    rounded = double_quantize_scales(quantize_rtn(linear.weight.detach(), 64))[0]
    torch.testing.assert_close(dequantize_int4(layer.weight), rounded.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_is_a_zero_point_update_and_unmerge_restores_it(dtype):
    layer = _layer(512, 128, 64, dtype=dtype)
    x = torch.randn(16, 512).to(dtype)
    codes = layer.weight.scale_codes.clone()
    zeros = zero_points(layer.weight).clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
        dense = dequantize_int4(layer.weight, torch.float64)
    assert torch.equal(layer.weight.scale_codes, codes)  # the 8-bit scales are untouched
    u = UNIT_ROUNDOFF[dtype]
    group_sums = x.double().unflatten(-1, (-1, 64)).sum(-1).abs()
    zero_rounding = u * group_sums @ zero_points(layer.weight).double().abs().t()
    exact = x.double() @ dense.t()
    kernel = matmul_error_bound(x, dense, dtype, exact)
    adapter_rounding = 4 * u * (unmerged.double().abs() + x.double().abs() @ dense.abs().t())
    assert_within(merged, unmerged, zero_rounding + 2 * kernel + adapter_rounding, "merged vs unmerged")
    layer.unmerge()
    assert torch.equal(zero_points(layer.weight), zeros)
    with torch.no_grad():
        assert torch.equal(layer(x), unmerged)


def test_merged_fp32_output_is_within_1e_6_of_unmerged():
    layer = _layer(512, 128, 64)
    x = torch.randn(16, 512)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        relative = ((layer(x) - unmerged).norm(dim=-1) / unmerged.norm(dim=-1)).max()
    assert relative < 2e-6


def test_a_plain_int4_state_is_double_quantized_on_arrival():
    linear = nn.Linear(256, 96)
    plain = QALoRALinear.from_linear(linear, rank=8, alpha=16.0, group_size=64)
    fresh = QALoRALinear(256, 96, rank=8, alpha=16.0, group_size=64, use_bias=True,
                         double_quant_scales=True)
    fresh.load_state_dict(plain.state_dict())
    assert isinstance(fresh.weight, DoubleQuantInt4Tensor)
    gq = from_torchao_int4(plain.weight)
    expected = double_quantize_scales(gq)[0]
    torch.testing.assert_close(dequantize_int4(fresh.weight), expected.dequantize(), rtol=0, atol=1e-6)
    # within the scale rounding of the dense base: |q - 8| * step / 2 per value, plus the
    # group mean the zero point takes, plus float32 slack
    step = fresh.weight.scale_step[:96].double()
    centred = (gq.qdata.double() - 8).unflatten(-1, (-1, 64)).abs()
    bound = ((centred + centred.mean(-1, keepdim=True)) * step[:, None, None] / 2).flatten(-2)
    before = dequantize_int4(plain.weight, torch.float64)
    change = (dequantize_int4(fresh.weight, torch.float64) - before).abs()
    assert (change <= bound + 4 * UNIT_ROUNDOFF[torch.float32] * before.abs() + 1e-12).all()
    assert change.max() > 0  # the scales really were rounded


def test_eight_bit_scales_load_into_a_plain_layer_exactly():
    layer = _layer()
    fresh = QALoRALinear(256, 96, rank=8, alpha=16.0, group_size=64, use_bias=True)
    fresh.load_state_dict(layer.state_dict())
    assert isinstance(fresh.weight, Int4OpaqueTensor)
    assert torch.equal(dequantize_int4(fresh.weight), dequantize_int4(layer.weight))
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def test_state_dict_round_trip_through_torch_save():
    layer = _layer()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = QALoRALinear(256, 96, rank=8, alpha=16.0, group_size=64, use_bias=True,
                         double_quant_scales=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def test_from_int4_keeps_the_storage_it_is_given():
    gq = quantize_rtn(torch.randn(48, 256), 64)
    dq = to_torchao_int4(gq, device="cpu", double_quant=True)
    layer = QuantizedLinear.from_int4(dq)
    assert layer.double_quant_scales and layer.weight is not None
    assert isinstance(layer.weight, DoubleQuantInt4Tensor)
    plain_layer = QuantizedLinear.from_int4(dq, double_quant_scales=False)
    assert isinstance(plain_layer.weight, Int4OpaqueTensor)
    assert torch.equal(dequantize_int4(plain_layer.weight), dequantize_int4(dq))
    assert "double_quant_scales=True" in repr(layer)
    assert "double_quant_scales" not in repr(plain_layer)


def test_extra_repr_names_the_eight_bit_scales():
    layer = _layer()
    assert "double_quant_scales=True" in layer.extra_repr()
    assert "rank=8" in layer.extra_repr()
    plain = QALoRALinear(256, 96, rank=8, alpha=16.0, group_size=64)
    assert "double_quant_scales" not in plain.extra_repr()


def test_meta_layer_has_the_structure_of_a_real_one():
    real = QALoRALinear(256, 96, rank=8, alpha=16.0, group_size=64, double_quant_scales=True)
    meta = QALoRALinear(256, 96, rank=8, alpha=16.0, group_size=64, double_quant_scales=True,
                        device="meta")
    assert isinstance(meta.weight, DoubleQuantInt4Tensor)
    for name in DoubleQuantInt4Tensor.tensor_data_names:
        got, want = getattr(meta.weight, name), getattr(real.weight, name)
        assert (got.shape, got.dtype) == (want.shape, want.dtype), name


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 8)])
def test_eight_bit_scales_off_the_int4_kernels_are_refused(bits, group_size):
    with pytest.raises(ValueError, match="model.double_quant_scales"):
        QALoRALinear(256, 96, rank=8, alpha=16.0, group_size=group_size, bits=bits,
                     double_quant_scales=True)
    with pytest.raises(ValueError, match="model.double_quant_scales"):
        QuantizedLinear(256, 96, group_size=group_size, bits=bits, double_quant_scales=True,
                   device="meta")


@pytest.mark.skipif(not requires_cuda, reason=CUDA_SKIP_REASON)
def test_cuda_layer_with_eight_bit_scales_matches_reference_and_merges():
    layer = _layer(dtype=torch.float32)
    codes = layer.weight.scale_codes[:4, :96].clone()
    layer = layer.to("cuda")  # repacks the codes as tinygemm, bf16 zeros, same scale codes
    assert isinstance(layer.weight, DoubleQuantInt4Tensor) and layer.weight.qdata.dim() == 4
    assert torch.equal(layer.weight.scale_codes[:4, :96].cpu(), codes)
    layer.lora_a.to(torch.bfloat16)
    layer.lora_b.to(torch.bfloat16)
    layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    dense = dequantize_int4(layer.weight, torch.float64)
    x64 = x.detach().double()
    ref = x64 @ dense.t() + layer.bias.double() + pooled_lora_reference(
        x64, layer.lora_a.weight, layer.lora_b.weight, 64, layer.scaling
    )
    bound = matmul_error_bound(x.detach(), dense, torch.bfloat16, ref) + 8 * UNIT_ROUNDOFF[torch.bfloat16] * ref.abs()
    assert_within(out, ref, bound, "cuda forward")
    out.float().sum().backward()
    assert x.grad is not None and layer.lora_b.weight.grad is not None
    zeros = zero_points(layer.weight).clone()
    layer.merge()
    layer.unmerge()
    assert torch.equal(zero_points(layer.weight), zeros)
