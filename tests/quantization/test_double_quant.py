"""8-bit scales (double quantization): the scale codec against float64, the group means
the zero points keep, and the DoubleQuantInt4Tensor storage in every int4 function."""

import io

import pytest
import torch

from qalora_tune._compat import Int4OpaqueTensor
from qalora_tune.models import tensor_nbytes
from qalora_tune.quantization import (
    DoubleQuantInt4Tensor,
    quantize_hqq,
    quantize_rtn,
    to_base,
)
from qalora_tune.quantization.base_weight import check_double_quant
from qalora_tune.quantization.double_quant import (
    dequantize_scales,
    double_quantize_scales,
    is_double_quant,
    quantize_scales,
)
from qalora_tune.quantization.int4_weight import (
    dequantize_int4,
    empty_int4,
    from_torchao_int4,
    is_int4_weight,
    to_torchao_int4,
    with_dense_scales,
    zero_points,
)
from tests.reference import (
    UNIT_ROUNDOFF,
    seed_each_test,  # noqa: F401 (an autouse fixture: importing it activates it)
)


def _scales(rows, groups, seed):
    generator = torch.Generator().manual_seed(seed)
    # a different spread per row, as real scales have
    return torch.rand(rows, groups, generator=generator) * torch.rand(rows, 1, generator=generator) + 1e-3


def _weight(n, k, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=generator) + 0.5 * torch.randn(n, 1, generator=generator)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scale_codes_round_to_nearest_on_each_rows_grid(seed):
    scale = _scales(24, 40, seed)
    codes, low, step = quantize_scales(scale)
    assert codes.dtype == torch.uint8 and low.dtype == step.dtype == torch.float32
    s64 = scale.double()
    assert torch.equal(low.double(), s64.min(1).values)
    torch.testing.assert_close(step.double(), (s64.max(1).values - s64.min(1).values) / 255)
    decoded = dequantize_scales(codes.t(), low, step).t()
    err = (decoded.double() - s64).abs()
    # half a grid step, plus the float32 rounding of the decoding formula
    bound = step.double()[:, None] / 2 + 4 * UNIT_ROUNDOFF[torch.float32] * s64.max(1).values[:, None]
    assert (err <= bound).all()
    # every row uses its whole grid: its smallest scale is code 0, its largest 255
    assert (codes.min(1).values == 0).all() and (codes.max(1).values == 255).all()
    # round to nearest on the float64 grid; only a near-tie may round the other way
    exact = (s64 - s64.min(1, keepdim=True).values) / (step.double()[:, None])
    reference = exact.round()
    near_tie = ((exact - exact.floor()) - 0.5).abs() < 1e-3
    assert torch.equal(codes.double()[~near_tie], reference[~near_tie])
    assert ((codes.double() - reference).abs() <= 1).all()


def test_a_row_of_equal_scales_is_exact():
    scale = torch.full((3, 8), 0.25)
    codes, low, step = quantize_scales(scale)
    assert (codes == 0).all() and (step == 0).all()
    assert torch.equal(dequantize_scales(codes.t(), low, step).t(), scale)


def test_a_constant_row_among_others_gets_step_zero_alone():
    scale = _scales(6, 32, seed=11)
    scale[2] = 0.0173
    codes, low, step = quantize_scales(scale)
    assert step[2] == 0 and (codes[2] == 0).all() and low[2] == scale[2, 0]
    assert torch.equal(dequantize_scales(codes.t(), low, step).t()[2], scale[2])
    others = [0, 1, 3, 4, 5]
    assert (step[others] > 0).all()
    # the other rows are coded as they would be on their own
    alone = quantize_scales(scale[others])
    assert torch.equal(codes[others], alone[0]) and torch.equal(step[others], alone[2])


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("quantize", [quantize_rtn, quantize_hqq])
def test_double_quantization_keeps_codes_and_each_groups_mean(bits, quantize):
    w = _weight(32, 256, seed=bits)
    gq = quantize(w, 64, bits)
    rounded, codes, low, step = double_quantize_scales(gq)
    assert torch.equal(rounded.qdata, gq.qdata)
    assert torch.equal(rounded.scale, dequantize_scales(codes.t(), low, step).t())
    before = gq.dequantize(torch.float64).unflatten(-1, (-1, 64))
    after = rounded.dequantize(torch.float64).unflatten(-1, (-1, 64))
    # the zero point took the mean of the scale's change over the group (float32 zeros)
    mean_slack = 4 * UNIT_ROUNDOFF[torch.float32] * before.abs().amax(-1)
    assert ((after.mean(-1) - before.mean(-1)).abs() <= mean_slack).all()
    # each value moved by at most (|q - mid| + mean |q - mid|) * step / 2
    centred = (gq.qdata.double() - gq.mid).unflatten(-1, (-1, 64)).abs()
    bound = (centred + centred.mean(-1, keepdim=True)) * step.double()[:, None, None] / 2
    assert ((after - before).abs() <= bound + mean_slack[..., None]).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_weight_dequantizes_to_the_rounded_scales(bits, group_size, dtype):
    gq = quantize_rtn(_weight(40, 256, seed=group_size), group_size, bits)
    weight = to_torchao_int4(gq, device="cpu", dtype=dtype, double_quant=True)
    assert is_double_quant(weight) and is_int4_weight(weight)
    assert weight.dtype == dtype and tuple(weight.shape) == (40, 256)
    rounded = double_quantize_scales(gq)[0].as_int4()
    # the scales and zeros are rounded once to dtype, then (q - 8) s + z in float64
    expected = torch.stack([rounded.scale.to(dtype), rounded.zero.to(dtype)]).double()
    q = rounded.qdata.double().unflatten(-1, (-1, group_size)) - 8
    expected = (q * expected[0][..., None] + expected[1][..., None]).flatten(-2)
    torch.testing.assert_close(dequantize_int4(weight, torch.float64), expected, rtol=0, atol=1e-6)
    # in the weight's own dtype: within the rounding of s', z' and of the output to dtype
    exact = rounded.dequantize(torch.float64)
    u = UNIT_ROUNDOFF[dtype]
    scale_term = (q.abs() * rounded.scale.double()[..., None]).flatten(-2)
    zero_term = rounded.zero.double().repeat_interleave(group_size, 1).abs()
    bound = 3 * u * (scale_term + zero_term) + 1e-30
    assert ((dequantize_int4(weight).double() - exact).abs() <= bound).all()
    back = from_torchao_int4(weight)
    assert torch.equal(back.qdata, gq.as_int4().qdata)
    assert torch.equal(back.scale, rounded.scale.to(dtype))
    assert torch.equal(back.zero, rounded.zero.to(dtype))
    dense = with_dense_scales(weight)
    assert isinstance(dense, Int4OpaqueTensor)
    assert torch.equal(dequantize_int4(dense), dequantize_int4(weight))


def test_eight_bit_scales_take_fewer_bytes():
    gq = quantize_rtn(_weight(64, 2048, seed=0), 32)
    for dtype, scale_bytes in [(torch.float32, 4), (torch.bfloat16, 2)]:
        plain = to_torchao_int4(gq, device="cpu", dtype=dtype)
        dq = to_torchao_int4(gq, device="cpu", dtype=dtype, double_quant=True)
        groups = 2048 // 32
        codes = 64 * 2048 // 2
        assert tensor_nbytes(plain) == codes + groups * 64 * 2 * scale_bytes
        # uint8 scale codes, zeros in dtype, a float32 min and step per row
        assert tensor_nbytes(dq) == codes + groups * 64 * (1 + scale_bytes) + 64 * 8
        assert tensor_nbytes(dq) < tensor_nbytes(plain)


def test_dtype_move_keeps_the_scale_codes_bit_for_bit():
    weight = to_torchao_int4(quantize_rtn(_weight(48, 256, seed=3), 64), device="cpu",
                             dtype=torch.float32, double_quant=True)
    moved = weight.to(torch.bfloat16)
    assert isinstance(moved, DoubleQuantInt4Tensor) and moved.dtype == torch.bfloat16
    for name in ("qdata", "scale_codes", "scale_min", "scale_step"):
        assert torch.equal(getattr(moved, name), getattr(weight, name)), name
    assert torch.equal(moved.zero, weight.zero.to(torch.bfloat16))
    same = weight.to("cpu")
    assert torch.equal(dequantize_int4(same), dequantize_int4(weight))
    for copy in (weight.detach(), weight.clone()):
        assert isinstance(copy, DoubleQuantInt4Tensor)
        assert torch.equal(dequantize_int4(copy), dequantize_int4(weight))


def test_torch_save_round_trip_with_weights_only():
    weight = to_torchao_int4(quantize_rtn(_weight(48, 256, seed=4), 64), device="cpu",
                             double_quant=True)
    buffer = io.BytesIO()
    torch.save({"weight": weight}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["weight"]
    assert isinstance(loaded, DoubleQuantInt4Tensor)
    assert torch.equal(dequantize_int4(loaded), dequantize_int4(weight))


def test_zero_points_are_a_writable_view():
    weight = to_torchao_int4(quantize_rtn(_weight(48, 256, seed=5), 64), device="cpu",
                             double_quant=True)
    before = dequantize_int4(weight, torch.float64)
    zeros = zero_points(weight)
    assert zeros.shape == (48, 4)
    stored_before = zeros.double().clone()
    zeros.add_(torch.randn(48, 4, generator=torch.Generator().manual_seed(6)))
    written = zeros.double() - stored_before
    after = dequantize_int4(weight, torch.float64)
    # float64 dequantization of float32 scales and zeros: only float64 roundings remain
    slack = 4 * 2.0**-53 * (before.abs() + after.abs())
    assert ((after - before - written.repeat_interleave(64, 1)).abs() <= slack).all()


def test_meta_construction_matches_a_real_weight():
    real = to_torchao_int4(quantize_rtn(_weight(40, 256, seed=7), 64), device="cpu",
                           dtype=torch.bfloat16, double_quant=True)
    meta = empty_int4(40, 256, 64, "meta", torch.bfloat16, double_quant=True)
    assert isinstance(meta, DoubleQuantInt4Tensor)
    for name in DoubleQuantInt4Tensor.tensor_data_names:
        got, want = getattr(meta, name), getattr(real, name)
        assert got.is_meta and (got.shape, got.dtype) == (want.shape, want.dtype), name


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 8), (2, 16)])
def test_eight_bit_scales_need_an_int4_kernel_base(bits, group_size):
    with pytest.raises(ValueError, match="model.double_quant_scales"):
        check_double_quant(True, bits, group_size)
    gq = quantize_rtn(_weight(16, 128, seed=8), group_size, bits)
    with pytest.raises(ValueError, match="model.double_quant_scales"):
        to_base(gq, device="cpu", double_quant=True)
    check_double_quant(False, bits, group_size)
