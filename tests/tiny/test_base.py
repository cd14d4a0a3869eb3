import json
import os

import pytest
import torch
from torch import nn

import qalora_tune.tiny.base as base_module
from qalora_tune.modules import QALoRALinear
from qalora_tune.tiny import (
    TINY_LLAMA_SIZES,
    TinyTokenizer,
    build_tiny_base,
    is_complete_tiny_base,
    load_tiny_base,
    prepare_tiny_base,
    to_qalora_,
)


def test_sizes_fit_group_size_32():
    assert TINY_LLAMA_SIZES["vocab_size"] == TinyTokenizer().vocab_size
    model = build_tiny_base()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 7 * TINY_LLAMA_SIZES["num_layers"] + 1
    for linear in linears:
        assert linear.in_features % 32 == 0 and linear.in_features // 32 >= 4
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()


def test_checkpoint_is_complete_and_reused(tiny_base_dir, monkeypatch):
    assert is_complete_tiny_base(tiny_base_dir)
    names = set(os.listdir(tiny_base_dir))
    assert {"config.json", "model.safetensors", "tiny_tokenizer.json", "base_metrics.json"} <= names
    metrics = json.load(open(os.path.join(tiny_base_dir, "base_metrics.json")))
    for key in ("fp32", "int4_rtn_g32"):
        assert set(metrics[key]) >= {"loss", "accuracy"}
    assert metrics["generation"]["steps"] == 3 and metrics["generation"]["seed"] == 0
    config = json.load(open(os.path.join(tiny_base_dir, "config.json")))
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is False
    assert config["hidden_size"] == TINY_LLAMA_SIZES["embed_dim"]
    leftovers = [n for n in os.listdir(os.path.dirname(tiny_base_dir)) if n.startswith(".")]
    assert not leftovers

    def fail(*args, **kwargs):
        raise AssertionError("a finished base must be reused, not retrained")

    monkeypatch.setattr(base_module, "pretrain", fail)
    assert prepare_tiny_base(tiny_base_dir, log=None) == tiny_base_dir


def test_failure_leaves_no_complete_looking_dir(tmp_path, monkeypatch):
    target = tmp_path / "base"

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(base_module, "save_hf_checkpoint", broken_save)
    with pytest.raises(OSError, match="disk full"):
        prepare_tiny_base(str(target), steps=1, batch_size=2, num_validation=2, log=None)
    assert not target.exists() and os.listdir(tmp_path) == []


def test_refuses_a_foreign_non_empty_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a finished tiny base"):
        prepare_tiny_base(str(tmp_path), steps=1, log=None)
    with pytest.raises(ValueError, match="not a finished tiny base"):
        load_tiny_base(str(tmp_path))


def test_hugging_face_load_gives_the_same_logits(tiny_base_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    assert hf.dtype == torch.float32
    ours = load_tiny_base(tiny_base_dir)
    tokens = torch.tensor([TinyTokenizer().encode("qzk bma tuf=417 203 998")] * 2)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)


def test_to_qalora_starts_at_the_int4_base_with_only_adapters_trainable(tiny_base_dir):
    model = to_qalora_(load_tiny_base(tiny_base_dir))
    layers = [m for m in model.modules() if isinstance(m, QALoRALinear)]
    assert len(layers) == 7 * TINY_LLAMA_SIZES["num_layers"] + 1
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert all(n.endswith(("lora_a", "lora_b")) for n in plain)  # only the adapters
    trainable = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_a", "lora_b"}
    assert all(torch.count_nonzero(m.lora_b.weight) == 0 for m in layers)


def test_wider_sizes_keep_the_shape_and_scale_the_width():
    from qalora_tune.tiny import tiny_llama_sizes

    assert tiny_llama_sizes(128) == TINY_LLAMA_SIZES
    wide = tiny_llama_sizes(512)
    assert (wide["embed_dim"], wide["num_heads"], wide["intermediate_dim"]) == (512, 16, 1024)
    assert wide["num_layers"] == TINY_LLAMA_SIZES["num_layers"]
    for bad in (0, 100, 128.0, True):
        with pytest.raises(ValueError, match="positive multiple of 32"):
            tiny_llama_sizes(bad)


def test_a_wider_base_is_made_loaded_and_not_confused_with_another_width(tmp_path):
    directory = str(tmp_path / "w64")
    prepare_tiny_base(directory, steps=2, batch_size=4, num_validation=4, log=None, embed_dim=64)
    model = load_tiny_base(directory)
    assert model.tok_embeddings.embedding_dim == 64
    config = json.load(open(os.path.join(directory, "config.json")))
    assert config["hidden_size"] == 64 and config["intermediate_size"] == 128
    assert prepare_tiny_base(directory, log=None, embed_dim=64) == directory  # reused
    with pytest.raises(ValueError, match="width 64, not 128"):
        prepare_tiny_base(directory, log=None)
