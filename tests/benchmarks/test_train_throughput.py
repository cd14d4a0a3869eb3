import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import train_throughput  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared" / "models" / "tinystories656K"


def test_every_method_trains_and_is_reported(tmp_path):
    out = tmp_path / "train.json"
    report = train_throughput.main(
        ["--shape", "tiny", "--repeats", "1", "--no-memory", "--json", str(out),
         "--markdown", str(tmp_path / "train.md")]
    )
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == set(train_throughput.METHODS)
    for method, numbers in report["results"].items():
        assert numbers["tokens_per_s"] > 0
        assert numbers["trainable_params"] > 0
        # a step that did nothing would leave the loss at its initial value and finite
        assert torch.isfinite(torch.tensor(numbers["final_loss"]))
    assert "| qalora_fp32 |" in (tmp_path / "train.md").read_text()
    assert set(saved["breakdown"]) == set(train_throughput.METHODS)
    for method, breakdown in saved["breakdown"].items():
        parts = sum(breakdown[c] for c in train_throughput.BREAKDOWN_CATEGORIES)
        # every operator's own time once: the parts add up to (nearly) the whole step
        assert 0.5 * breakdown["step"] < parts <= 1.01 * breakdown["step"], method
    assert saved["breakdown"]["lora_fp32"]["base: chunk dequantization"] == 0
    assert saved["breakdown"]["qalora_fp32"]["pooled adapter"] > 0
    assert "| ms in one profiled step |" in (tmp_path / "train.md").read_text()


def test_the_chunked_methods_switch_the_native_gemm_off_during_their_steps(monkeypatch, tmp_path):
    import qalora_tune.ops._cpu_int4_native as native

    seen = []
    original = native.available
    monkeypatch.setattr(native, "available", lambda: seen.append(original()) or seen[-1])
    monkeypatch.delenv(train_throughput.NATIVE_SWITCH, raising=False)
    report = train_throughput.main(
        ["--shape", "tiny", "--repeats", "1", "--no-memory", "--no-breakdown",
         "--methods", "qalora_chunked_fp32", "--json", str(tmp_path / "t.json")]
    )
    assert seen and not any(seen)  # asked only inside its steps, and always off there
    assert train_throughput.NATIVE_SWITCH not in __import__("os").environ
    assert report["results"]["qalora_chunked_fp32"]["tokens_per_s"] > 0


def test_the_1b_shape_has_llama_3_2_1b_widths_and_its_layer_count_on_cuda():
    args = train_throughput.parse_args(["--shape", "llama3_2_1b_layers", "--vocab", "64"])
    dims = train_throughput._shape_kwargs(args)
    assert (dims["embed_dim"], dims["intermediate_dim"], dims["num_heads"], dims["num_kv_heads"]) == (
        2048, 8192, 32, 8)
    assert dims["num_layers"] == 1  # on CPU one layer; on CUDA the real model's 16
    assert train_throughput.LAYERS_ON_CUDA["llama3_2_1b_layers"] == 16
    # every method builds on it, QLoRA's NF4 included (its scaler blocks fit k_proj's 2048 x 512)
    model = train_throughput.build("qlora_bf16", args, None)
    assert model.layers[0].attn.k_proj.weight.shape == (512, 2048)


def test_the_methods_train_the_same_adapter_targets():
    args = train_throughput.parse_args(["--shape", "tiny"])
    adapted = {}
    for method in train_throughput.METHODS:
        model = train_throughput.build(method, args, None)
        names = {n.rsplit(".lora_", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
        adapted[method] = {n.split(".")[-1] for n in names}
    assert len({frozenset(v) for v in adapted.values()}) == 1
    assert adapted["qalora_fp32"] == {"q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"}


def test_qalora_base_is_smaller_than_the_dense_base():
    args = train_throughput.parse_args(["--shape", "tiny"])
    sizes = {
        method: train_throughput.model_bytes(train_throughput.build(method, args, None))["frozen"]
        for method in ("qalora_fp32", "lora_fp32", "qlora_fp32")
    }
    assert sizes["qalora_fp32"] < sizes["lora_fp32"] / 3
    assert sizes["qlora_fp32"] < sizes["lora_fp32"] / 3


def test_base_bits_per_weight_counts_codes_scales_and_zeros():
    """4 bits of code plus a scale and a zero per group of 64; 8-bit scales save
    (b - 8) / 64 bits for b-bit scales, less a float32 pair per row."""
    args = train_throughput.parse_args(["--shape", "tiny"])
    bits = {
        method: train_throughput.frozen_linear_bits_per_weight(train_throughput.build(method, args, None))
        for method in ("qalora_fp32", "qalora_dq_fp32", "qalora_bf16", "qalora_dq_bf16", "lora_bf16")
    }
    assert bits["qalora_fp32"] == pytest.approx(4 + 64 / 64)
    assert bits["qalora_bf16"] == pytest.approx(4 + 32 / 64)
    assert bits["lora_bf16"] == pytest.approx(16)
    # tiny shape: in_dim 256 (attention, w1, w3) and 512 (w2), one float32 pair per row
    per_row = {"qalora_dq_fp32": 8 + 32, "qalora_dq_bf16": 8 + 16}
    for method, group_bits in per_row.items():
        assert 4 + group_bits / 64 < bits[method] < 4 + group_bits / 64 + 64 / 256


def test_cpu_peak_memory_runs_in_a_child_process():
    memory = train_throughput.measure_cpu_memory(
        ["qalora_fp32"], ["--shape", "tiny", "--repeats", "1", "--steps", "1", "--warmup", "0"]
    )
    numbers = memory["qalora_fp32"]
    assert numbers["rss_before_build_mib"] > 0
    assert numbers["train_peak_mib"] >= numbers["model_rss_mib"] - 1  # MiB rounding


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/models/tinystories656K")
def test_real_checkpoint_weights_reach_every_method():
    args = train_throughput.parse_args(["--shape", "tinystories656K"])
    state = train_throughput._full_precision_state(args)
    embeddings = state["tok_embeddings.weight"]
    assert "qlora_fp32" not in args.methods and "NF4" in args.skipped["qlora_fp32"]
    for method in ("qalora_fp32", "lora_fp32"):
        model = train_throughput.build(method, args, state)
        assert torch.equal(model.tok_embeddings.weight.float(), embeddings.float())
