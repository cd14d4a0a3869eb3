import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qalora_tune import QALoRALinear, QuantizedLinear
from qalora_tune.modules import QALoRAConfig
from qalora_tune._compat import Int4OpaqueTensor
from qalora_tune.quantization import get_quantizer, quantize_rtn
from qalora_tune.quantization.int4_weight import (
    dequantize_int4,
    from_torchao_int4,
    to_torchao_int4,
    zero_points,
)
from tests.reference import (
    CUDA_SKIP_REASON,
    UNIT_ROUNDOFF,
    assert_compiled_matches_eager,
    assert_within,
    matmul_error_bound,
    pooled_lora_reference,
    requires_cuda,
)


def _layer(in_dim=256, out_dim=96, rank=8, alpha=16.0, group_size=64, dtype=torch.float32, **kwargs):
    layer = QALoRALinear.from_linear(
        nn.Linear(in_dim, out_dim), rank=rank, alpha=alpha, group_size=group_size, dtype=dtype, **kwargs
    )
    with torch.no_grad():  # a trained-looking adapter: B no longer zero
        layer.lora_b.weight.normal_(0.0, 0.05)
    return layer


def _reference(layer, x):
    """Float64 dense reference: dequantized base + bias + pooled adapter."""
    dense = dequantize_int4(layer.weight, torch.float64)
    out = x.double() @ dense.t() + layer.bias.double()
    adapter = pooled_lora_reference(x, layer.lora_a.weight, layer.lora_b.weight, layer.group_size, layer.scaling)
    return out + adapter, dense


@pytest.mark.parametrize("in_dim,out_dim", [(128, 48), (256, 200), (512, 64)])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rank", [1, 4, 16, 64])
def test_forward_and_gradients_match_float64(in_dim, out_dim, group_size, rank):
    layer = _layer(in_dim, out_dim, rank=rank, alpha=2.0 * rank, group_size=group_size)
    x = torch.randn(3, 7, in_dim, requires_grad=True)
    _check_forward_and_gradients(layer, x, dequantize_int4(layer.weight, torch.float64), matmul_error_bound)


def _check_forward_and_gradients(layer, x, dense, error_bound):
    """The layer's output and its gradients for x, A and B against a float64 reference
    built on the dense base ``dense``; ``error_bound`` bounds the base matmul's rounding."""
    out = layer(x)
    x64 = x.detach().double().requires_grad_()
    a64 = layer.lora_a.weight.detach().double().requires_grad_()
    b64 = layer.lora_b.weight.detach().double().requires_grad_()
    adapter = pooled_lora_reference(x64, a64, b64, layer.group_size, layer.scaling)
    ref = x64 @ dense.t() + layer.bias.double() + adapter
    bound = error_bound(x.detach(), dense, torch.float32, ref.detach()) + 1e-5 * ref.detach().abs().max()
    assert_within(out, ref.detach(), bound, "forward")

    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    torch.testing.assert_close(layer.lora_a.weight.grad.double(), a64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_b.weight.grad.double(), b64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_b_equals_quantized_base(dtype):
    layer = QALoRALinear.from_linear(
        nn.Linear(256, 96).to(dtype), rank=8, alpha=16.0, group_size=64
    )
    x = torch.randn(5, 256, dtype=dtype)
    torchao_path = F.linear(x, layer.weight, layer.bias)  # torchao's own int4 kernel
    if dtype == torch.bfloat16:  # same kernel: bitwise equal
        assert torch.equal(layer(x), torchao_path)
    else:  # fp32 dequantizes and uses a dense matmul: equal up to summation order
        dense = dequantize_int4(layer.weight, torch.float64)
        bound = 2 * matmul_error_bound(x, dense, torch.float32)
        assert_within(layer(x), torchao_path.double(), bound, "fp32 vs torchao kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_changes_only_zero_points_with_one_rounding(dtype):
    layer = _layer(dtype=dtype)
    before = from_torchao_int4(layer.weight)
    delta = layer.zero_point_delta()
    layer.merge()
    after = from_torchao_int4(layer.weight)
    assert layer.merged
    assert torch.equal(after.qdata, before.qdata) and torch.equal(after.scale, before.scale)
    assert torch.equal(after.zero, (before.zero.double() + delta).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("quantizer", ["rtn", "hqq"])
def test_merged_output_equals_unmerged_within_zero_rounding(dtype, bits, quantizer):
    layer = _layer(in_dim=512, out_dim=128, group_size=64, dtype=dtype, bits=bits, quantizer=quantizer)
    assert layer.bits == bits
    x = torch.randn(16, 512).to(dtype)
    with torch.no_grad():
        unmerged = layer(x)
        exact, dense = _reference(layer, x)
        layer.merge()
        merged = layer(x)
    # The merged layer differs from the exact unmerged function only by rounding the new
    # zeros to `dtype` (|err| <= u |z'| per group, multiplied by that group's input sum) and
    # by the kernel's own rounding; the unmerged bf16 layer also rounds its adapter output.
    u = UNIT_ROUNDOFF[dtype]
    new_zeros = zero_points(layer.weight).double().abs()
    group_sums = x.double().unflatten(-1, (-1, 64)).sum(-1).abs()
    zero_rounding = u * group_sums @ new_zeros.t()
    kernel = matmul_error_bound(x, dense, dtype, exact)
    adapter_rounding = 4 * u * (exact.abs() + (x.double().abs() @ dense.abs().t()))
    assert_within(merged, exact, zero_rounding + kernel, "merged vs exact unmerged")
    assert_within(merged, unmerged, zero_rounding + 2 * kernel + adapter_rounding, "merged vs unmerged")


def test_unmerge_restores_zeros_bitwise_and_output():
    layer = _layer(dtype=torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    original = layer.weight.scale_and_zero.clone()
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        layer.unmerge()
        assert torch.equal(layer.weight.scale_and_zero, original)
        assert torch.equal(layer(x), expected)
    assert not layer.merged


def test_unmerge_of_a_loaded_merged_layer_subtracts_with_one_rounding():
    layer = _layer(dtype=torch.float32)
    original = zero_points(layer.weight).clone()
    layer.merge()
    layer._premerge_zeros = None  # as after loading a merged checkpoint
    merged = zero_points(layer.weight).clone()
    layer.unmerge()
    expected = (merged.double() - layer.zero_point_delta()).float()
    assert torch.equal(zero_points(layer.weight), expected)
    assert (zero_points(layer.weight) - original).abs().max() <= 4 * UNIT_ROUNDOFF[torch.float32] * original.abs().max()


def test_merge_state_is_tracked():
    layer = _layer()
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.disabled = True
    with pytest.raises(ValueError, match="unmerge\\(\\) before disabling"):
        layer(torch.randn(2, 256))


def test_disabled_adapter_gives_the_base():
    layer = _layer()
    x = torch.randn(3, 256)
    layer.disabled = True
    base = QuantizedLinear.from_int4(layer.weight, bias=layer.bias)
    assert torch.equal(layer(x), base(x))
    layer.disabled = False
    assert not torch.equal(layer(x), base(x))


def test_dropout_applies_to_adapter_input_in_training_only():
    layer = _layer(dropout=0.5)
    x = torch.randn(64, 256)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(in_dim=200, group_size=64), "group_size=64 does not divide in_dim=200.*pad_in_dim=True"),
        (dict(in_dim=256, group_size=0), "group_size=0 is not a positive integer"),
        (dict(rank=0), "lora_rank=0: the adapter rank must be a positive integer"),
        (dict(alpha=0.0), "lora_alpha=0.0: the adapter scale numerator must be positive"),
        (dict(alpha=-1.0), "lora_alpha=-1.0: the adapter scale numerator must be positive"),
        (dict(dropout=1.0), "lora_dropout=1.0 is not a probability"),
        (dict(quantizer="nf4"), "quantizer='nf4' is not a base quantizer"),
        (dict(rnak=4), "unknown layer arguments \\['rnak'\\]"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    args = dict(in_dim=256, out_dim=32, rank=4, alpha=8.0, group_size=64)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        QALoRALinear(**args)


def test_base_must_be_asymmetric_with_contiguous_matching_groups():
    base = to_torchao_int4(quantize_rtn(torch.randn(32, 256), 128), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="block_size=\\(1, 128\\).*group_size"):
        QALoRALinear.from_int4(base, rank=4, alpha=8.0, group_size=64)
    with pytest.raises(TypeError, match="asymmetric, float zero points"):
        QALoRALinear.from_int4(torch.randn(32, 256), rank=4, alpha=8.0)
    prescaled = to_torchao_int4(quantize_rtn(torch.randn(32, 256), 64), device="cpu", dtype=torch.float32)
    prescaled.act_pre_scale = torch.ones(256)
    with pytest.raises(ValueError, match="act_pre_scale"):
        QALoRALinear.from_int4(prescaled, rank=4, alpha=8.0)
    layer = QALoRALinear.from_int4(base, rank=4, alpha=8.0)
    assert layer.group_size == 128 and layer.weight is not None


def test_state_dict_round_trip_through_torch_save():
    layer = _layer()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = QALoRALinear(256, 96, rank=8, alpha=16.0, group_size=64, use_bias=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 256)
    assert isinstance(fresh.weight, Int4OpaqueTensor)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("quantizer", ["rtn", "hqq"])
def test_loading_a_full_precision_weight_quantizes_it(quantizer):
    linear = nn.Linear(256, 96)
    fresh = QALoRALinear(256, 96, rank=8, alpha=16.0, group_size=64, use_bias=True, quantizer=quantizer)
    state = {"weight": linear.weight.detach(), "bias": linear.bias.detach()}
    state.update({k: v for k, v in fresh.state_dict().items() if k.startswith("lora")})
    fresh.load_state_dict(state)
    assert isinstance(fresh.weight, Int4OpaqueTensor)
    expected = get_quantizer(quantizer)(linear.weight, 64).dequantize()
    assert torch.equal(dequantize_int4(fresh.weight), expected)


def test_bfloat16_layer_trains_in_bfloat16():
    layer = _layer(dtype=torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    out.float().sum().backward()
    assert out.dtype == x.grad.dtype == layer.lora_a.weight.grad.dtype == torch.bfloat16


def test_module_dtype_cast_moves_the_base():
    layer = _layer().to(torch.bfloat16)
    assert layer.weight.dtype == layer.weight.scale_and_zero.dtype == torch.bfloat16
    assert layer(torch.randn(2, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_torchtune_adapter_utilities_see_only_the_adapter():
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    model = nn.Sequential(_layer(), nn.ReLU(), _layer(in_dim=96, out_dim=256, group_size=32))
    adapter = get_adapter_params(model)
    assert sorted(adapter) == ["0.lora_a.weight", "0.lora_b.weight", "2.lora_a.weight", "2.lora_b.weight"]
    set_trainable_params(model, adapter)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(adapter)


def test_compile_fullgraph_forward_and_backward():
    assert_compiled_matches_eager(_layer(), torch.randn(4, 256, requires_grad=True))


@pytest.mark.skipif(not requires_cuda, reason=CUDA_SKIP_REASON)
def test_cuda_layer_matches_reference_and_merges():
    layer = _layer(dtype=torch.float32).to("cuda")  # repacks the base as tinygemm, bf16
    layer.lora_a.to(torch.bfloat16)
    layer.lora_b.to(torch.bfloat16)
    layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    ref, dense = _reference(layer, x.detach())
    bound = matmul_error_bound(x.detach(), dense, torch.bfloat16, ref) + 8 * UNIT_ROUNDOFF[torch.bfloat16] * ref.abs()
    assert_within(out, ref, bound, "cuda forward")
    out.float().sum().backward()
    assert x.grad is not None and layer.lora_b.weight.grad is not None
    before = layer.weight.scale_and_zero.clone()
    layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight.scale_and_zero, before)


def _with_tinygemm_base(layer):
    """``layer`` with its base repacked in tinygemm's (CUDA) layout, built on CPU."""
    from qalora_tune.quantization.int4_weight import tinygemm_int4

    packed = tinygemm_int4(from_torchao_int4(layer.weight), "cpu", torch.bfloat16)
    layer.weight = nn.Parameter(packed, requires_grad=False)
    return layer


def test_tinygemm_layout_layer_trains_and_merges_on_cpu():
    """What a CUDA layer runs for training rows (unpack, dequantize, dense GEMM) and for
    its merge, checked on CPU against float64; only the tinygemm kernel is left to CUDA."""
    layer = _with_tinygemm_base(_layer(in_dim=256, out_dim=96, dtype=torch.bfloat16))
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    x64 = x.detach().double().requires_grad_()
    a64 = layer.lora_a.weight.detach().double().requires_grad_()
    b64 = layer.lora_b.weight.detach().double().requires_grad_()
    dense = dequantize_int4(layer.weight, torch.float64)
    adapter = pooled_lora_reference(x64, a64, b64, layer.group_size, layer.scaling)
    ref = x64 @ dense.t() + layer.bias.double() + adapter
    u = UNIT_ROUNDOFF[torch.bfloat16]
    bound = matmul_error_bound(x.detach(), dense, torch.bfloat16, ref.detach()) + 8 * u * ref.detach().abs()
    assert_within(out, ref.detach(), bound, "forward")
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    # the base's input gradient: bf16 GEMM on the dequantized weight; the adapter's share
    # is rounded to bf16 too
    base_grad = grad.double() @ dense
    grad_bound = matmul_error_bound(grad, dense.t(), torch.bfloat16, base_grad) + 8 * u * x64.grad.abs()
    assert_within(x.grad, x64.grad, grad_bound, "input gradient")
    for got, want in [(layer.lora_a.weight.grad, a64.grad), (layer.lora_b.weight.grad, b64.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())
    before = from_torchao_int4(layer.weight)
    delta = layer.zero_point_delta()
    layer.merge()
    after = from_torchao_int4(layer.weight)
    assert torch.equal(after.qdata, before.qdata) and torch.equal(after.scale, before.scale)
    assert torch.equal(after.zero, (before.zero.double() + delta).to(torch.bfloat16))


# ---------------------------------------------------------------------- intx base (8 bits, G 8/16)


def _intx_dense(weight):
    """(c - zp) s from an intx base's stored codes, scales and zero points, in float64."""
    from qalora_tune.ops.intx_linear import dequantize_intx

    return dequantize_intx(weight.qdata, weight.scale, weight.zero_point, torch.float64)


def _intx_bound(x, dense, dtype, y_ref):
    # matmul_error_bound plus the weight formed in dtype: (c - zp) and (c - zp) * s rounded
    u = UNIT_ROUNDOFF[dtype]
    return matmul_error_bound(x, dense, dtype, y_ref) + 2 * u * (x.double().abs() @ dense.abs().t())


@pytest.mark.parametrize("bits,group_size", [(8, 8), (8, 16), (2, 8), (4, 16), (8, 64)])
def test_intx_forward_and_gradients_match_float64(bits, group_size):
    from qalora_tune.quantization.intx_weight import is_intx_weight

    layer = _layer(128, 48, rank=4, alpha=8.0, group_size=group_size, bits=bits)
    assert is_intx_weight(layer.weight) and layer.bits == bits
    assert layer.lora_a.weight.shape == (4, 128 // group_size)
    x = torch.randn(3, 5, 128, requires_grad=True)
    _check_forward_and_gradients(layer, x, _intx_dense(layer.weight), _intx_bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("quantizer", ["rtn", "hqq"])
def test_intx_merged_output_equals_unmerged_within_zero_rounding(dtype, bits, quantizer):
    from qalora_tune.quantization.base_weight import from_torchao_base
    from qalora_tune.quantization.intx_weight import is_intx_weight

    group_size = 16
    layer = _layer(in_dim=256, out_dim=64, group_size=group_size, dtype=dtype, bits=bits, quantizer=quantizer)
    assert is_intx_weight(layer.weight)
    x = torch.randn(16, 256).to(dtype)
    with torch.no_grad():
        unmerged = layer(x)
        dense = _intx_dense(layer.weight)
        exact = (
            x.double() @ dense.t() + layer.bias.double()
            + pooled_lora_reference(x, layer.lora_a.weight, layer.lora_b.weight, group_size, layer.scaling)
        )
        layer.merge()
        merged = layer(x)
    # the merged zero point zp' = fl(zp - delta / s) is off by u |zp'| per group, i.e. by
    # u |zp'| s = u |z'| in every dequantized value of the group
    u = UNIT_ROUNDOFF[dtype]
    new_zeros = from_torchao_base(layer.weight).zero.double().abs()
    group_sums = x.double().unflatten(-1, (-1, group_size)).sum(-1).abs()
    zero_rounding = u * group_sums @ new_zeros.t() * (1 + 1e-3)
    merged_dense = _intx_dense(layer.weight)
    kernel = _intx_bound(x, merged_dense, dtype, exact)
    adapter_rounding = 4 * u * (exact.abs() + (x.double().abs() @ dense.abs().t()))
    assert_within(merged, exact, zero_rounding + kernel, "merged vs exact unmerged")
    assert_within(
        merged, unmerged,
        zero_rounding + kernel + _intx_bound(x, dense, dtype, exact) + adapter_rounding,
        "merged vs unmerged",
    )
    # not vacuous: the adapter moved the output by more than the merged-vs-exact bound
    assert ((merged.double() - x.double() @ dense.t() - layer.bias.double()).abs() > zero_rounding + kernel).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(8, 8), (4, 16)])
def test_intx_merge_keeps_codes_and_scales_and_unmerge_restores_zero_points(dtype, bits, group_size):
    layer = _layer(in_dim=128, out_dim=32, group_size=group_size, dtype=dtype, bits=bits)
    weight = layer.weight
    qdata, scale, zero_point = weight.qdata.clone(), weight.scale.clone(), weight.zero_point.clone()
    x = torch.randn(4, 128, dtype=dtype)
    with torch.no_grad():
        expected = layer(x)
        delta = layer.zero_point_delta()
        layer.merge()
        assert torch.equal(layer.weight.qdata, qdata) and torch.equal(layer.weight.scale, scale)
        shifted = (zero_point.double() - delta / scale.double()).to(dtype)
        assert torch.equal(layer.weight.zero_point, shifted)
        assert not torch.equal(layer.weight.zero_point, zero_point)
        layer.unmerge()
        assert torch.equal(layer.weight.qdata, qdata) and torch.equal(layer.weight.scale, scale)
        assert torch.equal(layer.weight.zero_point, zero_point)
        assert torch.equal(layer(x), expected)
    assert not layer.merged


@pytest.mark.parametrize("quantizer", ["rtn", "hqq"])
@pytest.mark.parametrize("bits,group_size", [(8, 8), (8, 32), (3, 16)])
def test_loading_a_full_precision_weight_into_an_intx_layer_quantizes_it(quantizer, bits, group_size):
    from qalora_tune.quantization.intx_weight import from_torchao_intx, is_intx_weight

    linear = nn.Linear(64, 24)
    fresh = QALoRALinear(64, 24, rank=2, alpha=4.0, group_size=group_size, use_bias=True, quantizer=quantizer, bits=bits)
    assert is_intx_weight(fresh.weight)
    state = {"weight": linear.weight.detach(), "bias": linear.bias.detach()}
    state.update({k: v for k, v in fresh.state_dict().items() if k.startswith("lora")})
    fresh.load_state_dict(state)
    assert is_intx_weight(fresh.weight)
    expected = get_quantizer(quantizer)(linear.weight, group_size, bits)
    got = from_torchao_intx(fresh.weight)
    assert torch.equal(got.qdata, expected.qdata) and torch.equal(got.scale, expected.scale)
    assert ((got.zero - expected.zero).abs() <= 2 * UNIT_ROUNDOFF[torch.float32] * expected.zero.abs()).all()
    assert torch.equal(fresh.bias, linear.bias.detach())


@pytest.mark.parametrize("bits,group_size", [(8, 8), (2, 16), (8, 64)])
def test_from_int4_accepts_an_intx_weight_and_takes_its_bits(bits, group_size):
    from qalora_tune.quantization.intx_weight import to_torchao_intx

    weight = to_torchao_intx(quantize_rtn(torch.randn(32, 128), group_size, bits))
    layer = QALoRALinear.from_int4(weight, rank=4, alpha=8.0)
    assert layer.bits == bits and layer.group_size == group_size
    assert torch.equal(layer.weight.qdata, weight.qdata) and torch.equal(layer.weight.zero_point, weight.zero_point)
    assert layer.lora_a.weight.shape == (4, 128 // group_size)
    x = torch.randn(3, 128)
    dense = _intx_dense(weight)
    assert_within(layer(x), x.double() @ dense.t(), _intx_bound(x, dense, torch.float32, None), "from_int4")
    frozen = QuantizedLinear.from_int4(weight)
    assert frozen.bits == bits and torch.equal(frozen(x), layer(x))


def test_intx_storage_and_bits_mismatches_are_refused():
    from qalora_tune.quantization.intx_weight import to_torchao_intx

    intx4_g32 = to_torchao_intx(quantize_rtn(torch.randn(32, 128), 32, 4))
    with pytest.raises(ValueError, match="4-bit base with group_size=32 is stored as an int4 kernel tensor"):
        QALoRALinear.from_int4(intx4_g32, rank=4, alpha=8.0)
    intx8_g8 = to_torchao_intx(quantize_rtn(torch.randn(32, 128), 8, 8))
    with pytest.raises(ValueError, match="8-bit codes but the layer is built for bits=4"):
        QALoRALinear.from_int4(intx8_g8, rank=4, alpha=8.0, bits=4)
    layer = QALoRALinear(128, 32, rank=4, alpha=8.0, group_size=8, bits=4)
    with pytest.raises(ValueError, match="8-bit codes but the layer is built for bits=4"):
        layer.load_state_dict({"weight": intx8_g8}, strict=False)
    int4_g32 = to_torchao_int4(quantize_rtn(torch.randn(32, 128), 32, 4), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="8-bit base with group_size=32 is stored as an IntxUnpackedToInt8Tensor"):
        QALoRALinear.from_int4(int4_g32, rank=4, alpha=8.0, bits=8)
    with pytest.raises(ValueError, match=r"block_size=\(1, 8\)"):
        QALoRALinear.from_int4(intx8_g8, rank=4, alpha=8.0, group_size=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_chunks_give_the_eager_layer_bit_for_bit(monkeypatch, dtype):
    # the fused, compiled chunk builder (large linears) against the eager one, through
    # the whole layer: forward, input and adapter gradients, and the merged output
    import qalora_tune.ops._cpu_int4_fused as fused

    monkeypatch.setenv("QALORA_TUNE_NATIVE_INT4", "0")  # the chunked paths, not the native GEMM
    layer = _layer(256, 192, dtype=dtype)
    x = torch.randn(300, 256, dtype=dtype)  # past both bf16 row thresholds
    grad = torch.randn(300, 192, dtype=dtype)
    results = {}
    for name, min_elements in (("eager", 1 << 60), ("compiled", 0)):
        monkeypatch.setattr(fused, "COMPILED_MIN_ELEMENTS", min_elements)
        layer.zero_grad()
        x_run = x.clone().requires_grad_()
        out = layer(x_run)
        out.backward(grad)
        layer.merge()
        merged = layer(x).detach()
        layer.unmerge()
        results[name] = (out.detach(), x_run.grad, layer.lora_a.weight.grad.clone(),
                         layer.lora_b.weight.grad.clone(), merged)
    assert fused._kernels
    for eager, compiled in zip(results["eager"], results["compiled"]):
        assert torch.equal(eager, compiled)


# ------------------------------------------------------------------ parametrization


def test_sum_pooling_is_a_lora_whose_a_is_constant_on_each_group():
    """Sum pooling (the default): the adapter is (alpha / r) B A_dense x with
    A_dense[j, k] = A[j, k // G], i.e. torchtune's LoRA with A tied within groups."""
    layer = _layer(in_dim=256, out_dim=48, rank=4, alpha=8.0, group_size=64)
    assert layer.pooling == "sum" and layer.pooling_factor == 64
    x = torch.randn(5, 256)
    a_dense = layer.lora_a.weight.double().repeat_interleave(64, dim=1)
    expected = x.double() @ a_dense.t() @ layer.lora_b.weight.double().t() * (8.0 / 4)
    with torch.no_grad():
        layer.disabled = True
        base = layer(x)
        layer.disabled = False
        adapter = layer(x) - base
    assert_within(adapter, expected, 1e-5 * (expected.abs() + base.double().abs()) + 1e-6, "adapter")
    delta = layer.zero_point_delta()
    assert torch.equal(delta, layer.lora_b.weight.double() @ layer.lora_a.weight.double() * 2.0)


@pytest.mark.parametrize("pooling, fan_in", [("sum", 1024), ("mean", 1024 // 32)])
def test_a_is_drawn_uniform_with_the_fan_in_of_its_convention(pooling, fan_in):
    """Sum pooling draws A as torchtune's LoRA draws a (rank, in_dim) A; mean pooling keeps
    earlier qalora-tune's nn.Linear default on A's own (rank, n_groups) shape."""
    torch.manual_seed(0)
    layer = QALoRALinear(1024, 64, rank=64, alpha=16.0, group_size=32, pooling=pooling)
    a = layer.lora_a.weight
    bound = 1 / fan_in**0.5
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert torch.count_nonzero(layer.lora_b.weight) == 0
    if pooling == "mean":  # the same draws as before this version
        torch.manual_seed(0)
        old = QALoRALinear(1024, 64, rank=64, alpha=16.0, group_size=32, pooling="sum")
        torch.manual_seed(1)
        torch.nn.init.kaiming_uniform_(old.lora_a.weight, a=5**0.5)
        torch.manual_seed(1)
        layer.initialize_parameters()
        assert torch.equal(layer.lora_a.weight, old.lora_a.weight)


def test_an_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling='max' is not a pooling convention"):
        QALoRALinear(128, 32, rank=2, alpha=4.0, group_size=32, pooling="max")
    layer = QALoRALinear(128, 32, rank=2, alpha=4.0, group_size=32)
    with pytest.raises(ValueError, match="pooling='max'"):
        layer.pooling = "max"
    assert layer.pooling == "sum" and layer.config.pooling == "sum"


def test_pooling_is_part_of_the_layer_config():
    """The convention lives in QALoRAConfig (one validated config per layer); switching a
    layer's convention replaces its config and changes nothing else."""
    config = QALoRAConfig(rank=2, alpha=4.0, group_size=32, pooling="mean")
    layer = QALoRALinear(128, 32, config)
    assert layer.pooling == "mean" and layer.pooling_factor == 1 and layer.scaling == 2.0
    layer.pooling = "sum"
    assert layer.config == QALoRAConfig(rank=2, alpha=4.0, group_size=32)
    assert layer.pooling_factor == 32 and layer.scaling == 2.0 * 32
    assert config.pooling == "mean"  # the config given is left alone
