"""Integration tests: ``tune run qalora_finetune`` in a subprocess, on tiny real models."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SHARED = (ROOT / ".." / "shared").resolve()
TUNE = str(Path(sys.executable).with_name("tune"))
requires_shared = pytest.mark.skipif(
    not (SHARED / "models").is_dir(), reason="needs ../shared (real tiny checkpoints and data)"
)


def _tune_run(*args, cwd=ROOT, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [TUNE, "run", "qalora_finetune", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _logged_losses(output_dir: Path):
    text = "".join(p.read_text() for p in sorted((output_dir / "logs").glob("*.txt")))
    return [float(v) for v in re.findall(r"\bloss:([-0-9.e+]+)", text)]


def _shared_overrides(name, tokenizer_file, output_dir):
    data = SHARED / "data" / "tinyshakespeare_train.txt"
    return [
        f"output_dir={output_dir}",
        f"checkpointer.checkpoint_dir={SHARED / 'models' / name}",
        f"tokenizer.path={SHARED / 'models' / name / tokenizer_file}",
        f"dataset.path={data}",
        f"validation.dataset.path={data}",
        "validation.max_batches=2",
        "batch_size=8",
        "log_every_n_steps=1",
    ]


@requires_shared
def test_stories260k_trains_saves_and_applies_overrides(tmp_path):
    out = tmp_path / "run"
    result = _tune_run(
        "--config", "stories260K_qalora",
        *_shared_overrides("stories260K", "tokenizer.model", out),
        "max_steps_per_epoch=12", "model.lora_rank=1", "model.lora_alpha=2",
        cwd=tmp_path,  # packaged config name resolves from any directory
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _logged_losses(out)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    adapter = out / "epoch_0" / "adapter"
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    ours = config["qalora_tune"]
    assert ours["rank"] == 1 and ours["alpha"] == 2 and ours["group_size"] == 32
    assert ours["pad_in_dim"] is True and ours["pooling"] == "sum"
    assert config["peft_type"] == "LORA" and config["use_qalora"] and config["r"] == 1
    # w2's input (172) is padded to 192 = 6 groups of 32 (PEFT key names)
    prefix = "base_model.model.model.layers.0"
    assert weights[f"{prefix}.mlp.down_proj.lora_A.weight"].shape == (1, 6)
    assert weights[f"{prefix}.self_attn.q_proj.lora_A.weight"].shape == (1, 2)
    assert len(weights) == 2 * 7 * 5  # 7 adapted linears in each of 5 layers
    assert (out / "epoch_0" / "recipe_state.pt").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {
        "full-precision base", "int4 base", "QA-LoRA", "QA-LoRA merged int4"
    }
    assert "QA-LoRA summary" in result.stdout
    # the padded w2 leaves as (N, 172) int4 with a partial last group; the merge is exact
    report = json.loads((out / "epoch_0" / "merged_int4" / "merge_report.json").read_text())
    assert report["max_relative_logit_error"] < 1e-4
    merged_loss = summary["metrics"]["QA-LoRA merged int4"]["loss"]
    assert merged_loss == pytest.approx(summary["metrics"]["QA-LoRA"]["loss"], rel=1e-4)


@requires_shared
def test_tinystories656k_saves_every_epoch_and_resumes(tmp_path):
    out = tmp_path / "run"
    common = [
        "--config", "tinystories656K_qalora",
        *_shared_overrides("tinystories656K", "tokenizer.json", out),
        "max_steps_per_epoch=4",
        "validation.full_precision_baseline=False",
    ]
    first = _tune_run(*common, "epochs=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "epoch_0" / "adapter").is_dir() and (out / "epoch_1" / "adapter").is_dir()
    state = __import__("torch").load(out / "epoch_1" / "recipe_state.pt", weights_only=False)
    assert state["epochs_run"] == 2 and state["global_step"] == 8

    resumed = _tune_run(*common, "epochs=3", "resume_from_checkpoint=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout + resumed.stderr
    state = __import__("torch").load(out / "epoch_2" / "recipe_state.pt", weights_only=False)
    assert state["epochs_run"] == 3 and state["global_step"] == 12
    before = load_file(str(out / "epoch_1" / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(out / "epoch_2" / "adapter" / "adapter_model.safetensors"))
    assert (out / "epoch_2" / "merged_int4" / "model.safetensors").is_file()
    assert any(not before[k].equal(after[k]) for k in before)  # training went on


def test_a_mean_pooled_checkpoint_resumes_in_mean_pooling(tmp_path):
    """A checkpoint written before sum pooling (its adapter metadata says "mean") resumes
    with its layers in mean pooling, and the next epoch's adapter says so (with PEFT's
    alpha_pattern of a mean-pooled adapter, alpha / n_groups)."""
    out = tmp_path / "run"
    common = [
        "--config", "tiny_qalora", f"output_dir={out}", "max_steps_per_epoch=3",
        "prepare_base.steps=5", "prepare_base.batch_size=8", "prepare_base.num_validation=8",
        "dataset.num_examples=200", "validation.dataset.num_examples=50", "save_merged_int4=False",
        "validation.full_precision_baseline=False",
    ]
    first = _tune_run(*common, "epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    config_path = out / "epoch_0" / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["qalora_tune"]["pooling"] == "sum"
    assert config["lora_alpha"] == 16.0 * 32 / 4  # alpha * G / n_groups (128 inputs)
    config["qalora_tune"]["pooling"] = "mean"
    config_path.write_text(json.dumps(config))

    resumed = _tune_run(*common, "epochs=2", "resume_from_checkpoint=True", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "was trained with mean pooling: resuming it so" in resumed.stdout + resumed.stderr
    config = json.loads((out / "epoch_1" / "adapter" / "adapter_config.json").read_text())
    assert config["qalora_tune"]["pooling"] == "mean"
    assert config["lora_alpha"] == 16.0 / 4


def test_config_path_is_accepted_and_unknown_names_fail_in_one_line(tmp_path):
    result = _tune_run("--config", "no_such_config", cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qalora_finetune: error: --config 'no_such_config'")
    assert "llama2_7B_qalora" in last


def test_missing_weights_print_the_download_command(tmp_path):
    config = ROOT / "configs" / "llama2_7B_qalora.yaml"
    result = _tune_run(
        "--config", str(config), "device=cpu", "dtype=fp32",
        f"checkpointer.checkpoint_dir={tmp_path / 'Llama-2-7b-hf'}",
        f"output_dir={tmp_path / 'out'}", cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    expected = f"tune download meta-llama/Llama-2-7b-hf --output-dir {tmp_path / 'Llama-2-7b-hf'}"
    assert expected in last and "--hf-token" in last
    assert not (tmp_path / "out" / "epoch_0").exists()


def test_tiny_qalora_default_runs_offline_and_recovers_the_int4_base(tmp_path):
    """The README's main command, as shipped (no ../shared, nothing downloaded)."""
    out = tmp_path / "tiny"
    result = _tune_run("--config", "tiny_qalora", f"output_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "QA-LoRA summary" in result.stdout
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    fp, int4, qalora = (metrics[k] for k in ("full-precision base", "int4 base", "QA-LoRA"))
    assert fp["accuracy"] > 0.9  # the base is good at its task
    # int4 measurably hurts it (loss +29% here), and QA-LoRA recovers at least half the gap
    # (measured: below the fp32 base); exact match moves too little to assert across CPUs
    assert int4["loss"] > 1.15 * fp["loss"]
    assert qalora["loss"] < int4["loss"] - 0.5 * (int4["loss"] - fp["loss"])
    assert (out / "base" / "model.safetensors").is_file()
    assert (out / "epoch_0" / "adapter" / "adapter_model.safetensors").is_file()
    # the merged int4 model scores what the unmerged adapters scored
    merged = metrics["QA-LoRA merged int4"]
    assert merged["loss"] == pytest.approx(qalora["loss"], rel=1e-3)
    assert abs(merged["exact_match"] - qalora["exact_match"]) < 1e-3
    assert "merged int4:" in result.stdout
    # torchtune generation from merged_int4/ answers from the glossary (greedy decoding)
    generated = subprocess.run(
        [TUNE, "run", "qalora_generate", "--config", "tiny_qalora_generate", f"output_dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    lines = generated.stdout.strip().splitlines()[-2:]
    assert lines == ["vtu mfp gty=402 596 802", "kau lij qus=140 259 922"]
    # training loss starts near 1e-3 and is noisy; the validation loss above is the check
    assert len(_logged_losses(out)) == 250 // 25


@requires_shared
def test_bf16_checkpointing_accumulation_clipping_and_torchao_optimizer(tmp_path):
    out = tmp_path / "run"
    result = _tune_run(
        "--config", "stories260K_qalora",
        *_shared_overrides("stories260K", "tokenizer.model", out),
        "dtype=bf16", "enable_activation_checkpointing=True", "gradient_accumulation_steps=2",
        "max_steps_per_epoch=3", "batch_size=4", "clip_grad_norm=1.0",
        "optimizer._component_=torchao.optim.AdamW8bit",
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
        "log_peak_memory_stats=True",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = "".join(p.read_text() for p in (out / "logs").glob("*.txt"))
    assert len(_logged_losses(out)) == 3 and "grad_norm:" in log
    # on CPU the peak memory is the process's RSS, logged each step and for the save
    peaks = [float(v) for v in re.findall(r"peak_rss_gib:([\d.]+)", log)]
    assert len(peaks) == 3 and all(0.1 < peak < 16 for peak in peaks)
    assert "Memory: RSS" in result.stderr and "peak RSS of the merge and export" in result.stderr
    weights = load_file(str(out / "epoch_0" / "adapter" / "adapter_model.safetensors"))
    assert all(w.dtype == __import__("torch").bfloat16 for w in weights.values())
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
    # bf16 scales and zeros: 4 + 2 * 16 / 32 = 5 bits per weight, plus stories260K's
    # partial last group of w2 (172 columns, 6 groups)
    report = json.loads((out / "epoch_0" / "merged_int4" / "merge_report.json").read_text())
    assert 5.0 <= report["size"]["bits_per_quantized_parameter"] < 5.2


@requires_shared
def test_compile_runs_the_recipe(tmp_path):
    out = tmp_path / "run"
    result = _tune_run(
        "--config", "tinystories656K_qalora",
        *_shared_overrides("tinystories656K", "tokenizer.json", out),
        "compile=True", "max_steps_per_epoch=2", "batch_size=4",
        "validation.full_precision_baseline=False",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_logged_losses(out)) == 2


@requires_shared
@pytest.mark.parametrize("bits", [2, 3])
def test_narrow_bit_widths_train_merge_and_load(tmp_path, bits):
    import torch

    import qalora_tune

    out = tmp_path / "run"
    result = _tune_run(
        "--config", "tinystories656K_qalora",
        *_shared_overrides("tinystories656K", "tokenizer.json", out),
        "max_steps_per_epoch=4", "validation.full_precision_baseline=False", f"model.bits={bits}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = json.loads((out / "epoch_0" / "adapter" / "adapter_config.json").read_text())
    assert adapter["qalora_tune"]["bits"] == bits
    merged = out / "epoch_0" / "merged_int4"
    assert json.loads((merged / "merge_report.json").read_text())["max_relative_logit_error"] < 1e-4
    model = qalora_tune.load_merged(merged, device="cpu", dtype=torch.float32)
    layer = model.layers[0].attn.q_proj
    assert layer.bits == bits
    # a b-bit grid stored as int4 codes: each group uses at most 2**bits of the 16 codes
    codes = layer.weight.to_quantized().qdata
    per_group = codes.view(codes.shape[0], -1, layer.group_size)
    assert int((per_group.amax(-1) - per_group.amin(-1)).max()) <= 2**bits - 1
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    assert summary["QA-LoRA merged int4"]["loss"] == pytest.approx(
        summary["QA-LoRA"]["loss"], rel=1e-4
    )


@requires_shared
@pytest.mark.parametrize("bits, group_size", [(8, 32), (4, 8)])
def test_intx_bases_train_merge_and_load_in_transformers(tmp_path, bits, group_size):
    """8-bit bases and group sizes without an int4 kernel run on the dequantizing intx
    base end to end: training, the exact merge, and both loaders of merged_int4/."""
    import torch
    from transformers import AutoModelForCausalLM

    import qalora_tune
    from qalora_tune._compat import IntxUnpackedToInt8Tensor

    out = tmp_path / "run"
    result = _tune_run(
        "--config", "tinystories656K_qalora",
        *_shared_overrides("tinystories656K", "tokenizer.json", out),
        "max_steps_per_epoch=4", "validation.full_precision_baseline=False",
        f"model.bits={bits}", f"model.group_size={group_size}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = out / "epoch_0" / "merged_int4"
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["max_relative_logit_error"] < 1e-4
    # int8 codes plus fp32 scale and zero point per group
    assert report["size"]["bits_per_quantized_parameter"] == pytest.approx(8 + 64 / group_size)
    quant_type = json.loads((merged / "config.json").read_text())["quantization_config"]
    assert quant_type["quant_type"]["default"]["_type"] == "IntxWeightOnlyConfig"
    ours = qalora_tune.load_merged(merged, device="cpu", dtype=torch.float32)
    layer = ours.layers[0].attn.q_proj
    assert (layer.bits, layer.group_size) == (bits, group_size)
    assert isinstance(layer.weight, IntxUnpackedToInt8Tensor)  # this package's subclass of it
    hf = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert type(hf.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    tokens = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, theirs = ours(tokens), hf(tokens).logits
    assert ((theirs - reference).norm() / reference.norm()).item() < 1e-5
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    assert summary["QA-LoRA merged int4"]["loss"] == pytest.approx(
        summary["QA-LoRA"]["loss"], rel=1e-4
    )


@requires_shared
def test_eight_bit_scales_train_merge_and_export_a_plain_int4_model(tmp_path):
    """model.double_quant_scales=True: the base reports fewer bits per weight, the merge is
    exact, the adapter records the setting, merged_int4/ loads as a plain int4 model, and
    resuming with dense scales is refused."""
    import torch

    import qalora_tune
    from qalora_tune._compat import Int4OpaqueTensor

    def run(out, *extra):
        return _tune_run(
            "--config", "tinystories656K_qalora",
            *_shared_overrides("tinystories656K", "tokenizer.json", out),
            "max_steps_per_epoch=4", "validation.full_precision_baseline=False", *extra,
        )

    def reported_bits(result):
        assert result.returncode == 0, result.stderr[-3000:]
        line = re.search(r"the base stores ([0-9.]+) bits per linear weight", result.stdout + result.stderr)
        assert line, "no 'bits per linear weight' in the log"
        return float(line.group(1))

    out = tmp_path / "dq"
    dq_bits = reported_bits(run(out, "model.double_quant_scales=True"))
    # dense fp32 scales and zeros at the config's G=32 store 4 + 64/32 = 6.0 bits (see
    # test_base_bits_per_weight_follows_the_storage_formula); 8-bit scales save 24 bits per
    # group, less a float32 pair per row (in_dim 128 or 384). (At G=64 the pair per
    # 128-wide row would cost more than its 2 groups save.)
    assert 4 + 40 / 32 + 64 / 384 - 1e-3 <= dq_bits <= 4 + 40 / 32 + 64 / 128 + 1e-3
    assert dq_bits < 6.0
    merged = out / "epoch_0" / "merged_int4"
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["max_relative_logit_error"] < 1e-4
    adapter_config = json.loads((out / "epoch_0" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["qalora_tune"]["double_quant_scales"] is True
    model = qalora_tune.load_merged(merged, device="cpu", dtype=torch.float32)
    assert isinstance(model.layers[0].attn.q_proj.weight, Int4OpaqueTensor)
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    assert summary["QA-LoRA merged int4"]["loss"] == pytest.approx(
        summary["QA-LoRA"]["loss"], rel=1e-4
    )
    result = run(out, "resume_from_checkpoint=True")
    assert result.returncode != 0
    assert "model.double_quant_scales" in result.stderr.strip().splitlines()[-1]
