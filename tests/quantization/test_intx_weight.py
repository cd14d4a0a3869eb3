"""The dequantizing intx base (torchao ``IntxUnpackedToInt8Tensor``): storage round trip,
dequantization in both conventions, construction on meta, and the merged checkpoint
written from and loaded into intx layers (``load_merged`` and transformers)."""

import json

import pytest
import torch
from torch import nn

import qalora_tune
from qalora_tune._compat import IntxUnpackedToInt8Tensor
from qalora_tune.modules import QALoRALinear, QuantizedLinear
from qalora_tune.ops.intx_linear import dequantize_intx
from qalora_tune.quantization import GroupQuantizedWeight, quantize_hqq, quantize_rtn
from qalora_tune.quantization.base_weight import dequantize_base, from_torchao_base
from qalora_tune.quantization.intx_weight import (
    empty_intx,
    from_torchao_intx,
    intx_bits,
    is_intx_weight,
    to_torchao_intx,
)
from qalora_tune.tiny import TINY_LLAMA_SIZES, qalora_tiny_llama
from tests.export.merged_models import write_merged
from tests.reference import UNIT_ROUNDOFF, assert_within

U32 = UNIT_ROUNDOFF[torch.float32]


def _expand(per_group, group_size):
    return per_group.double().repeat_interleave(group_size, dim=1)


# ---------------------------------------------------------------------- storage round trip


@pytest.mark.parametrize("group_size", [8, 16, 32])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_and_dequantization_match_float64(bits, group_size):
    weight = torch.randn(24, 96) * torch.rand(24, 1) * 3 + torch.randn(24, 1)  # zeros far from 0
    gq = quantize_rtn(weight, group_size, bits)
    intx = to_torchao_intx(gq)
    assert isinstance(intx, IntxUnpackedToInt8Tensor) and is_intx_weight(intx)
    assert intx.shape == (24, 96) and intx.dtype == torch.float32 and intx.qdata.dtype == torch.int8
    assert intx.target_dtype == getattr(torch, f"int{bits}") and intx_bits(intx) == bits
    assert tuple(intx.block_size) == (1, group_size)
    # signed codes c = q - mid inside torchao's range for target_dtype
    assert int(intx.qdata.min()) >= -(2 ** (bits - 1)) and int(intx.qdata.max()) <= 2 ** (bits - 1) - 1

    back = from_torchao_intx(intx)
    assert back.bits == bits and back.group_size == group_size
    assert torch.equal(back.qdata, gq.qdata) and back.qdata.dtype == torch.uint8
    assert torch.equal(back.scale, gq.scale)
    # zp = fl(-z / s) and back z = fl(-zp * s): two fp32 roundings of |z|
    z = gq.zero.double().abs()
    assert ((back.zero.double() - gq.zero.double()).abs() <= 2 * U32 * z * (1 + 1e-6)).all()

    exact = gq.dequantize(torch.float64)
    zero_bound = _expand(2 * U32 * z * (1 + 1e-6), group_size) + 1e-300
    assert_within(dequantize_base(intx, torch.float64), exact, zero_bound, "dequantize_base")
    assert dequantize_base(intx).dtype == torch.float32
    # torchao's (and transformers') convention, (c - zp) * s in fp32: zp rounded (u |z|),
    # the subtraction rounded (u |c - zp| s = u |W|) and the product rounded (u |W|)
    torchao = intx.dequantize()
    assert torchao.dtype == torch.float32
    bound = (1 + 1e-6) * (_expand(U32 * z, group_size) + 2 * U32 * exact.abs()) + 1e-300
    assert_within(torchao, exact, bound, "torchao dequantize")
    # this project's float64 view of the stored tensor is torchao's formula in float64
    stored = dequantize_intx(intx.qdata, intx.scale, intx.zero_point, torch.float64)
    assert_within(torchao, stored, 2 * U32 * stored.abs() + 1e-300, "torchao vs stored float64")


@pytest.mark.parametrize("bits", [4, 8])
def test_bfloat16_storage_rounds_scales_and_zeros_once(bits):
    gq = quantize_hqq(torch.randn(16, 64) + 0.5, 16, bits)
    intx = to_torchao_intx(gq, dtype=torch.bfloat16)
    assert intx.dtype == intx.scale.dtype == intx.zero_point.dtype == torch.bfloat16
    back = from_torchao_intx(intx)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    assert torch.equal(back.qdata, gq.qdata)
    assert torch.equal(back.scale, gq.scale.bfloat16().float())
    z = gq.zero.double().abs()
    # zp rounded to bf16 (u |z|), the scale it multiplies rounded to bf16 (u |z|), fp32 result
    assert ((back.zero.double() - gq.zero.double()).abs() <= (2 * u + 4 * U32) * z + 1e-300).all()
    exact = gq.dequantize(torch.float64)
    steps = (gq.qdata.double() - gq.mid).abs() * _expand(gq.scale, 16)
    bound = u * steps + _expand((2 * u + 4 * U32) * z, 16) + 1e-300
    assert_within(dequantize_base(intx, torch.float64), exact, bound, "bf16 dequantize_base")


def test_device_and_dtype_arguments():
    gq = quantize_rtn(torch.randn(8, 32), 8, 8)
    intx = to_torchao_intx(gq, device="cpu", dtype=torch.float16)
    assert intx.device.type == "cpu" and intx.dtype == torch.float16 and intx.scale.dtype == torch.float16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert to_torchao_intx(gq).dtype == torch.bfloat16  # the default dtype
    finally:
        torch.set_default_dtype(previous)


def test_zero_scale_is_refused():
    gq = quantize_rtn(torch.randn(8, 32), 8, 8)
    scale = gq.scale.clone()
    scale[3, 1] = 0.0
    bad = GroupQuantizedWeight(gq.qdata, scale, gq.zero, gq.group_size, gq.bits)
    with pytest.raises(ValueError, match="scale 0"):
        to_torchao_intx(bad)


def test_quantizers_never_produce_a_zero_scale_on_constant_groups():
    weight = torch.randn(8, 32)
    weight[:, :8] = 0.0  # a constant (zero) group
    weight[:, 8:16] = 1.5
    for quantize in (quantize_rtn, quantize_hqq):
        intx = to_torchao_intx(quantize(weight, 8, 8))
        assert (intx.scale != 0).all()
        torch.testing.assert_close(dequantize_base(intx)[:, :16], weight[:, :16], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_empty_intx_on_meta(dtype):
    weight = empty_intx(48, 96, 16, 3, "meta", dtype)
    expected = dtype or torch.get_default_dtype()
    assert isinstance(weight, IntxUnpackedToInt8Tensor)
    assert weight.is_meta and weight.qdata.is_meta and weight.scale.is_meta and weight.zero_point.is_meta
    assert weight.shape == (48, 96) and weight.dtype == expected
    assert weight.qdata.shape == (48, 96) and weight.qdata.dtype == torch.int8
    assert weight.scale.shape == weight.zero_point.shape == (48, 6)
    assert weight.scale.dtype == weight.zero_point.dtype == expected
    assert tuple(weight.block_size) == (1, 16) and intx_bits(weight) == 3


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_intx_bits_reads_the_target_dtype(bits):
    assert intx_bits(empty_intx(4, 8, 8, bits, "meta")) == bits


# ---------------------------------------------------------------------- merged checkpoint

ATTENTION = ["q_proj", "k_proj", "v_proj", "output_proj"]


def _merged_tiny(bits, group_size, pad_in_dim=False, tokens=None):
    """The tiny llama with random adapters merged (and, given tokens, its logits with the
    adapters off)."""
    torch.manual_seed(bits * 100 + group_size)
    plain = qalora_tiny_llama.full_precision()
    model = qalora_tiny_llama(
        ATTENTION, apply_lora_to_mlp=True, lora_rank=2, lora_alpha=4.0,
        group_size=group_size, bits=bits, pad_in_dim=pad_in_dim,
    )
    model.load_state_dict(plain.state_dict(), strict=False)
    adapters = [m for m in model.modules() if isinstance(m, QALoRALinear)]
    for layer in adapters:
        nn.init.normal_(layer.lora_b.weight, std=0.05)
    model.eval()
    base_logits = None
    if tokens is not None:
        with torch.no_grad():
            for layer in adapters:
                layer.disabled = True
            base_logits = model(tokens)
            for layer in adapters:
                layer.disabled = False
    for layer in adapters:
        layer.merge()
    return model, base_logits


_write = write_merged  # the tiny llama's merged_int4/ writer, shared with the export tests


@pytest.fixture(scope="module", params=[(8, 8), (4, 8)], ids=["bits8_g8", "bits4_g8"])
def merged_intx(request, tmp_path_factory):
    bits, group_size = request.param
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY_LLAMA_SIZES["vocab_size"], (2, 16), generator=generator)
    model, base_logits = _merged_tiny(bits, group_size, tokens=tokens)
    directory = tmp_path_factory.mktemp(f"merged_b{bits}_g{group_size}")
    sizes = _write(model, directory, bits, group_size)
    with torch.no_grad():
        logits = model(tokens)
    return model, directory, sizes, tokens, logits, base_logits, bits, group_size


def test_merged_intx_config_names_intx_weight_only(merged_intx):
    model, directory, sizes, _, _, _, bits, group_size = merged_intx
    config = json.loads((directory / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "torchao"
    default = quant["quant_type"]["default"]
    assert default["_type"] == "IntxWeightOnlyConfig"
    data = default["_data"]
    assert data["weight_dtype"] == {"_type": "torch.dtype", "_data": f"int{bits}"}
    assert data["granularity"]["_type"] == "PerGroup"
    assert data["granularity"]["_data"]["group_size"] == group_size
    assert data["mapping_type"]["_data"] == "ASYMMETRIC"
    assert config["torch_dtype"] == "float32"
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert sizes["quantized_parameters"] == sum(m.out_dim * m.in_dim for m in linears)
    # one int8 code per weight plus fp32 scale and zero point per group
    assert sizes["bits_per_quantized_parameter"] == pytest.approx(8 + 2 * 32 / group_size)


@torch.no_grad()
def test_load_merged_gives_intx_layers_with_the_merged_zero_points(merged_intx):
    model, directory, _, _, _, _, bits, group_size = merged_intx
    loaded = qalora_tune.load_merged(directory)
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        mine, theirs = module.weight, loaded.get_submodule(name).weight
        assert isinstance(theirs, IntxUnpackedToInt8Tensor), name
        assert loaded.get_submodule(name).bits == bits and tuple(theirs.block_size) == (1, group_size)
        assert bool(torch.equal(theirs.qdata, mine.qdata)), name
        assert bool(torch.equal(theirs.scale, mine.scale)), name
        # the written file holds the merged zero points as stored: no float-domain detour
        changed = int((theirs.zero_point != mine.zero_point).sum())
        assert changed == 0, (
            f"{name}: {changed} of {mine.zero_point.numel()} zero points changed on the way "
            "through the file"
        )


@torch.no_grad()
def test_load_merged_logits_equal_the_in_memory_merged_model(merged_intx):
    _, directory, _, tokens, logits, _, _, _ = merged_intx
    loaded = qalora_tune.load_merged(directory)
    diff = (loaded(tokens) - logits).abs().max().item()
    assert diff == 0.0, f"load_merged logits differ from the merged model's by up to {diff:.3g}"


@torch.no_grad()
def test_transformers_loads_the_merged_intx_model_within_fp32_rounding(merged_intx):
    from transformers import AutoModelForCausalLM

    _, directory, _, tokens, logits, base_logits, _, _ = merged_intx
    hf = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    weight = hf.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
    theirs = hf(tokens).logits
    # fp32 through 2 layers, reductions of <= 256 terms (as tests/models/test_builders.py)
    scale = logits.abs().max()
    assert (theirs.double() - logits.double()).abs().max() <= 1e-5 * scale
    # the adapters visibly moved the function, so the comparison is not vacuous
    assert (base_logits.double() - logits.double()).abs().max() > 100 * 1e-5 * scale


def test_a_padded_intx_layer_refuses_to_be_written(tmp_path):
    # group 24 divides neither 128 nor 256: every linear padded, stored intx
    model, _ = _merged_tiny(8, 24, pad_in_dim=True)
    assert model.layers[0].attn.q_proj.padded_in_dim == 144
    assert is_intx_weight(model.layers[0].attn.q_proj.weight)
    with pytest.raises(ValueError, match="cannot hold linears padded to whole groups"):
        _write(model, tmp_path / "padded", 8, 24)
    assert not (tmp_path / "padded" / "model.safetensors").exists()


def test_from_torchao_base_reads_merged_intx_zero_points():
    layer = QALoRALinear.from_linear(nn.Linear(64, 16), rank=2, alpha=4.0, group_size=8, bits=8)
    nn.init.normal_(layer.lora_b.weight, std=0.1)
    before = from_torchao_base(layer.weight)
    delta = layer.zero_point_delta()
    layer.merge()
    after = from_torchao_base(layer.weight)
    assert torch.equal(after.qdata, before.qdata) and torch.equal(after.scale, before.scale)
    # z' = -zp' s with zp' = fl(zp - delta / s): |z' - (z + delta)| <= u |z'| + fp32 readouts
    bound = 4 * U32 * (after.zero.double().abs() + before.zero.double().abs()) + 1e-300
    assert_within(after.zero, before.zero.double() + delta, bound, "merged zeros")
