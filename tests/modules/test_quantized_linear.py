import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qalora_tune import QALoRALinear, QuantizedLinear
from qalora_tune._compat import Int4OpaqueTensor
from qalora_tune.quantization.int4_weight import dequantize_int4, zero_points
from tests.reference import (
    UNIT_ROUNDOFF,
    assert_within,
    matmul_error_bound,
    pooled_lora_reference,
)


def test_frozen_int4_linear_matches_float64_and_passes_input_gradient():
    linear = nn.Linear(192, 80)
    layer = QuantizedLinear.from_linear(linear, group_size=64)
    x = torch.randn(3, 5, 192, requires_grad=True)
    out = layer(x)
    dense = dequantize_int4(layer.weight, torch.float64)
    ref = x.double() @ dense.t() + linear.bias.double()
    assert_within(out, ref, matmul_error_bound(x, dense, torch.float32), "int4 linear")
    out.sum().backward()
    torch.testing.assert_close(x.grad.double(), dense.sum(0).expand(3, 5, 192), rtol=1e-4, atol=1e-4)
    assert not layer.weight.requires_grad and layer.bias.grad is None


def test_weight_error_against_float64_is_within_half_a_quantization_step():
    linear = nn.Linear(256, 48, bias=False)
    layer = QuantizedLinear.from_linear(linear, group_size=32)
    dense = dequantize_int4(layer.weight, torch.float64)
    w = linear.weight.double()
    step = (w.unflatten(1, (8, 32)).amax(-1) - w.unflatten(1, (8, 32)).amin(-1)) / 15
    err = (dense - w).abs().unflatten(1, (8, 32)).amax(-1)
    assert (err <= step / 2 * (1 + 1e-4) + 1e-7).all()


def test_in_dim_not_divisible_needs_pad_in_dim():
    with pytest.raises(ValueError, match="group_size=32 does not divide in_dim=172.*pad_in_dim=True"):
        QuantizedLinear(172, 64, group_size=32)


@pytest.mark.parametrize("in_dim,group_size", [(172, 32), (100, 64), (36, 32)])
def test_padded_qalora_layer_is_exact_and_merges_exactly(in_dim, group_size):
    torch.manual_seed(0)
    linear = nn.Linear(in_dim, 176)
    layer = QALoRALinear.from_linear(
        linear, rank=4, alpha=8.0, group_size=group_size, pad_in_dim=True
    )
    padded = -(-in_dim // group_size) * group_size
    assert layer.padded_in_dim == padded and layer.weight.shape == (176, padded)
    assert layer.lora_a.weight.shape == (4, padded // group_size)
    with torch.no_grad():
        layer.lora_b.weight.normal_(0.0, 0.05)
    x = torch.randn(7, in_dim)
    dense = dequantize_int4(layer.weight, torch.float64)
    # padded columns meet zero inputs, so the base is exactly the first in_dim columns
    x_pad = F.pad(x, (0, padded - in_dim))
    ref = (
        x.double() @ dense[:, :in_dim].t()
        + linear.bias.double()
        + pooled_lora_reference(x_pad, layer.lora_a.weight, layer.lora_b.weight, group_size, layer.scaling)
    )
    out = layer(x)
    bound = matmul_error_bound(x, dense[:, :in_dim], torch.float32)
    assert_within(out, ref, bound, "padded forward")
    layer.merge()
    merged_dense = dequantize_int4(layer.weight, torch.float64)
    merged_ref = x.double() @ merged_dense[:, :in_dim].t() + linear.bias.double()
    assert_within(layer(x), merged_ref, bound, "padded merged forward")
    zero_rounding = 2 * UNIT_ROUNDOFF[torch.float32] * zero_points(layer.weight).abs().max()
    assert_within(layer(x), ref, bound * 2 + zero_rounding * x.abs().sum(-1, keepdim=True), "merged vs unmerged")


def test_padded_layer_loads_an_unpadded_checkpoint_weight():
    linear = nn.Linear(172, 64, bias=False)
    layer = QALoRALinear(172, 64, rank=2, alpha=4.0, group_size=32, pad_in_dim=True)
    layer.load_state_dict({"weight": linear.weight.detach()}, strict=False)
    x = torch.randn(4, 172)
    dense = dequantize_int4(layer.weight, torch.float64)[:, :172]
    assert_within(layer(x), x.double() @ dense.t(), matmul_error_bound(x, dense, torch.float32), "loaded")


def test_meta_device_builds_structure_without_memory():
    layer = QALoRALinear(4096, 11008, rank=8, alpha=16.0, group_size=64, device="meta")
    assert isinstance(layer.weight, Int4OpaqueTensor)
    assert layer.weight.device.type == "meta" and layer.weight.shape == (11008, 4096)
    assert layer.lora_a.weight.shape == (8, 64) and layer.lora_a.weight.is_meta
    with torch.device("meta"):
        frozen = QuantizedLinear(172, 64, group_size=32, pad_in_dim=True)
    assert frozen.weight.is_meta and frozen.weight.shape == (64, 192)
    with pytest.raises(ValueError, match="meta device"):
        frozen.quantize_base_(torch.randn(64, 172))


@pytest.mark.parametrize("bits", [4, 8])
def test_padded_intx_layer_is_exact_and_merges(bits):
    from qalora_tune.ops.intx_linear import dequantize_intx
    from qalora_tune.quantization.base_weight import from_torchao_base
    from qalora_tune.quantization.intx_weight import is_intx_weight

    torch.manual_seed(bits)
    linear = nn.Linear(100, 40)
    layer = QALoRALinear.from_linear(linear, rank=2, alpha=4.0, group_size=24, pad_in_dim=True, bits=bits)
    assert is_intx_weight(layer.weight) and layer.weight.shape == (40, 120)
    with torch.no_grad():
        layer.lora_b.weight.normal_(0.0, 0.05)
    x = torch.randn(6, 100)
    w = layer.weight
    dense = dequantize_intx(w.qdata, w.scale, w.zero_point, torch.float64)
    x_pad = F.pad(x, (0, 20))
    ref = (
        x.double() @ dense[:, :100].t() + linear.bias.double()
        + pooled_lora_reference(x_pad, layer.lora_a.weight, layer.lora_b.weight, 24, layer.scaling)
    )
    u = UNIT_ROUNDOFF[torch.float32]
    bound = matmul_error_bound(x, dense[:, :100], torch.float32) + 2 * u * (x.double().abs() @ dense[:, :100].abs().t())
    assert_within(layer(x), ref, bound + 1e-6 * ref.abs().max(), "padded intx forward")
    layer.merge()
    zero_rounding = u * x_pad.double().unflatten(-1, (-1, 24)).sum(-1).abs() @ from_torchao_base(layer.weight).zero.double().abs().t()
    assert_within(layer(x), ref, 2 * bound + zero_rounding + 1e-6 * ref.abs().max(), "padded intx merged")
