"""Which torchao subclass holds the base (int4 kernels or dequantizing intx), and the
zero-point update a QA-LoRA merge applies to either."""

import pytest
import torch

from qalora_tune._compat import Int4OpaqueTensor, IntxUnpackedToInt8Tensor
from qalora_tune.ops.intx_linear import dequantize_intx
from qalora_tune.quantization import (
    CpuInt4Tensor,
    IntxBaseTensor,
    is_quantized_base,
    quantize_rtn,
    to_base,
)
from qalora_tune.quantization.base_weight import (
    dequantize_base,
    empty_base,
    from_torchao_base,
    shift_zero_points_,
    stored_zero_points,
    uses_int4_kernel,
)
from qalora_tune.quantization.int4_weight import dequantize_int4, is_int4_weight
from qalora_tune.quantization.intx_weight import is_intx_weight
from tests.reference import UNIT_ROUNDOFF, assert_within


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [8, 16, 32, 48, 64, 128, 256])
def test_uses_int4_kernel_table(bits, group_size):
    expected = bits in (2, 3, 4) and group_size in (32, 64, 128, 256)
    assert uses_int4_kernel(bits, group_size) is expected


@pytest.mark.parametrize(
    "bits,group_size,subclass",
    [
        (4, 32, CpuInt4Tensor),
        (2, 64, CpuInt4Tensor),
        (3, 128, CpuInt4Tensor),
        (8, 32, IntxBaseTensor),
        (8, 64, IntxBaseTensor),
        (4, 8, IntxBaseTensor),
        (2, 16, IntxBaseTensor),
        (3, 48, IntxBaseTensor),
    ],
)
def test_to_torchao_base_picks_the_subclass(bits, group_size, subclass):
    gq = quantize_rtn(torch.randn(16, 384), group_size, bits)
    weight = to_base(gq, device="cpu", dtype=torch.float32)
    assert type(weight) is subclass and is_quantized_base(weight)
    # this project's classes extend torchao's: the stock isinstance checks still hold
    assert isinstance(weight, Int4OpaqueTensor if subclass is CpuInt4Tensor else IntxUnpackedToInt8Tensor)
    assert is_intx_weight(weight) is (subclass is IntxBaseTensor)
    assert is_int4_weight(weight) is (subclass is CpuInt4Tensor)
    back = from_torchao_base(weight)
    # int4 bases read back as 4-bit codes of the same grid; intx ones keep their width
    expected = gq if is_intx_weight(weight) else gq.as_int4()
    assert torch.equal(back.qdata, expected.qdata) and torch.equal(back.scale, gq.scale)
    assert back.bits == expected.bits and back.group_size == group_size
    torch.testing.assert_close(dequantize_base(weight), gq.dequantize(), rtol=0, atol=1e-5)
    meta = empty_base(16, 384, group_size, bits, "meta")
    assert type(meta) is subclass and meta.is_meta and meta.shape == (16, 384)


def test_not_a_quantized_base():
    assert not is_quantized_base(torch.randn(4, 8))


def _stored_dense(weight):
    """The function a base computes, in float64, from what it stores."""
    if is_intx_weight(weight):
        return dequantize_intx(weight.qdata, weight.scale, weight.zero_point, torch.float64)
    return dequantize_int4(weight, torch.float64)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (2, 32), (8, 16), (4, 8), (3, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shift_zero_points_moves_every_value_of_its_group(bits, group_size, dtype):
    gq = quantize_rtn(torch.randn(40, 256) + 0.3, group_size, bits)
    weight = to_base(gq, device="cpu", dtype=dtype)
    n_groups = 256 // group_size
    before_gq = from_torchao_base(weight)
    before_zero = stored_zero_points(weight).clone()
    before = _stored_dense(weight)
    packed = weight.qdata.clone()  # int4: the packed codes; intx: the int8 codes
    intx_scale = weight.scale.clone() if is_intx_weight(weight) else None
    delta = torch.randn(40, n_groups, dtype=torch.float64) * 0.5
    shift_zero_points_(weight, delta)
    after_gq = from_torchao_base(weight)
    assert torch.equal(after_gq.qdata, before_gq.qdata)
    assert torch.equal(after_gq.scale, before_gq.scale)
    assert torch.equal(weight.qdata, packed)
    after = _stored_dense(weight)
    u = UNIT_ROUNDOFF[dtype]
    if is_intx_weight(weight):
        assert torch.equal(weight.scale, intx_scale)
        # zp' = fl(zp - delta / s): the value moves by delta up to u |zp'| s
        rounding = u * stored_zero_points(weight).double().abs() * weight.scale.double()
    else:
        # z' = fl(z + delta): up to u |z'|
        rounding = u * stored_zero_points(weight).double().abs()
    expected = before + delta.repeat_interleave(group_size, dim=1)
    bound = rounding.repeat_interleave(group_size, dim=1) * (1 + 1e-6) + 1e-300
    assert_within(after, expected, bound, "shifted base")
    # not vacuous: the shift is far larger than its rounding
    assert (after - before).abs().mean() > 10 * bound.mean()
    # restoring the saved zeros undoes it exactly
    stored_zero_points(weight).copy_(before_zero)
    assert torch.equal(_stored_dense(weight), before)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 8)])
def test_stored_zero_points_is_a_writable_view(bits, group_size):
    gq = quantize_rtn(torch.randn(12, 128), group_size, bits)
    weight = to_base(gq, device="cpu", dtype=torch.float32)
    view = stored_zero_points(weight)
    assert view.shape == (12, 128 // group_size) and view.dtype == torch.float32
    before = dequantize_base(weight, torch.float64)
    scale = from_torchao_base(weight).scale.double().repeat_interleave(group_size, dim=1)
    view[2, 1] += 1.0
    after = dequantize_base(weight, torch.float64)
    columns = slice(group_size, 2 * group_size)
    if is_intx_weight(weight):
        # torchao's integer-domain zero point: one more step below, W = (c - zp) s
        expected_change = -scale[2, columns]
    else:
        expected_change = torch.ones(group_size, dtype=torch.float64)
    torch.testing.assert_close(after[2, columns] - before[2, columns], expected_change, rtol=0, atol=1e-5)
    mask = torch.ones_like(before, dtype=torch.bool)
    mask[2, columns] = False
    torch.testing.assert_close(after[mask], before[mask], rtol=0, atol=1e-5)
