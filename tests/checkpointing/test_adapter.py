"""The adapter on disk in PEFT's layout (``qalora_tune.checkpointing._adapter``).

Covers ``write_adapter`` (PEFT keys, shapes, Hugging Face row order, the PEFT
``adapter_config.json`` with per-module ``lora_alpha = alpha * group_size / n_groups``
for sum pooling and ``alpha / n_groups`` for the mean pooling of earlier qalora-tune), the
key property that PEFT's QA-LoRA formula (``mean * n_groups`` pooling) applied to the
written tensors reproduces the layer's adapter output in both conventions,
``read_adapter`` (bit-exact torchtune tensors back, and its errors on missing, foreign or
truncated files), ``load_adapter_into`` (an adapter of the old mean convention loads
into a sum-pooled model with the function and merged zero points it had, bit for bit) and
``check_adapter_matches`` and ``check_resume_matches`` (each mismatch names the key and
the setting to change).
"""

import functools
import json

import pytest
import torch
from safetensors.torch import load_file
from torchtune.models.llama2 import llama2

from qalora_tune._compat import tune_to_hf
from qalora_tune.checkpointing import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterConfig,
    HFKeyMap,
    adopt_pooling,
    check_adapter_matches,
    check_resume_matches,
    load_adapter_into,
    read_adapter,
    write_adapter,
)
from qalora_tune.models import qalora_transformer
from qalora_tune.modules import QALoRALinear
from qalora_tune.quantization.int4_weight import zero_points

HEADS, KV_HEADS, DIM, HIDDEN, GROUP, RANK, ALPHA = 4, 2, 64, 128, 32, 4, 8.0
HF_CONFIG = dict(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, hidden_size=DIM)
HF_MODULES = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}
METADATA = {
    "format": "qalora_tune",
    "rank": RANK,
    "alpha": ALPHA,
    "group_size": GROUP,
    "bits": 4,
    "pooling": "mean",
    "quantizer": "rtn",
    "pad_in_dim": False,
    "lora_dropout": 0.0,
    "target_modules": sorted(f"layers.{i}.{m}" for i in range(2) for m in HF_MODULES),
    "base_checkpoint_dir": "/checkpoints/base",
    "base_fingerprint": "0123456789abcdef" * 4,
}


def _peft_key(index, tune_module, part):
    return f"base_model.model.model.layers.{index}.{HF_MODULES[tune_module]}.{part}.weight"


def _adapted_layers(pooling="sum", seed=0, adapter_seed=None):
    """The QA-LoRA layers of a small llama2 (base drawn with ``seed``) with non-trivial
    adapters (drawn next, or with ``adapter_seed``), in ``pooling``."""
    base = functools.partial(
        llama2,
        vocab_size=64,
        num_layers=2,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        embed_dim=DIM,
        max_seq_len=32,
        intermediate_dim=HIDDEN,
    )
    torch.manual_seed(seed)
    model = qalora_transformer(
        base,
        ["q_proj", "k_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        lora_rank=RANK,
        lora_alpha=ALPHA,
        group_size=GROUP,
    )
    found = {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
    if adapter_seed is not None:
        torch.manual_seed(adapter_seed)
    with torch.no_grad():
        for layer in found.values():
            layer.pooling = pooling
            layer.lora_a.weight.normal_()
            layer.lora_b.weight.normal_()  # B starts at zero: make it non-trivial
    return found


@pytest.fixture(scope="module", params=["sum", "mean"])
def pooling(request):
    return request.param


@pytest.fixture(scope="module")
def layers(pooling):
    return _adapted_layers(pooling)


@pytest.fixture(scope="module")
def key_map():
    return HFKeyMap("LLAMA2", HF_CONFIG)


@pytest.fixture(scope="module")
def adapter_dir(layers, pooling, key_map, tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapter")
    write_adapter(directory, layers, key_map, dict(METADATA, pooling=pooling))
    return directory


# ---------------------------------------------------------------------- write_adapter


def test_written_keys_and_shapes_are_peft_s(layers, adapter_dir):
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    expected = {}
    for index in range(2):
        for tune_module in HF_MODULES:
            layer = layers[f"layers.{index}.{tune_module}"]
            expected[_peft_key(index, tune_module, "lora_A")] = (RANK, layer.in_dim // GROUP)
            expected[_peft_key(index, tune_module, "lora_B")] = (layer.out_dim, RANK)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert expected[_peft_key(0, "mlp.w2", "lora_A")] == (RANK, 4)
    assert expected[_peft_key(0, "attn.k_proj", "lora_B")] == (KV_HEADS * DIM // HEADS, RANK)


def test_written_b_rows_are_in_hugging_face_order(layers, adapter_dir):
    # lora_A is per input group (unchanged), lora_B rows follow torchtune's tune_to_hf on
    # the dense weight: checked through the dense product (alpha / r) B A of each layer
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    for index in range(2):
        for tune_module in HF_MODULES:
            layer = layers[f"layers.{index}.{tune_module}"]
            a = tensors[_peft_key(index, tune_module, "lora_A")]
            b = tensors[_peft_key(index, tune_module, "lora_B")]
            assert torch.equal(a, layer.lora_a.weight.detach())
            dense = (layer.lora_b.weight.detach() @ layer.lora_a.weight.detach()).repeat_interleave(
                GROUP, dim=1
            )
            if layer.in_dim != DIM:  # tune_to_hf views q/k rows as (heads, ..., dim) only
                dense = dense[:, :DIM]
            key = f"layers.{index}.{tune_module}.weight"
            (hf_key, hf_dense), = tune_to_hf(
                {key: dense}, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM
            ).items()
            assert hf_key == f"model.layers.{index}.{HF_MODULES[tune_module]}.weight"
            written = (b @ a).repeat_interleave(GROUP, dim=1)[:, : hf_dense.shape[1]]
            assert torch.equal(written, hf_dense), hf_key
    # and the test is informative: q_proj's rows really move
    q_b = tensors[_peft_key(0, "attn.q_proj", "lora_B")]
    assert not torch.equal(q_b, layers["layers.0.attn.q_proj"].lora_b.weight.detach())


def test_adapter_config_is_a_peft_qalora_config(layers, pooling, adapter_dir):
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA"
    assert config["use_qalora"] is True
    assert config["qalora_group_size"] == GROUP
    assert config["r"] == RANK
    assert config["lora_dropout"] == 0.0
    assert config["target_modules"] == sorted(m.rsplit(".", 1)[-1] for m in HF_MODULES.values())
    written = config["qalora_tune"]
    assert {k: written[k] for k in METADATA} == dict(METADATA, pooling=pooling)
    assert AdapterConfig.from_dict(written) == AdapterConfig.from_dict(dict(METADATA, pooling=pooling))
    for tune_name, layer in layers.items():
        leaf = HF_MODULES[tune_name.split(".", 2)[2]].rsplit(".", 1)[-1]
        effective = config["alpha_pattern"].get(leaf, config["lora_alpha"])
        n_groups = 4 if leaf == "down_proj" else 2
        assert layer.n_groups == n_groups
        # PEFT scales mean * n_groups by lora_alpha / r: sum pooling is mean * GROUP
        expected = ALPHA * GROUP / n_groups if pooling == "sum" else ALPHA / n_groups
        assert effective == expected, leaf


def _peft_delta(x, a, b_hf, lora_alpha, rank):
    """PEFT's QA-LoRA adapter term (mean pooling times n_groups), float64."""
    n_groups = a.shape[1]
    pooled = x.double().reshape(*x.shape[:-1], n_groups, -1).mean(-1) * n_groups
    return pooled @ a.double().t() @ b_hf.double().t() * (lora_alpha / rank)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("tune_module", list(HF_MODULES))
def test_peft_formula_on_written_tensors_equals_the_layer_adapter(
    layers, adapter_dir, index, tune_module
):
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    layer = layers[f"layers.{index}.{tune_module}"]
    leaf = HF_MODULES[tune_module].rsplit(".", 1)[-1]
    lora_alpha = config["alpha_pattern"].get(leaf, config["lora_alpha"])
    a = tensors[_peft_key(index, tune_module, "lora_A")]
    b_hf = tensors[_peft_key(index, tune_module, "lora_B")]

    torch.manual_seed(10 + index)
    x = torch.randn(4, 16, layer.in_dim)  # 64 tokens: the output matrix converts like a weight
    delta_hf = _peft_delta(x, a, b_hf, lora_alpha, config["r"])

    with torch.no_grad():
        full = layer(x)
        layer.disabled = True
        try:
            base = layer(x)
        finally:
            layer.disabled = False
    delta_layer = (full - base).double()
    # put the layer's output features in Hugging Face's order with torchtune's converter
    tokens_by_features = delta_layer.reshape(-1, layer.out_dim).t().contiguous()
    (_, converted), = tune_to_hf(
        {f"layers.{index}.{tune_module}.weight": tokens_by_features},
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        dim=DIM,
    ).items()
    expected = converted.t().reshape(delta_hf.shape)

    # fp32: the layer's delta is a difference of two fp32 outputs
    tolerance = 1e-5 * (full.abs().max().item() + base.abs().max().item())
    torch.testing.assert_close(delta_hf, expected, rtol=1e-5, atol=tolerance)
    assert delta_hf.abs().max() > 100 * tolerance  # the adapter term is not negligible


def test_peft_parses_the_config(adapter_dir):
    peft = pytest.importorskip("peft", reason="peft is not installed in this environment")
    config = peft.LoraConfig.from_pretrained(str(adapter_dir))
    assert config.use_qalora is True
    assert config.qalora_group_size == GROUP
    assert config.r == RANK


# ---------------------------------------------------------------------- read_adapter


def test_read_adapter_returns_the_trained_tensors_bit_for_bit(layers, pooling, key_map, adapter_dir):
    tensors, metadata = read_adapter(adapter_dir, key_map)
    expected = {}
    for name, layer in layers.items():
        expected[f"{name}.lora_a.weight"] = layer.lora_a.weight.detach()
        expected[f"{name}.lora_b.weight"] = layer.lora_b.weight.detach()
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype
        assert torch.equal(tensors[key], value), key
    assert metadata == AdapterConfig.from_dict(dict(METADATA, pooling=pooling))


# ---------------------------------------------------------------------- old adapters


@pytest.mark.parametrize("written_pooling", [None, "mean"])
def test_a_mean_pooled_adapter_loads_with_its_function_and_merge_bit_for_bit(
    tmp_path, key_map, written_pooling
):
    """An adapter of earlier qalora-tune (mean pooling; its metadata says so, or says nothing)
    loaded into a model of this version (sum pooling) computes what it computed, and
    merges into the zeros the old formula z + (alpha / r) (B A) / G gives."""
    old = _adapted_layers("mean", seed=1)
    metadata = {k: v for k, v in METADATA.items() if k != "pooling"}
    if written_pooling is not None:
        metadata["pooling"] = written_pooling
    write_adapter(tmp_path, old, key_map, metadata)
    if written_pooling is None:  # as earlier versions wrote it: no pooling entry at all
        config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
        del config["qalora_tune"]["pooling"], config["qalora_tune"]["pooling_note"]
        (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    tensors, read_metadata = read_adapter(tmp_path, key_map)
    new = _adapted_layers("sum", seed=1, adapter_seed=2)
    assert all(layer.pooling == "sum" for layer in new.values())
    load_adapter_into(new, tensors, read_metadata, tmp_path, METADATA["base_fingerprint"], False)
    x = torch.randn(3, 5, HIDDEN)
    for name, layer in new.items():
        assert layer.pooling == "mean", name
        reference = old[name]
        inputs = x[..., : layer.in_dim]
        with torch.no_grad():
            assert torch.equal(layer(inputs), reference(inputs)), name
            before = zero_points(layer.weight).double()
            a, b = reference.lora_a.weight.double(), reference.lora_b.weight.double()
            expected = (before + (b @ a) * (ALPHA / RANK / GROUP)).float()
            layer.merge()
            assert torch.equal(zero_points(layer.weight), expected), name
            layer.unmerge()


def test_sum_and_mean_adapters_of_the_same_function_merge_alike():
    """The two conventions are one function apart by A_sum = A_mean / G (exact in binary
    for a power-of-two G): same outputs, same merged zeros."""
    mean = _adapted_layers("mean", seed=3)
    total = _adapted_layers("sum", seed=3)
    x = torch.randn(4, HIDDEN)
    for name, layer in total.items():
        with torch.no_grad():
            layer.lora_a.weight.copy_(mean[name].lora_a.weight / GROUP)
            layer.lora_b.weight.copy_(mean[name].lora_b.weight)
            inputs = x[..., : layer.in_dim]
            torch.testing.assert_close(layer(inputs), mean[name](inputs), rtol=1e-6, atol=1e-6)
            assert torch.equal(layer.zero_point_delta(), mean[name].zero_point_delta()), name


def test_an_unknown_pooling_is_refused(tmp_path):
    layers = _adapted_layers("sum")
    with pytest.raises(ValueError, match="qalora_tune.pooling='max', not one of sum, mean"):
        AdapterConfig.from_dict(dict(METADATA, pooling="max"), tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match="qalora_tune.pooling='max'"):
        adopt_pooling(layers.values(), dict(METADATA, pooling="max"))
    assert all(layer.pooling == "sum" for layer in layers.values())


def test_the_written_pooling_is_the_layers_whatever_the_description_says(tmp_path, key_map):
    write_adapter(tmp_path, _adapted_layers("sum"), key_map, dict(METADATA, pooling="mean"))
    _, metadata = read_adapter(tmp_path, key_map)
    assert metadata.pooling == "sum"


def test_an_adapter_config_that_lies_about_its_types_is_refused(tmp_path):
    for key, value in (("rank", "8"), ("alpha", -1), ("target_modules", "q_proj"), ("pad_in_dim", 1)):
        with pytest.raises(ValueError, match=f"qalora_tune.{key}="):
            AdapterConfig.from_dict(dict(METADATA, **{key: value}), tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match="has no qalora_tune.rank"):
        AdapterConfig.from_dict({k: v for k, v in METADATA.items() if k != "rank"})


def test_an_adapter_of_a_moved_builder_reads_as_the_new_path():
    old = AdapterConfig.from_dict(dict(METADATA, model={"_component_": "qalora_tune.models.qalora_tiny_llama"}))
    assert old.model_builder == "qalora_tune.tiny.qalora_tiny_llama"


def test_read_adapter_missing_files(tmp_path, key_map):
    with pytest.raises(FileNotFoundError, match=ADAPTER_WEIGHTS_NAME):
        read_adapter(tmp_path, key_map)


def test_read_adapter_missing_config(tmp_path, key_map, adapter_dir):
    (tmp_path / ADAPTER_WEIGHTS_NAME).write_bytes((adapter_dir / ADAPTER_WEIGHTS_NAME).read_bytes())
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG_NAME):
        read_adapter(tmp_path, key_map)


def test_read_adapter_refuses_a_foreign_peft_adapter(tmp_path, key_map, adapter_dir):
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    del config["qalora_tune"]
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    (tmp_path / ADAPTER_WEIGHTS_NAME).write_bytes((adapter_dir / ADAPTER_WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="qalora_tune"):
        read_adapter(tmp_path, key_map)


def test_read_adapter_refuses_a_truncated_weights_file(tmp_path, key_map, adapter_dir):
    data = (adapter_dir / ADAPTER_WEIGHTS_NAME).read_bytes()
    (tmp_path / ADAPTER_CONFIG_NAME).write_text((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    (tmp_path / ADAPTER_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read"):
        read_adapter(tmp_path, key_map)


# ---------------------------------------------------------------------- check_adapter_matches

EXPECTED = {key: METADATA[key] for key in (
    "group_size", "bits", "rank", "alpha", "target_modules", "pad_in_dim", "base_fingerprint"
)}


def test_a_matching_adapter_passes(tmp_path):
    check_adapter_matches(dict(METADATA), dict(EXPECTED), tmp_path)
    # an int alpha written by JSON equals the model's float alpha
    check_adapter_matches(dict(METADATA, alpha=8), dict(EXPECTED), tmp_path)


@pytest.mark.parametrize(
    "key, other, setting",
    [
        ("group_size", 64, "model.group_size"),
        ("bits", 3, "bit width"),
        ("rank", 8, "model.lora_rank"),
        ("alpha", 16.0, "model.lora_alpha"),
        ("target_modules", ["layers.0.attn.q_proj"], "model.lora_attn_modules"),
        ("pad_in_dim", True, "model.pad_in_dim"),
    ],
)
def test_each_mismatch_names_the_key_and_the_setting(tmp_path, key, other, setting):
    expected = dict(EXPECTED, **{key: other})
    with pytest.raises(ValueError) as error:
        check_adapter_matches(dict(METADATA), expected, tmp_path / "adapter")
    message = str(error.value)
    assert f"{key}={METADATA[key]!r}" in message and f"{key}={other!r}" in message
    assert setting in message
    assert str(tmp_path / "adapter") in message


def test_an_adapter_from_before_eight_bit_scales_counts_as_dense_scales(tmp_path):
    """Adapters written before ``double_quant_scales`` existed were trained on dense scales."""
    assert "double_quant_scales" not in METADATA
    check_adapter_matches(dict(METADATA), dict(EXPECTED, double_quant_scales=False), tmp_path)
    with pytest.raises(ValueError, match="double_quant_scales=False but the model has "
                       "double_quant_scales=True; set model.double_quant_scales"):
        check_adapter_matches(dict(METADATA), dict(EXPECTED, double_quant_scales=True), tmp_path)
    check_adapter_matches(dict(METADATA, double_quant_scales=True),
                          dict(EXPECTED, double_quant_scales=True), tmp_path)


def test_another_base_checkpoint_is_refused(tmp_path):
    expected = dict(EXPECTED, base_fingerprint="fedcba9876543210" * 4)
    with pytest.raises(ValueError) as error:
        check_adapter_matches(dict(METADATA), expected, tmp_path)
    message = str(error.value)
    assert "fingerprint" in message and "checkpointer.checkpoint_dir" in message
    assert METADATA["base_checkpoint_dir"] in message
    assert METADATA["base_fingerprint"][:12] in message


# ---------------------------------------------------------------------- check_resume_matches

SAVED = dict(METADATA, model={"_component_": "qalora_tune.tiny.qalora_tiny_llama"})


def test_resuming_the_same_configuration_passes(tmp_path):
    check_resume_matches(dict(SAVED), dict(SAVED, alpha=int(ALPHA), lora_dropout=0.1), tmp_path)


@pytest.mark.parametrize(
    "key, other, setting",
    [
        ("group_size", 64, "model.group_size"),
        ("bits", 8, "model.bits"),
        ("rank", 8, "model.lora_rank"),
        ("alpha", 16.0, "model.lora_alpha"),
        ("quantizer", "hqq", "model.quantizer"),
        ("pad_in_dim", True, "model.pad_in_dim"),
        ("model", {"_component_": "qalora_tune.models.qalora_llama2_7b"}, "model._component_"),
    ],
)
def test_each_resume_mismatch_names_both_values_and_the_setting(tmp_path, key, other, setting):
    with pytest.raises(ValueError) as error:
        check_resume_matches(dict(SAVED), dict(SAVED, **{key: other}), tmp_path / "epoch_0")
    message = str(error.value)
    assert message.startswith(f"resume_from_checkpoint=True but {tmp_path / 'epoch_0'}")
    if key == "model":  # compared by the builder's path
        key, other = "model_builder", other["_component_"]
        assert f"{key}={SAVED['model']['_component_']!r}" in message and f"{key}={other!r}" in message
    else:
        assert f"{key}={SAVED[key]!r}" in message and f"{key}={other!r}" in message
    assert f"set {setting} back" in message and "resume_from_checkpoint=False" in message


def test_resume_with_other_targets_names_the_differing_layers(tmp_path):
    current = dict(SAVED, target_modules=SAVED["target_modules"][:-1] + ["layers.0.output"])
    with pytest.raises(ValueError) as error:
        check_resume_matches(dict(SAVED), current, tmp_path)
    message = str(error.value)
    assert "adapters on 14 layers and this config puts them on 14" in message
    assert repr(SAVED["target_modules"][-1]) in message and "'layers.0.output'" in message
    assert "model.lora_attn_modules" in message


def test_resume_with_other_calibration_names_the_calibration_setting(tmp_path):
    calibration = {"num_samples": 64, "damp": 0.01, "seed": 0}
    saved = dict(SAVED, quantizer="gptq", calibration=calibration)
    check_resume_matches(saved, dict(saved), tmp_path)
    current = dict(saved, calibration=dict(calibration, num_samples=32))
    with pytest.raises(ValueError) as error:
        check_resume_matches(saved, current, tmp_path)
    message = str(error.value)
    assert "calibration.num_samples=64" in message and "calibration.num_samples=32" in message
    assert "set calibration.num_samples back" in message


def test_resume_on_another_base_names_the_checkpoint_dir(tmp_path):
    current = dict(SAVED, base_fingerprint="fedcba9876543210" * 4, base_checkpoint_dir="/other")
    with pytest.raises(ValueError) as error:
        check_resume_matches(dict(SAVED), current, tmp_path)
    message = str(error.value)
    assert "another base" in message and "set checkpointer.checkpoint_dir" in message
    assert "/checkpoints/base" in message and "/other" in message
