"""config.json -> llama.cpp hyperparameters, the RoPE row order for q/k, and Llama 3 RoPE
scaling checked against transformers."""

import pytest
import torch

from qalora_tune.export._llama_hparams import (
    llama3_rope_factors,
    llama_hparams,
    rope_row_order,
)
from qalora_tune.tiny import TINY_LLAMA_SIZES
from qalora_tune.tiny.hf_checkpoint import hf_llama_config
from tests.reference import seed_each_test  # noqa: F401


def _rope_half(x, theta=10000.0):
    """Hugging Face RoPE: rotate the first half of each head against the second half."""
    positions, head_dim = x.shape[0], x.shape[-1]
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = torch.arange(positions, dtype=torch.float64)[:, None] * inv  # (T, h/2)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    a, b = x[..., : head_dim // 2], x[..., head_dim // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def _rope_pairs(x, theta=10000.0):
    """llama.cpp's llama RoPE (ggml "normal" mode): rotate adjacent pairs (2i, 2i + 1)."""
    positions, head_dim = x.shape[0], x.shape[-1]
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = torch.arange(positions, dtype=torch.float64)[:, None] * inv
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


@pytest.mark.parametrize("heads, head_dim", [(4, 8), (2, 16), (8, 2)])
def test_permuted_rows_under_pairwise_rope_give_the_same_attention_scores(heads, head_dim):
    """q = W x rotated the Hugging Face way equals q = W[order] x rotated pairwise, up to the
    same order within each head: attention scores q . k are unchanged."""
    dim, positions = 24, 7
    wq = torch.randn(heads * head_dim, dim, dtype=torch.float64)
    wk = torch.randn(heads * head_dim, dim, dtype=torch.float64)
    x = torch.randn(positions, dim, dtype=torch.float64)
    order = rope_row_order(heads * head_dim, heads)
    assert sorted(order.tolist()) == list(range(heads * head_dim))

    def scores(q, k):
        return torch.einsum("thd,shd->hts", q, k)

    split = lambda y: y.reshape(positions, heads, head_dim)  # noqa: E731
    hf = scores(_rope_half(split(x @ wq.t())), _rope_half(split(x @ wk.t())))
    ours = scores(_rope_pairs(split(x @ wq[order].t())), _rope_pairs(split(x @ wk[order].t())))
    assert torch.allclose(ours, hf, rtol=1e-10, atol=1e-10)
    # rows themselves: pairwise rope of the permuted q is the permuted HF-rope q
    q_hf = _rope_half(split(x @ wq.t())).reshape(positions, -1)
    q_ours = _rope_pairs(split(x @ wq[order].t())).reshape(positions, -1)
    assert torch.allclose(q_ours, q_hf[:, order], rtol=1e-10, atol=1e-10)


def test_rope_row_order_refuses_odd_head_sizes():
    with pytest.raises(ValueError, match="heads of an even size"):
        rope_row_order(12, 4)


@pytest.mark.parametrize("factor, low, high, original", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (4.0, 2.0, 8.0, 1024)])
def test_llama3_rope_factors_match_transformers(factor, low, high, original):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=rope,
                         max_position_embeddings=131072)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 500000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    divisors = torch.tensor(llama3_rope_factors(64, 500000.0, factor, low, high, original), dtype=torch.float64)
    assert divisors.min() == 1.0 and divisors.max() == factor  # both ends of the band occur
    assert torch.allclose(plain / divisors, inv_freq.double(), rtol=1e-6)
    hp = llama_hparams(dict(config.to_dict(), model_type="llama", intermediate_size=8192, num_hidden_layers=2, vocab_size=10))
    assert hp.rope_scaling == "llama3" and hp.rope_freq_factors == divisors.tolist()
    assert hp.rope_theta == 500000.0 and hp.head_dim == 64


def test_tiny_config_and_both_rope_layouts():
    config = hf_llama_config(TINY_LLAMA_SIZES)
    hp = llama_hparams(config)
    assert (hp.n_layers, hp.n_embd, hp.n_ff, hp.n_head, hp.n_head_kv, hp.head_dim) == (2, 128, 256, 4, 4, 32)
    assert hp.n_vocab == TINY_LLAMA_SIZES["vocab_size"] and hp.rope_scaling == "none"
    v5 = dict(config, rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
    v5.pop("rope_theta")
    assert llama_hparams(v5).rope_theta == 1234.0
    linear = dict(config, rope_scaling={"type": "linear", "factor": 2.0})
    assert (llama_hparams(linear).rope_scaling, llama_hparams(linear).rope_factor) == ("linear", 2.0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "qwen2"}, "model_type 'qwen2'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling type 'yarn'"),
        ({"model_type": "mistral", "sliding_window": 16}, "sliding_window=16"),
    ],
)
def test_configs_llama_cpp_would_run_differently_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        llama_hparams(dict(hf_llama_config(TINY_LLAMA_SIZES), **change))
