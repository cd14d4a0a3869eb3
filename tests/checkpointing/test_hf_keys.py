"""``HFKeyMap`` (``qalora_tune.checkpointing._hf_keys``): the key and row order that
``row_order`` derives from a probe must be exactly what torchtune's converters do to a
dense weight (llama-family and Qwen2 converters, grouped-query attention, explicit
``head_dim``), the reverse direction must undo it, and unknown model types are refused.
"""

import pytest
import torch

from qalora_tune._compat import (
    hf_to_tune,
    qwen2_hf_to_tune,
    qwen2_tune_to_hf,
    tune_to_hf,
)
from qalora_tune.checkpointing import HFKeyMap
from qalora_tune.checkpointing._hf_keys import HF_MODEL_TYPES

HEADS, KV_HEADS, DIM, HIDDEN, VOCAB = 4, 2, 64, 128, 96
LLAMA_TYPES = ("LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL")


def _config(head_dim=None, **extra):
    config = dict(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, hidden_size=DIM)
    if head_dim is not None:
        config["head_dim"] = head_dim
    config.update(extra)
    return config


def _weights(head_dim):
    """torchtune key -> (out_dim, in_dim) of the adaptable linears of a small llama."""
    return {
        "layers.0.attn.q_proj.weight": (HEADS * head_dim, DIM),
        "layers.0.attn.k_proj.weight": (KV_HEADS * head_dim, DIM),
        "layers.1.attn.v_proj.weight": (KV_HEADS * head_dim, DIM),
        "layers.1.attn.output_proj.weight": (DIM, HEADS * head_dim),
        "layers.0.mlp.w1.weight": (HIDDEN, DIM),
        "layers.1.mlp.w2.weight": (DIM, HIDDEN),
        "layers.0.mlp.w3.weight": (HIDDEN, DIM),
        "output.weight": (VOCAB, DIM),
    }


EXPECTED_HF_KEYS = {
    "layers.0.attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight",
    "layers.0.attn.k_proj.weight": "model.layers.0.self_attn.k_proj.weight",
    "layers.1.attn.v_proj.weight": "model.layers.1.self_attn.v_proj.weight",
    "layers.1.attn.output_proj.weight": "model.layers.1.self_attn.o_proj.weight",
    "layers.0.mlp.w1.weight": "model.layers.0.mlp.gate_proj.weight",
    "layers.1.mlp.w2.weight": "model.layers.1.mlp.down_proj.weight",
    "layers.0.mlp.w3.weight": "model.layers.0.mlp.up_proj.weight",
    "output.weight": "lm_head.weight",
}


def _converters(model_type, head_dim):
    kwargs = dict(num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM, head_dim=head_dim)
    if model_type == "QWEN2":
        return (lambda sd: qwen2_tune_to_hf(sd, **kwargs)), (lambda sd: qwen2_hf_to_tune(sd, **kwargs))
    return (lambda sd: tune_to_hf(sd, **kwargs)), (lambda sd: hf_to_tune(sd, **kwargs))


@pytest.mark.parametrize("model_type", LLAMA_TYPES + ("QWEN2",))
@pytest.mark.parametrize("head_dim", [None, 32], ids=["head_dim_omitted", "head_dim_32"])
@pytest.mark.parametrize("key", list(EXPECTED_HF_KEYS))
def test_row_order_matches_torchtune_converters_on_dense_weights(model_type, head_dim, key):
    torch.manual_seed(0)
    key_map = HFKeyMap(model_type, _config(head_dim))
    to_hf, to_tune = _converters(model_type, head_dim)
    out_dim, in_dim = _weights(head_dim or DIM // HEADS)[key]
    weight = torch.randn(out_dim, in_dim)

    hf_key, index = key_map.row_order(key, out_dim, to_hf=True)
    (reference_key, reference), = to_hf({key: weight}).items()
    assert hf_key == reference_key == EXPECTED_HF_KEYS[key]
    assert index.dtype == torch.long and index.shape == (out_dim,)
    assert torch.equal(reference, weight[index])

    # and back: the Hugging Face key and rows return to torchtune's
    tune_key, back = key_map.row_order(hf_key, out_dim, to_hf=False)
    (reference_key, reference_back), = to_tune({hf_key: reference}).items()
    assert tune_key == reference_key == key
    assert torch.equal(reference_back, reference[back])
    assert torch.equal(index[back], torch.arange(out_dim))


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
@pytest.mark.parametrize("key", ["layers.0.attn.q_proj.weight", "layers.0.attn.k_proj.weight"])
def test_llama_rope_projections_are_really_permuted(model_type, key):
    # the comparison above is only informative if some rows move
    out_dim = _weights(DIM // HEADS)[key][0]
    _, index = HFKeyMap(model_type, _config()).row_order(key, out_dim, to_hf=True)
    assert not torch.equal(index, torch.arange(out_dim))
    assert torch.equal(index.sort().values, torch.arange(out_dim))


def test_qwen2_keeps_row_order():
    key_map = HFKeyMap("QWEN2", _config())
    for key, (out_dim, _) in _weights(DIM // HEADS).items():
        _, index = key_map.row_order(key, out_dim, to_hf=True)
        assert torch.equal(index, torch.arange(out_dim)), key


def test_missing_num_key_value_heads_means_multi_head_attention():
    torch.manual_seed(1)
    config = dict(num_attention_heads=HEADS, hidden_size=DIM)
    key = "layers.0.attn.k_proj.weight"
    weight = torch.randn(DIM, DIM)
    _, index = HFKeyMap("LLAMA2", config).row_order(key, DIM, to_hf=True)
    reference = tune_to_hf({key: weight}, num_heads=HEADS, num_kv_heads=HEADS, dim=DIM)
    assert torch.equal(reference["model.layers.0.self_attn.k_proj.weight"], weight[index])


@pytest.mark.parametrize("model_type", LLAMA_TYPES + ("QWEN2",))
def test_dense_conversion_round_trips(model_type):
    torch.manual_seed(2)
    key_map = HFKeyMap(model_type, _config())
    state = {key: torch.randn(shape) for key, shape in _weights(DIM // HEADS).items()}
    hf = key_map.to_hf(state)
    assert set(hf) == set(EXPECTED_HF_KEYS.values())
    back = key_map.to_tune(hf)
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_qwen2_tied_embeddings_drop_the_output_projection():
    torch.manual_seed(3)
    hf = {"lm_head.weight": torch.randn(VOCAB, DIM), "model.embed_tokens.weight": torch.randn(VOCAB, DIM)}
    tied = HFKeyMap("QWEN2", _config(tie_word_embeddings=True)).to_tune(hf)
    untied = HFKeyMap("QWEN2", _config()).to_tune(hf)
    assert set(tied) == {"tok_embeddings.weight"}
    assert set(untied) == {"tok_embeddings.weight", "output.weight"}


@pytest.mark.parametrize("model_type", ["LLAMA4", "llama2", "GEMMA"])
def test_unknown_model_type_is_refused(model_type):
    with pytest.raises(ValueError, match=f"model_type={model_type!r}") as error:
        HFKeyMap(model_type, _config())
    for allowed in HF_MODEL_TYPES:
        assert allowed in str(error.value)


@pytest.mark.parametrize(
    "model_type, hf_type, fitting",
    [
        ("QWEN2", "llama", "LLAMA2 or LLAMA3 or LLAMA3_2"),
        ("LLAMA2", "qwen2", "QWEN2"),
        ("LLAMA3", "mistral", "MISTRAL"),
    ],
)
def test_a_model_type_the_config_contradicts_is_refused(model_type, hf_type, fitting):
    with pytest.raises(ValueError) as error:
        HFKeyMap(model_type, _config(model_type=hf_type))
    message = str(error.value)
    assert f"checkpointer.model_type={model_type!r}" in message and repr(hf_type) in message
    assert message.endswith(f"set checkpointer.model_type to {fitting}")


@pytest.mark.parametrize("hf_type", ["llama", None, "some_future_llama"])
def test_a_fitting_absent_or_unmapped_config_model_type_passes(hf_type):
    extra = {} if hf_type is None else {"model_type": hf_type}
    HFKeyMap("LLAMA2", _config(**extra))
