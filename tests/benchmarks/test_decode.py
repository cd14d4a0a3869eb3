"""Smoke test of ``benchmarks/decode.py`` on its tiny random shape.

The benchmark runs end to end (every model, eager and compiled), and the model it times
as "QA-LoRA merged int4" computes what it should: the dequantized int4 base plus the
adapter's dense update, within bf16 rounding.
"""

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
from torchtune.training import set_default_dtype

from qalora_tune.checkpointing import load_merged
from qalora_tune.modules import QuantizedLinear
from qalora_tune.quantization.int4_weight import dequantize_int4

ROOT = Path(__file__).resolve().parents[2]
MODULE_NAME = "qalora_decode_benchmark"


def _load_benchmark():
    """Import benchmarks/decode.py under a name ``load_merged`` can import its builder by."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, ROOT / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


decode = _load_benchmark()


def test_main_reports_every_model_and_mode(tmp_path):
    start = time.perf_counter()
    json_path, md_path = tmp_path / "decode.json", tmp_path / "decode.md"
    argv = [
        "--shape", "tiny", "--repeats", "1", "--prompt-len", "16", "--new-tokens", "3",
        "--compile-backend", "aot_eager", "--threads", "1",
        "--json", str(json_path), "--markdown", str(md_path),
    ]
    # one thread: tiny ops on two threads stall for milliseconds when the cores are shared
    threads = torch.get_num_threads()
    try:
        returned = decode.main(argv)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start

    result = json.loads(json_path.read_text())
    assert result["settings"]["modes"] == list(decode.MODES)
    assert set(result["results"]) == set(decode.MODES)
    for mode in decode.MODES:
        for name in decode.MODELS:
            entry = result["results"][mode][name]
            assert "error" not in entry, (mode, name, entry.get("error"))
            assert entry["prefill_tokens_per_s"] > 0 and entry["decode_tokens_per_s"] > 0
            assert len(entry["decode_seconds_all"]) == 1
        for ratio in result["ratios"][mode].values():
            assert ratio is not None and ratio > 0
    for name in decode.MODELS:
        assert result["models"][name]["weight_bytes_per_token"] > 0
    int4_classes = result["models"]["qalora_int4_merged"]["weight_classes"]
    assert any("CpuInt4Tensor" in c for c in int4_classes)  # the CPU int4 kernel layout
    assert any("NF4Tensor" in c for c in result["models"]["qlora_nf4"]["weight_classes"])
    assert "_weight_int4pack_mm_for_cpu" in result["models"]["qalora_int4_merged"]["served_as"]
    eager_ops = " ".join(result["results"]["eager"]["qalora_int4_merged"]["top_ops_decode_step"])
    assert "qalora_tune::int4_linear" in eager_ops or "_weight_int4pack_mm_for_cpu" in eager_ops
    env = result["environment"]
    assert {"torch", "torchao", "torchtune", "cpu_model", "torch_threads", "command"} <= set(env)
    assert returned["settings"] == result["settings"]
    # same base weights and the same adapter function: the logits agree up to the base's
    # 4-bit quantization (int4 RTN or NF4); unrelated weights would give an error near 1.4
    for key in ("qalora_int4_merged_vs_lora_bf16_merged", "qlora_nf4_vs_lora_bf16_merged"):
        assert 0 < result["logits"][key] < 0.5, (key, result["logits"][key])
    assert "| compile |" in md_path.read_text()
    assert seconds < 60, f"the smoke run took {seconds:.0f}s"


def _dense_reference(shape, weights, qalora_model, with_adapter):
    """A bf16 torchtune decoder whose linears are the dequantized int4 base (plus the
    adapter's dense update ``(alpha / r) B A_dense`` when ``with_adapter``)."""
    state = {k: v.to(torch.bfloat16) for k, v in weights.base.items()}
    for name, module in qalora_model.named_modules():
        if isinstance(module, QuantizedLinear):
            weight = dequantize_int4(module.weight, torch.float32)
            if with_adapter and name in weights.adapters:
                weight = weight + decode.dense_update(*weights.adapters[name], shape)
            state[f"{name}.weight"] = weight.to(torch.bfloat16)
    with set_default_dtype(torch.bfloat16):
        model = shape.base_decoder()()
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_merged_int4_equals_dequantized_base_plus_adapter(tmp_path):
    shape = decode.make_shape("tiny")
    cpu = torch.device("cpu")
    weights = decode.make_weights(shape, cpu, seed=1, adapter_scale=0.3)
    qalora = decode.build_qalora(shape, weights, cpu, tmp_path)  # unmerged, adapters set
    reference = _dense_reference(shape, weights, qalora, with_adapter=True)
    no_adapter = _dense_reference(shape, weights, qalora, with_adapter=False)
    merged_dir = decode.export_merged(qalora, shape, tmp_path / "merged")
    merged = load_merged(merged_dir, dtype=torch.bfloat16)

    prompt = torch.randint(0, shape.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    ours = decode.prefill_logits(merged, prompt)
    expected = decode.prefill_logits(reference, prompt)
    without = decode.prefill_logits(no_adapter, prompt)

    error = decode.relative_error(ours, expected)
    adapter_effect = decode.relative_error(without, expected)
    assert math.isfinite(error)
    # bf16 rounding of activations, of the dense reference weights and of the merged zeros
    assert error < 2e-2, error
    # the check would fail if the adapter were left out of the served model
    assert adapter_effect > 10 * error, (adapter_effect, error)
    # and the served weights are int4, as exported
    assert any(isinstance(m, QuantizedLinear) for m in merged.modules())
