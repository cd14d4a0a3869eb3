"""The canonical view of a base's layers and its fingerprint: the same in every storage,
blind to zero points, sensitive to every code and scale."""

import pytest
import torch

from qalora_tune.modules import QuantizedLinear
from qalora_tune.quantization import GroupQuantizedWeight, quantize_rtn
from qalora_tune.quantization.int4_weight import to_torchao_int4
from qalora_tune.quantization.base_weight import stored_zero_points
from qalora_tune.quantization.intx_weight import from_torchao_intx, to_torchao_intx
from qalora_tune.quantization.plain_int4 import to_plain_int4
from qalora_tune.quantization.int4_weight import tinygemm_int4
from qalora_tune.tasks import base_fingerprint, canonical_layer, layer_digest
from qalora_tune.tasks.base_layers import fingerprint_model, model_base_layers
from qalora_tune.tasks.switch import zeros_in_storage
from tests.tasks.family import KEY_MAP, build, plain_weights


def _quantized(bits, out_dim=48, in_dim=128, group_size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return quantize_rtn(torch.randn(out_dim, in_dim, generator=generator), group_size, bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_storage_of_one_base_gives_the_same_layer_and_digest(bits, dtype):
    gq = _quantized(bits)
    gq = GroupQuantizedWeight(gq.qdata, gq.scale.to(dtype), gq.zero.to(dtype), gq.group_size, bits)
    storages = {
        "cpu": to_torchao_int4(gq, device="cpu", dtype=dtype),
        "tinygemm": tinygemm_int4(gq.as_int4(), "cpu", dtype),
        "plain": to_plain_int4(gq, dtype=dtype),
        "intx": to_torchao_intx(gq, dtype=dtype),
    }
    layers = {name: canonical_layer("w", weight, bits, 128) for name, weight in storages.items()}
    reference = layers["cpu"]
    # codes q - 2**(bits-1), whatever the storage keeps
    assert torch.equal(reference.codes, (gq.qdata.to(torch.int16) - gq.mid).to(torch.int8))
    assert reference.codes.abs().max() <= 2 ** (bits - 1)
    assert reference.zero.dtype == dtype and torch.equal(reference.zero, gq.zero)
    for name, layer in layers.items():
        assert torch.equal(layer.codes, reference.codes), name
        assert torch.equal(layer.scale, reference.scale), name
        assert layer_digest(layer) == layer_digest(reference), name
    # intx keeps zp = -z / s, as stored; into an int4 storage it goes as loading an intx
    # file does (z = -zp * s in float64, through float32), into intx unchanged
    intx = storages["intx"]
    assert layers["intx"].storage == "intx" and layers["intx"].zero is intx.zero_point
    back = zeros_in_storage(intx, layers["intx"].zero, "intx", intx.zero_point.dtype)
    assert torch.equal(back.view(torch.uint8), intx.zero_point.view(torch.uint8))
    cpu = storages["cpu"]
    into_int4 = zeros_in_storage(cpu, intx.zero_point, "intx", dtype)
    loaded = to_torchao_int4(from_torchao_intx(intx), device="cpu", dtype=dtype)
    assert torch.equal(into_int4.view(torch.uint8), stored_zero_points(loaded).contiguous().view(torch.uint8))
    # and a z table goes into intx as the writer converts a base (zp = -z / s in float64)
    into_intx = zeros_in_storage(intx, reference.zero, "int4", intx.zero_point.dtype)
    assert torch.equal(into_intx.view(torch.uint8), intx.zero_point.view(torch.uint8))


def test_z_from_intx_round_trips_for_random_fp32_and_bf16_values():
    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        scale = (torch.rand(512, 64, generator=generator) * 0.1 + 1e-4).to(dtype)
        zp = (torch.randn(512, 64, generator=generator) * 40).to(dtype)
        z = -zp.double() * scale.double()
        again = (-z / scale.double()).to(dtype)
        assert torch.equal(again.view(torch.uint8), zp.view(torch.uint8)), dtype


def test_the_fingerprint_ignores_zeros_and_sees_every_code_and_scale():
    gq = _quantized(4)
    weight = to_torchao_int4(gq, device="cpu", dtype=torch.float32)
    digest = layer_digest(canonical_layer("w", weight, 4, 128))
    shifted = GroupQuantizedWeight(gq.qdata, gq.scale, gq.zero + 0.25, 32, 4)
    assert layer_digest(canonical_layer("w", to_torchao_int4(shifted, "cpu"), 4, 128)) == digest
    code = gq.qdata.clone()
    code[47, 127] = (code[47, 127] + 1) % 16
    changed = GroupQuantizedWeight(code, gq.scale, gq.zero, 32, 4)
    assert layer_digest(canonical_layer("w", to_torchao_int4(changed, "cpu"), 4, 128)) != digest
    scale = gq.scale.clone()
    scale[0, 3] = torch.nextafter(scale[0, 3], torch.tensor(1.0))
    changed = GroupQuantizedWeight(gq.qdata, scale, gq.zero, 32, 4)
    assert layer_digest(canonical_layer("w", to_torchao_int4(changed, "cpu"), 4, 128)) != digest
    # the key and the bit width are part of it too; scales count by value: the same
    # values stored in bf16 give the same digest, rounded ones do not
    assert layer_digest(canonical_layer("v", weight, 4, 128)) != digest
    assert layer_digest(canonical_layer("w", weight, 3, 128)) != digest
    bf16 = to_torchao_int4(gq, device="cpu", dtype=torch.bfloat16)
    assert layer_digest(canonical_layer("w", bf16, 4, 128)) != digest
    exact = GroupQuantizedWeight(gq.qdata, gq.scale.bfloat16().float(), gq.zero, 32, 4)
    assert layer_digest(canonical_layer("w", to_torchao_int4(exact, "cpu", dtype=torch.float32), 4, 128)) == (
        layer_digest(canonical_layer("w", to_torchao_int4(exact, "cpu", dtype=torch.bfloat16), 4, 128))
    )
    assert base_fingerprint({"a": "1", "b": "2"}) == base_fingerprint({"b": "2", "a": "1"})
    assert base_fingerprint({"a": "1", "b": "2"}) != base_fingerprint({"a": "2", "b": "1"})
    with pytest.raises(ValueError, match="no quantized linear"):
        base_fingerprint({})


def test_a_padded_layer_keeps_only_its_real_columns():
    linear = torch.nn.Linear(172, 24, bias=False)
    layer = QuantizedLinear.from_linear(linear, group_size=32, pad_in_dim=True)
    view = canonical_layer("w", layer.weight, 4, layer.in_dim)
    assert view.codes.shape == (24, 172) and view.scale.shape == (24, 6)
    plain = to_plain_int4(GroupQuantizedWeight(
        (view.codes.to(torch.int16) + 8).to(torch.uint8), view.scale, view.zero, 32, 4
    ), in_features=172)
    assert layer_digest(canonical_layer("w", plain, 4, 172)) == layer_digest(view)


def test_the_model_view_reorders_rows_to_hugging_face_and_refuses_unmerged_adapters():
    model = build(plain_weights(), 4, 32, adapters=True)
    with pytest.raises(ValueError, match="merge"):
        next(model_base_layers(model, KEY_MAP))
    fingerprint = fingerprint_model(model, KEY_MAP)  # zeros do not count: merged or not
    plain = build(plain_weights(), 4, 32, adapters=False)
    assert fingerprint_model(plain, KEY_MAP) == fingerprint
    layers = {layer.key: layer for layer in model_base_layers(plain, KEY_MAP)}
    q = plain.layers[0].attn.q_proj
    rows = KEY_MAP.row_order("layers.0.attn.q_proj.weight", q.out_dim, to_hf=True)[1]
    assert not torch.equal(rows, torch.arange(q.out_dim))  # RoPE's two layouts differ
    mine = canonical_layer("x", q.weight, 4, q.in_dim)
    assert torch.equal(layers["model.layers.0.self_attn.q_proj.weight"].codes, mine.codes[rows])
