import pytest
import torch

from qalora_tune.quantization import (
    GroupQuantizedWeight,
    get_quantizer,
    quantize_hqq,
    quantize_rtn,
)


@pytest.mark.parametrize("group_size", [8, 16, 32, 64, 128])
def test_rtn_error_within_half_step(group_size):
    weight = torch.randn(48, 256, dtype=torch.float64)
    gq = quantize_rtn(weight, group_size)
    assert gq.qdata.dtype == torch.uint8 and int(gq.qdata.max()) <= 15
    assert gq.scale.shape == (48, 256 // group_size) == gq.zero.shape
    err = (gq.dequantize(torch.float64) - weight).abs()
    step = gq.scale.double().repeat_interleave(group_size, 1)
    # round to nearest: at most half a step (plus fp32 rounding of scale and zero)
    assert (err <= 0.5 * step * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_at_every_bit_width_matches_a_float64_min_max_reference(bits):
    weight = torch.randn(32, 256, dtype=torch.float64)
    gq = quantize_rtn(weight, 64, bits=bits)
    qmax = 2**bits - 1
    assert gq.bits == bits and gq.mid == 2 ** (bits - 1)
    codes = gq.qdata.view(32, 4, 64)
    assert (codes.amin(-1) == 0).all() and (codes.amax(-1) == qmax).all()
    # float64 min-max round to nearest, written out
    groups = weight.view(32, 4, 64)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / qmax
    reference = ((groups - low) / step).round().clamp(0, qmax) * step + low
    got = gq.dequantize(torch.float64).view(32, 4, 64)
    # the same grid up to fp32 scales/zeros; codes may differ only at exact rounding ties
    # (fp32 scale and zero: relative error 2**-24 times codes up to 2**bits steps from them)
    tolerance = max(1e-5, 4 * 2**bits * 2.0**-24)
    close = (got - reference).abs() <= tolerance * step
    assert close.double().mean() > 0.999
    assert ((got - groups).abs() <= 0.5 * step * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("quantize", [quantize_rtn, quantize_hqq])
def test_fewer_bits_cost_accuracy_and_codes_stay_in_range(quantize):
    weight = torch.randn(64, 256)
    errors = []
    for bits in (2, 3, 4):
        gq = quantize(weight, 32, bits)
        assert int(gq.qdata.max()) <= 2**bits - 1
        errors.append(((gq.dequantize() - weight).norm() / weight.norm()).item())
    assert errors[0] > errors[1] > errors[2], errors
    # each bit roughly halves the error (min-max grids: step = range / (2**bits - 1))
    assert errors[1] / errors[2] > 1.6 and errors[0] / errors[1] > 1.6, errors


def test_rtn_uses_the_full_code_range_per_group():
    weight = torch.randn(16, 128)
    gq = quantize_rtn(weight, 32)
    codes = gq.qdata.view(16, 4, 32)
    assert (codes.amin(-1) == 0).all() and (codes.amax(-1) == 15).all()


def test_hqq_reconstructs_no_worse_than_rtn_on_heavy_tails():
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(3.0).sample((128, 512)) * 0.02
    rtn = (quantize_rtn(weight, 64).dequantize() - weight).abs().mean()
    hqq = (quantize_hqq(weight, 64).dequantize() - weight).abs().mean()
    assert hqq <= rtn


def test_dequantize_convention_is_float_zero_point():
    gq = GroupQuantizedWeight(
        qdata=torch.tensor([[0, 8, 15, 3]], dtype=torch.uint8),
        scale=torch.tensor([[0.5, 2.0]]),
        zero=torch.tensor([[1.0, -1.0]]),
        group_size=2,
    )
    expected = torch.tensor([[(0 - 8) * 0.5 + 1, (8 - 8) * 0.5 + 1, (15 - 8) * 2 - 1, (3 - 8) * 2 - 1]])
    assert torch.equal(gq.dequantize(), expected)


@pytest.mark.parametrize("quantize", [quantize_rtn, quantize_hqq])
def test_group_size_must_divide_in_dim(quantize):
    with pytest.raises(ValueError, match="group_size=48 must be a positive divisor of in_dim=128"):
        quantize(torch.randn(8, 128), 48)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="bits=5"):
        quantize_rtn(torch.randn(8, 64), 32, bits=5)
    with pytest.raises(TypeError, match="2D floating-point"):
        quantize_rtn(torch.randint(0, 3, (8, 64)), 32)
    with pytest.raises(ValueError, match="unknown base quantizer 'gptqq'"):
        get_quantizer("gptqq")
