"""export_gguf end to end without llama.cpp: read the file back with the gguf package's
reader and dequantizer and compare with the merged weights; metadata, tokenizer, tied
embeddings, the CLI, atomic writes and one-line refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qalora_tune import export
from qalora_tune.export import MergedLinearWeight, export_gguf, iter_merged_weights
from qalora_tune.export._llama_hparams import rope_row_order
from qalora_tune.tiny import TINY_LLAMA_SIZES, TinyTokenizer
from qalora_tune.tiny.hf_checkpoint import hf_llama_config
from tests.export.merged_models import write_merged_tiny

gguf = pytest.importorskip("gguf", reason="needs the gguf package (pip install 'qalora-tune[gguf]')")
np = pytest.importorskip("numpy")

CLI = str(Path(sys.executable).with_name("qalora-tune"))
HEADS = TINY_LLAMA_SIZES["num_heads"]
KV_HEADS = TINY_LLAMA_SIZES["num_kv_heads"]


def _read_back(path):
    """GGUF tensor name -> (type name, float64 values (rows, cols)) and the metadata."""
    reader = gguf.GGUFReader(str(path))
    tensors = {
        t.name: (t.tensor_type.name, torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)))
        for t in reader.tensors
    }
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return tensors, fields


def _hf_rows(name, values):
    """Undo the q/k row order: llama.cpp rows back to Hugging Face rows."""
    heads = HEADS if ".attn_q." in name else KV_HEADS if ".attn_k." in name else None
    if heads is None:
        return values
    order = rope_row_order(values.shape[0], heads)
    restored = torch.empty_like(values)
    restored[order] = values
    return restored


def _fp16_bound(weight: MergedLinearWeight):
    """Per element: fp16 rounding of d = s and m = z - 8 s, plus fp32 evaluation."""
    gq = weight.quantized.as_int4()
    s = gq.scale.double()
    m = gq.zero.double() - 8 * s
    g = gq.group_size
    q = gq.qdata.double()
    ds = (s.half().double() - s).abs().repeat_interleave(g, 1)
    dm = (m.half().double() - m).abs().repeat_interleave(g, 1)
    magnitude = s.abs().repeat_interleave(g, 1) * q + m.abs().repeat_interleave(g, 1)
    return (ds * q + dm + 3 * 2.0**-24 * magnitude)[:, : weight.in_features]


NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
}
for _i in range(TINY_LLAMA_SIZES["num_layers"]):
    for _hf, _ours in (
        ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
    ):
        NAMES[f"model.layers.{_i}.{_hf}.weight"] = f"blk.{_i}.{_ours}.weight"


@pytest.mark.parametrize(
    "bits, group_size, quantized_type",
    [(4, 32, "Q4_1"), (4, 64, "Q4_1"), (3, 128, "Q4_1"), (2, 32, "Q4_1"), (8, 32, "F32"), (4, 16, "F32")],
)
def test_every_tensor_reads_back_as_the_merged_weight(tmp_path, bits, group_size, quantized_type):
    merged = tmp_path / "merged_int4"
    write_merged_tiny(merged, bits, group_size)
    report = export_gguf(merged, tmp_path / "model.gguf")
    tensors, fields = _read_back(tmp_path / "model.gguf")
    ours = dict(iter_merged_weights(merged))
    assert set(tensors) == {NAMES[k] for k in ours}
    worst = 0.0
    for key, value in ours.items():
        name = NAMES[key]
        kind, values = tensors[name]
        values = _hf_rows(name, values)
        entry = report["tensors"][name]
        assert entry["type"] == kind and entry["source"] == key
        if isinstance(value, MergedLinearWeight):
            assert kind == quantized_type, name
            exact = value.dequantize(torch.float64)
            bound = _fp16_bound(value) if kind == "Q4_1" else 2.0**-24 * exact.abs()
            assert ((values - exact).abs() <= bound).all(), name
            relative = ((values - exact).abs().max() / exact.abs().max()).item()
            assert entry["max_relative_error"] == pytest.approx(relative, rel=1e-6, abs=1e-12), name
            worst = max(worst, relative) if kind == "Q4_1" else worst
            if kind == "F32":
                assert "not Q4_1" in entry["reason"], name
        else:
            assert kind == "F32" and torch.equal(values, value.double()), name
    assert report["q4_1_max_relative_error"] == pytest.approx(worst, rel=1e-6)
    if quantized_type == "Q4_1":
        assert 0 < worst <= report["q4_1_relative_bound"]
        assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1
        assert report["tensor_counts"] == {"Q4_1": 15, "F32": 6}
    else:
        assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
        assert report["tensor_counts"] == {"F32": 21}
    assert report["file_bytes"] == (tmp_path / "model.gguf").stat().st_size
    assert report["bits_per_weight"] == pytest.approx(8 * report["file_bytes"] / report["parameters"])


def test_linear_type_f32_dequantizes_every_linear(tmp_path):
    merged = tmp_path / "merged_int4"
    write_merged_tiny(merged)
    report = export_gguf(merged, tmp_path / "model.gguf", linear_type="f32")
    tensors, fields = _read_back(tmp_path / "model.gguf")
    assert report["tensor_counts"] == {"F32": 21} and fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    for key, value in iter_merged_weights(merged):
        if isinstance(value, MergedLinearWeight):
            exact = value.dequantize(torch.float64)
            values = _hf_rows(NAMES[key], tensors[NAMES[key]][1])
            assert ((values - exact).abs() <= 2.0**-24 * exact.abs()).all(), key
    with pytest.raises(ValueError, match="linear_type='q8_0'"):
        export_gguf(merged, tmp_path / "other.gguf", linear_type="q8_0")


def test_metadata_and_tokenizer_of_the_tiny_model(tmp_path):
    merged = tmp_path / "merged_int4"
    write_merged_tiny(merged)
    export_gguf(merged, tmp_path / "model.gguf", name="tiny")
    _, fields = _read_back(tmp_path / "model.gguf")
    config = hf_llama_config(TINY_LLAMA_SIZES)
    expected = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.block_count": config["num_hidden_layers"],
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
        "llama.vocab_size": config["vocab_size"],
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(config["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    tokenizer = TinyTokenizer()
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[:3] == ["<pad>", "<bos>", "<eos>"] and len(tokens) == tokenizer.vocab_size
    assert [tokens[i] for i in tokenizer.encode("ab 12", add_bos=False, add_eos=False)] == ["a", "b", "\u2581", "1", "2"]
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]


def test_dense_f16_rounds_only_the_embedding(tmp_path):
    merged = tmp_path / "merged_int4"
    write_merged_tiny(merged)
    report = export_gguf(merged, tmp_path / "model.gguf", dense_type="f16")
    tensors, _ = _read_back(tmp_path / "model.gguf")
    embedding = dict(iter_merged_weights(merged))["model.embed_tokens.weight"].double()
    kind, values = tensors["token_embd.weight"]
    assert kind == "F16" and report["tensors"]["token_embd.weight"]["type"] == "F16"
    assert ((values - embedding).abs() <= 2.0**-11 * embedding.abs()).all()
    assert tensors["output_norm.weight"][0] == "F32"  # 1-D tensors stay F32
    assert tensors["output.weight"][0] == "Q4_1"  # the int4 output projection is int4 in GGUF too


def _dense_llama(directory: Path, tied: bool, keys=("lm_head.weight",)):
    """A plain (unquantized) safetensors llama with the embedding under ``keys``."""
    config = dict(hf_llama_config(TINY_LLAMA_SIZES), tie_word_embeddings=tied)
    vocab, dim, ff = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    weights = {k: torch.randn(vocab, dim) for k in keys}
    weights["model.norm.weight"] = torch.ones(dim)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (dim, dim)), ("self_attn.k_proj", (dim, dim)),
                            ("self_attn.v_proj", (dim, dim)), ("self_attn.o_proj", (dim, dim)),
                            ("mlp.gate_proj", (ff, dim)), ("mlp.up_proj", (ff, dim)), ("mlp.down_proj", (dim, ff))):
            weights[p + name + ".weight"] = torch.randn(*shape)
        weights[p + "input_layernorm.weight"] = torch.ones(dim)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(dim)
    directory.mkdir()
    save_file(weights, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    TinyTokenizer().save(str(directory))
    return weights


def test_a_tied_embedding_stored_only_as_lm_head_becomes_token_embd(tmp_path):
    """TinyStories-656K's layout, on which llama.cpp's own converter fails."""
    weights = _dense_llama(tmp_path / "tied", tied=True)
    export_gguf(tmp_path / "tied", tmp_path / "tied.gguf")
    tensors, _ = _read_back(tmp_path / "tied.gguf")
    assert "output.weight" not in tensors
    assert torch.equal(tensors["token_embd.weight"][1], weights["lm_head.weight"].double())
    # untied: both written; untied without lm_head: refused
    _dense_llama(tmp_path / "untied", tied=False, keys=("lm_head.weight", "model.embed_tokens.weight"))
    export_gguf(tmp_path / "untied", tmp_path / "untied.gguf")
    assert {"token_embd.weight", "output.weight"} <= set(_read_back(tmp_path / "untied.gguf")[0])
    _dense_llama(tmp_path / "headless", tied=False, keys=("model.embed_tokens.weight",))
    with pytest.raises(ValueError, match="lm_head.weight is missing; set tie_word_embeddings"):
        export_gguf(tmp_path / "headless", tmp_path / "headless.gguf")
    assert not (tmp_path / "headless.gguf").exists()


def test_refusals_are_one_line_and_leave_no_file(tmp_path, monkeypatch):
    merged = tmp_path / "merged_int4"
    write_merged_tiny(merged)
    out = tmp_path / "model.gguf"
    config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps(dict(config, rope_scaling={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(ValueError, match="RoPE scaling type 'yarn'"):
        export_gguf(merged, out)
    (merged / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dense_type='bf16'"):
        export_gguf(merged, out, dense_type="bf16")
    # a failure while writing tensors leaves neither the file nor a partial one
    monkeypatch.setattr(export.gguf, "pack_q4_1", _fail_on_third(export.gguf.pack_q4_1))
    with pytest.raises(OSError, match="No space left"):
        export_gguf(merged, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged_int4"]
    monkeypatch.undo()
    export_gguf(merged, out)
    with pytest.raises(FileExistsError, match="--force"):
        export_gguf(merged, out)
    before = out.stat().st_mtime_ns
    export_gguf(merged, out, overwrite=True, dense_type="f16")
    assert out.stat().st_mtime_ns >= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged_int4", "model.gguf"]
    (merged / "tiny_tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        export_gguf(merged, tmp_path / "other.gguf")


def _fail_on_third(function):
    calls = []

    def wrapper(weight):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return function(weight)

    return wrapper


def _cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_writes_reports_and_refuses_in_one_line(tmp_path):
    merged = tmp_path / "merged_int4"
    write_merged_tiny(merged)
    out = tmp_path / "model.gguf"
    result = _cli("export-gguf", str(merged), str(out), "--dense-type", "f16", "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {out}" in result.stdout and "15 Q4_1" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tensors"]["token_embd.weight"]["type"] == "F16"
    again = _cli("export-gguf", str(merged), str(out))
    assert again.returncode == 1
    line = again.stderr.strip().splitlines()[-1]
    assert line.startswith("qalora-tune: error: ") and "--force" in line and "Traceback" not in again.stderr
    assert _cli("export-gguf", str(merged), str(out), "--force").returncode == 0
    missing = _cli("export-gguf", str(tmp_path / "nowhere"), str(tmp_path / "x.gguf"))
    assert missing.returncode == 1 and "config.json not found" in missing.stderr.strip().splitlines()[-1]
