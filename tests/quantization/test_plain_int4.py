"""torchao's plain-layout ``Int4Tensor`` (``qalora_tune.quantization.plain_int4``).

Covers ``to_plain_int4`` / ``from_plain_int4`` (exact round trip of codes, scales and
zeros; the nibble layout checked against an independent unpacker written to fbgemm's
``pack_int4`` convention; partial last groups and padding; errors), ``plain_int4_bytes``,
the linear a plain file computes with once ``qalora_tune.load_merged`` has read it into
this package's storage (against a float64 reference, kernel and dequantizing group sizes),
and torchao's own safetensors serialization of the tensors built here. No torchao class is
patched: stock torchao runs a plain ``Int4Tensor`` only through fbgemm-gpu-genai.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from qalora_tune._compat import (
    Int4Tensor,
    flatten_tensor_state_dict,
    unflatten_tensor_state_dict,
)
from qalora_tune.quantization import GroupQuantizedWeight, quantize_hqq, quantize_rtn, to_base
from qalora_tune.quantization.plain_int4 import (
    from_plain_int4,
    plain_int4_bytes,
    to_plain_int4,
)
from tests.reference import assert_within, matmul_error_bound

QUANTIZERS = {"rtn": quantize_rtn, "hqq": quantize_hqq}


def _reference_unpack(qdata: torch.Tensor) -> torch.Tensor:
    """fbgemm ``pack_int4`` layout, written independently of the library: int8 bytes
    ``(N, K/2)``; the low nibble is column 2j, the high nibble column 2j+1, each the
    signed 4-bit value ``q - 8``. Returns the signed values ``(N, K)`` as int16."""
    assert qdata.dtype == torch.int8
    low = (qdata << 4) >> 4  # arithmetic shifts on int8 sign-extend the low nibble
    high = qdata >> 4
    return torch.stack((low, high), dim=-1).flatten(-2).to(torch.int16)


def _reference_dequantize(t: Int4Tensor) -> torch.Tensor:
    """float64 ``(N, K)`` weight of a plain Int4Tensor from its raw fields."""
    n, k = t.shape
    group_size = t.block_size[-1]
    signed = _reference_unpack(t.qdata)[:, :k].double()
    scale = t.scale.double().t().repeat_interleave(group_size, dim=1)[:, :k]
    zero = t.zero_point.double().t().repeat_interleave(group_size, dim=1)[:, :k]
    return signed * scale + zero


def _plain_linear(x, t, bias=None):
    """``F.linear`` with the plain weight ``t`` as ``load_merged`` runs it: codes, scales
    and zeros read back into this package's storage, the input zero-padded to the
    quantized width (a partial last group)."""
    padded = math.ceil(t.shape[1] / t.block_size[-1]) * t.block_size[-1]
    base = to_base(from_plain_int4(t, padded), dtype=x.dtype)
    x = F.pad(x, (0, padded - x.shape[-1]))
    return F.linear(x, base, None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
@pytest.mark.parametrize(
    "n, k, group_size", [(8, 128, 32), (24, 192, 64), (40, 256, 128), (3, 64, 32)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(quantizer, n, k, group_size, dtype):
    torch.manual_seed(n * k + group_size)
    gq = QUANTIZERS[quantizer](torch.randn(n, k), group_size)
    t = to_plain_int4(gq, dtype=dtype)
    assert isinstance(t, Int4Tensor)
    assert tuple(t.shape) == (n, k) and t.dtype == dtype
    assert t.qdata.shape == (n, k // 2) and t.qdata.dtype == torch.int8
    assert t.scale.shape == t.zero_point.shape == (k // group_size, n)
    back = from_plain_int4(t)
    assert back.group_size == group_size and back.bits == 4
    assert back.qdata.dtype == torch.uint8
    assert torch.equal(back.qdata, gq.qdata)
    assert torch.equal(back.scale, gq.scale.to(dtype))
    assert torch.equal(back.zero, gq.zero.to(dtype))


def test_default_dtype_is_the_scales_dtype():
    torch.manual_seed(0)
    gq = quantize_rtn(torch.randn(16, 64), 32)
    gq_bf16 = GroupQuantizedWeight(
        gq.qdata, gq.scale.bfloat16(), gq.zero.bfloat16(), gq.group_size, gq.bits
    )
    assert to_plain_int4(gq).dtype == torch.float32
    t = to_plain_int4(gq_bf16)
    assert t.dtype == t.scale.dtype == t.zero_point.dtype == torch.bfloat16


def test_every_code_survives_the_round_trip():
    # all 16 codes in every nibble position, including the sign boundary 7 / 8
    n, k = 16, 64
    codes = (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % 16
    gq = GroupQuantizedWeight(
        qdata=codes.to(torch.uint8),
        scale=torch.rand(n, 2) + 0.1,
        zero=torch.randn(n, 2),
        group_size=32,
    )
    assert torch.equal(from_plain_int4(to_plain_int4(gq)).qdata, gq.qdata)


# ---------------------------------------------------------------------- layout


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
@pytest.mark.parametrize("n, k, group_size", [(12, 128, 32), (20, 256, 64), (7, 256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nibble_layout_matches_fbgemm_pack_int4(quantizer, n, k, group_size, dtype):
    torch.manual_seed(k + n)
    gq = QUANTIZERS[quantizer](torch.randn(n, k), group_size)
    t = to_plain_int4(gq, dtype=dtype)
    signed = _reference_unpack(t.qdata)
    assert torch.equal(signed + 8, gq.qdata.to(torch.int16))
    expected = GroupQuantizedWeight(
        gq.qdata, gq.scale.to(dtype), gq.zero.to(dtype), group_size
    ).dequantize(torch.float64)
    assert torch.equal(_reference_dequantize(t), expected)
    if dtype == torch.float32:
        assert torch.equal(_reference_dequantize(t), gq.dequantize(torch.float64))


# ---------------------------------------------------------------------- F.linear fallback


def _linear_case(n, k, group_size, dtype, x_shape, seed):
    torch.manual_seed(seed)
    gq = quantize_rtn(torch.randn(n, k), group_size)
    t = to_plain_int4(gq, dtype=dtype)
    x = torch.randn(*x_shape, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    w_hat = _reference_dequantize(t)
    return t, x, bias, w_hat


@pytest.mark.parametrize("x_shape", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_fp32_matches_float64_reference(x_shape, group_size, with_bias):
    t, x, bias, w_hat = _linear_case(24, 256, group_size, torch.float32, x_shape, group_size)
    bias = bias if with_bias else None
    out = _plain_linear(x, t, bias)
    expected = x.double() @ w_hat.t()
    if bias is not None:
        expected = expected + bias.double()
    assert out.shape == (*x_shape, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert_within(out, expected, matmul_error_bound(x, w_hat, torch.float32, expected), "fp32 linear")


@pytest.mark.parametrize("x_shape", [(5,), (2, 3)], ids=["2d", "3d"])
def test_linear_bf16_matches_float64_reference(x_shape):
    t, x, bias, w_hat = _linear_case(24, 256, 64, torch.bfloat16, x_shape, 1)
    out = _plain_linear(x, t, bias)
    expected = x.double() @ w_hat.t() + bias.double()
    assert out.shape == (*x_shape, 24) and out.dtype == torch.bfloat16
    scale = expected.abs().max()
    torch.testing.assert_close(out.double() / scale, expected / scale, rtol=0, atol=1e-2)


def test_linear_repeated_calls_and_dtype_change_stay_correct():
    # the repacked kernel weight is cached on the tensor: a second call, and a call in
    # another activation dtype, must not reuse a stale or wrong-dtype packing
    t, x, bias, w_hat = _linear_case(16, 128, 32, torch.float32, (4,), 7)
    expected = x.double() @ w_hat.t() + bias.double()
    for _ in range(2):
        torch.testing.assert_close(_plain_linear(x, t, bias).double(), expected, rtol=1e-5, atol=1e-5)
    out_bf16 = _plain_linear(x.bfloat16(), t, bias.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    ref_bf16 = x.bfloat16().double() @ w_hat.t() + bias.bfloat16().double()
    scale = ref_bf16.abs().max()
    torch.testing.assert_close(out_bf16.double() / scale, ref_bf16 / scale, rtol=0, atol=1e-2)


@pytest.mark.parametrize("x_shape", [(5,), (2, 3)], ids=["2d", "3d"])
def test_linear_partial_last_group(x_shape):
    torch.manual_seed(3)
    gq = quantize_rtn(torch.randn(20, 192), 32)
    t = to_plain_int4(gq, in_features=172)
    assert tuple(t.shape) == (20, 172)
    assert t.qdata.shape == (20, 86)
    assert t.scale.shape == t.zero_point.shape == (6, 20)
    w_hat = gq.dequantize(torch.float64)[:, :172]
    assert torch.equal(_reference_dequantize(t), w_hat)
    x = torch.randn(*x_shape, 172)
    bias = torch.randn(20)
    out = _plain_linear(x, t, bias)
    expected = x.double() @ w_hat.t() + bias.double()
    assert out.shape == (*x_shape, 20)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_group_size_without_kernel_dequantizes(dtype):
    # G = 16 has no int4 kernel: the fallback dequantizes for the call
    t, x, bias, w_hat = _linear_case(12, 96, 16, dtype, (2, 4), 5)
    assert t.block_size == [1, 16]
    out = _plain_linear(x, t, bias)
    expected = x.double() @ w_hat.t() + bias.double()
    assert out.shape == (2, 4, 12) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        scale = expected.abs().max()
        torch.testing.assert_close(out.double() / scale, expected / scale, rtol=0, atol=1e-2)


# ---------------------------------------------------------------------- padding and errors


def test_from_plain_int4_pads_with_code_8_and_zero_scales():
    torch.manual_seed(4)
    gq = quantize_rtn(torch.randn(10, 192), 32)
    t = to_plain_int4(gq, in_features=172)

    default = from_plain_int4(t)  # ceil(172 / 32) * 32 = 192 columns
    assert default.qdata.shape == (10, 192) and default.scale.shape == (10, 6)
    assert torch.equal(default.qdata[:, :172], gq.qdata[:, :172])
    assert bool((default.qdata[:, 172:] == 8).all())
    assert torch.equal(default.scale, gq.scale) and torch.equal(default.zero, gq.zero)

    padded = from_plain_int4(t, padded_in_features=256)
    assert padded.qdata.shape == (10, 256) and padded.scale.shape == padded.zero.shape == (10, 8)
    assert torch.equal(padded.qdata[:, :172], gq.qdata[:, :172])
    assert bool((padded.qdata[:, 172:] == 8).all())
    assert torch.equal(padded.scale[:, :6], gq.scale) and torch.equal(padded.zero[:, :6], gq.zero)
    assert bool((padded.scale[:, 6:] == 0).all()) and bool((padded.zero[:, 6:] == 0).all())
    # the padded columns contribute nothing: code 8 is a zero offset, the groups past
    # the end have a zero zero point; inside the partial group they equal its zero point
    dense = padded.dequantize(torch.float64)
    assert torch.equal(dense[:, :172], gq.dequantize(torch.float64)[:, :172])
    assert bool((dense[:, 192:] == 0).all())


@pytest.mark.parametrize("padded", [160, 200])
def test_from_plain_int4_rejects_bad_padding(padded):
    torch.manual_seed(0)
    t = to_plain_int4(quantize_rtn(torch.randn(4, 192), 32), in_features=172)
    with pytest.raises(ValueError, match="padded_in_features"):
        from_plain_int4(t, padded_in_features=padded)


@pytest.mark.parametrize("in_features", [171, 0, 194])
def test_to_plain_int4_rejects_bad_in_features(in_features):
    torch.manual_seed(0)
    gq = quantize_rtn(torch.randn(4, 192), 32)
    with pytest.raises(ValueError, match="in_features"):
        to_plain_int4(gq, in_features=in_features)


@pytest.mark.parametrize("bits", [2, 3])
def test_narrow_codes_leave_as_int4_codes_with_the_same_values(bits):
    gq = quantize_rtn(torch.randn(8, 64), 32, bits=bits)
    back = from_plain_int4(to_plain_int4(gq))
    assert back.bits == 4
    assert torch.equal(back.qdata, gq.qdata + 8 - 2 ** (bits - 1))
    assert torch.equal(back.dequantize(torch.float64), gq.dequantize(torch.float64))


def test_to_plain_int4_rejects_codes_wider_than_4_bits():
    gq = GroupQuantizedWeight(
        qdata=torch.zeros(4, 64, dtype=torch.uint8),
        scale=torch.ones(4, 2),
        zero=torch.zeros(4, 2),
        group_size=32,
        bits=8,
    )
    with pytest.raises(ValueError, match="8-bit codes do not fit the int4 layout"):
        to_plain_int4(gq)


def test_from_plain_int4_rejects_other_tensors():
    with pytest.raises(TypeError, match="Int4Tensor"):
        from_plain_int4(torch.zeros(4, 64))


# ---------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "n, k_quantized, in_features, group_size, dtype",
    [
        (16, 128, None, 32, torch.float32),
        (16, 256, None, 64, torch.bfloat16),
        (9, 256, None, 128, torch.bfloat16),
        (20, 192, 172, 32, torch.bfloat16),
        (20, 192, 172, 32, torch.float32),
    ],
)
def test_plain_int4_bytes(n, k_quantized, in_features, group_size, dtype):
    torch.manual_seed(0)
    t = to_plain_int4(quantize_rtn(torch.randn(n, k_quantized), group_size), in_features, dtype)
    k = in_features or k_quantized
    element_size = torch.empty((), dtype=dtype).element_size()
    expected = n * k // 2 + 2 * n * math.ceil(k / group_size) * element_size
    assert plain_int4_bytes(t) == expected


# ---------------------------------------------------------------------- serialization


@pytest.mark.parametrize("in_features", [None, 172])
def test_torchao_safetensors_round_trip(tmp_path, in_features):
    torch.manual_seed(6)
    gq = quantize_rtn(torch.randn(12, 192), 32)
    weight = to_plain_int4(gq, in_features=in_features, dtype=torch.bfloat16)
    bias = torch.randn(12, dtype=torch.bfloat16)
    tensors, metadata = flatten_tensor_state_dict({"layer.weight": weight, "layer.bias": bias})
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata=metadata)

    with safe_open(str(path), framework="pt") as handle:
        loaded = {key: handle.get_tensor(key) for key in handle.keys()}
        loaded_metadata = handle.metadata()
    restored, leftover = unflatten_tensor_state_dict(loaded, loaded_metadata)
    assert leftover == {}
    back = restored["layer.weight"]
    assert isinstance(back, Int4Tensor)
    assert back.shape == weight.shape and list(back.block_size) == [1, 32]
    assert torch.equal(back.qdata, weight.qdata)
    assert torch.equal(back.scale, weight.scale)
    assert torch.equal(back.zero_point, weight.zero_point)
    assert torch.equal(restored["layer.bias"], bias)
    # and the restored tensor computes as the written one
    x = torch.randn(3, weight.shape[1]).bfloat16()
    assert torch.equal(_plain_linear(x, back), _plain_linear(x, weight))
    codes = from_plain_int4(back)
    k = weight.shape[1]
    assert torch.equal(codes.qdata[:, :k], gq.qdata[:, :k])
