"""Q4_1 packing of merged int4 weights: ggml's byte layout (read back with the gguf package's
own dequantizer), the fp16 rounding bound, and what cannot be Q4_1."""

import pytest
import torch

from qalora_tune.export import MergedLinearWeight, pack_q4_1, q4_1_refusal
from qalora_tune.quantization import GroupQuantizedWeight, quantize_rtn
from tests.reference import seed_each_test  # noqa: F401  (fresh inputs per test)

gguf_quants = pytest.importorskip("gguf.quants", reason="needs the gguf package (pip install 'qalora-tune[gguf]')")
np = pytest.importorskip("numpy")
Q4_1 = pytest.importorskip("gguf").GGMLQuantizationType.Q4_1


def _merged(out_dim, in_dim, group_size, bits=4, in_features=None, zero_shift=0.05):
    """A quantized weight with merged-looking zeros: RTN zeros plus a per-group shift."""
    gq = quantize_rtn(torch.randn(out_dim, in_dim), group_size, bits)
    gq.zero += zero_shift * torch.randn_like(gq.zero)
    return MergedLinearWeight(gq, in_features or in_dim, "test")


def _gguf_dequantized(blocks, shape):
    values = gguf_quants.dequantize(blocks, Q4_1)
    assert values.shape == tuple(shape)
    return torch.from_numpy(values.astype(np.float64))


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gguf_reads_back_our_weight_within_the_fp16_rounding_of_d_and_m(group_size, bits):
    weight = _merged(24, 256, group_size, bits)
    blocks, error = pack_q4_1(weight)
    assert blocks.dtype == np.uint8 and blocks.shape == (24, 256 // 32 * 20)
    theirs = _gguf_dequantized(blocks, (24, 256))
    exact = weight.dequantize(torch.float64)
    gq = weight.quantized
    # b-bit codes q become int4 codes q4 = q + 8 - 2**(b-1): (q4 - 8) s + z = d q4 + m with
    # d = s, m = z - 8 s. Bound per element: |fl16(s) - s| q4 + |fl16(m) - m| (+ fp32 evaluation)
    s = gq.scale.double()
    m = gq.zero.double() - 8 * s
    ds = (s.half().double() - s).abs().repeat_interleave(group_size, 1)
    dm = (m.half().double() - m).abs().repeat_interleave(group_size, 1)
    q4 = gq.as_int4().qdata.double()
    magnitude = (s.abs().repeat_interleave(group_size, 1) * q4 + m.abs().repeat_interleave(group_size, 1))
    bound = ds * q4 + dm + 3 * 2.0**-24 * magnitude
    assert ((theirs - exact).abs() <= bound).all()
    # and the a-priori one: 2**-11 (15 |s| + |m|) per group
    a_priori = 2.0**-11 * (15 * s.abs() + m.abs()).repeat_interleave(group_size, 1) + 3 * 2.0**-24 * magnitude
    assert ((theirs - exact).abs() <= a_priori).all()
    # the reported error is the one measured here
    assert error.max_abs_error == pytest.approx((theirs - exact).abs().max().item(), rel=1e-6)
    assert error.max_relative_error <= error.relative_bound
    assert 0 < error.max_relative_error
    if bits == 4:  # 15 |s| is the group's range and |m| its smallest code's value: <= 3 max|w|
        assert error.relative_bound <= 3 * 2.0**-11 * 1.01
    # fp16 rounding is all there is: with fp16-exact d and m, gguf reproduces every weight
    gq.scale.copy_(gq.scale.half().float())
    gq.zero.copy_((gq.zero.double() - 8 * gq.scale.double()).half().double() + 8 * gq.scale.double())
    blocks, error = pack_q4_1(weight)
    theirs = _gguf_dequantized(blocks, (24, 256))
    exact = weight.dequantize(torch.float64)
    assert ((theirs - exact).abs() <= 3 * 2.0**-24 * magnitude).all()


def test_block_bytes_are_d_m_then_low_and_high_nibbles():
    """Byte j of a block holds element j (low nibble) and element j + 16 (high nibble)."""
    codes = torch.tensor([list(range(16)) + list(range(15, -1, -1))], dtype=torch.uint8)
    gq = GroupQuantizedWeight(codes, torch.tensor([[0.5]]), torch.tensor([[1.0]]), 32, 4)
    blocks, _ = pack_q4_1(MergedLinearWeight(gq, 32, "test"))
    d, m = blocks[0, :2].view(np.float16)[0], blocks[0, 2:4].view(np.float16)[0]
    assert (d, m) == (0.5, 1.0 - 8 * 0.5)
    assert list(blocks[0, 4:] & 0xF) == list(range(16))
    assert list(blocks[0, 4:] >> 4) == list(range(15, -1, -1))


def test_a_padded_layer_with_whole_blocks_packs_its_real_columns():
    """pad_in_dim with G=64 and 160 inputs: the last group is half padding; the 5 real
    blocks are written and share the partial group's d and m."""
    weight = _merged(8, 192, 64, in_features=160)
    blocks, _ = pack_q4_1(weight)
    theirs = _gguf_dequantized(blocks, (8, 160))
    assert torch.allclose(theirs, weight.dequantize(torch.float64), rtol=0, atol=2e-3 * weight.dequantize().abs().max().item())


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(out_dim=4, in_dim=192, group_size=32, in_features=172), "in_dim 172 is not a multiple of 32"),
        (dict(out_dim=4, in_dim=128, group_size=16), "group size 16 is not a multiple of 32"),
        (dict(out_dim=4, in_dim=128, group_size=32, bits=8), "8-bit codes"),
    ],
)
def test_what_cannot_be_q4_1_says_why(kwargs, reason):
    weight = _merged(**kwargs)
    assert reason in q4_1_refusal(weight)
    with pytest.raises(ValueError, match="cannot store this weight as Q4_1"):
        pack_q4_1(weight)


def test_scales_beyond_fp16_range_are_refused():
    weight = _merged(4, 64, 32)
    weight.quantized.scale[0, 0] = 1e6
    assert "outside fp16's range" in q4_1_refusal(weight)
