"""The merged int4 output end to end: train a few steps, then load ``merged_int4/`` with
``qalora_tune.load_merged`` and with transformers, merge offline with ``qalora_merge``
(and refuse mismatched adapters), and generate with ``qalora_generate``."""

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

import qalora_tune
from qalora_tune.checkpointing import (
    QALoRACheckpointer,
    clean_module_name,
    read_adapter,
)
from qalora_tune.data import text_file_dataset, text_tokenizer
from qalora_tune.models import qalora_tinystories656k
from qalora_tune.modules import QALoRALinear
from qalora_tune.recipe_utils import evaluate_lm, full_logits

ROOT = Path(__file__).resolve().parents[2]
SHARED = (ROOT / ".." / "shared").resolve()
TUNE = str(Path(sys.executable).with_name("tune"))
requires_shared = pytest.mark.skipif(
    not (SHARED / "models").is_dir(), reason="needs ../shared (real tiny checkpoints and data)"
)
MODEL = SHARED / "models" / "tinystories656K"
DATA = SHARED / "data" / "tinyshakespeare_train.txt"


def _tune(recipe, *args, cwd=ROOT, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [TUNE, "run", recipe, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def _overrides(output_dir, checkpoint_dir=MODEL):
    return [
        "--config", "tinystories656K_qalora",
        f"output_dir={output_dir}",
        f"checkpointer.checkpoint_dir={checkpoint_dir}",
        f"tokenizer.path={MODEL / 'tokenizer.json'}",
        f"dataset.path={DATA}",
        f"validation.dataset.path={DATA}",
        "validation.max_batches=2",
        "validation.full_precision_baseline=False",
        "batch_size=8",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tinystories656K QA-LoRA run of 6 steps; returns its output directory."""
    if not MODEL.is_dir():
        pytest.skip("needs ../shared (real tiny checkpoints and data)")
    out = tmp_path_factory.mktemp("tinystories656k") / "run"
    result = _tune("qalora_finetune", *_overrides(out), "max_steps_per_epoch=6")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _probe_and_heldout():
    tokenizer = text_tokenizer(str(MODEL / "tokenizer.json"), prepend_space=False)
    dataset = text_file_dataset(tokenizer, str(DATA), block_size=128, split="validation")
    collate = qalora_tune._compat.get_component_from_path("torchtune.data.padded_collate_sft")
    batch = partial(collate, padding_idx=tokenizer.pad_id, ignore_idx=-100)
    probe = batch([dataset[i] for i in range(8)])  # what the recipe measured the merge on
    heldout = [batch([dataset[i] for i in range(j, j + 8)]) for j in (8, 16)]
    return probe, heldout


def _unmerged_model(run: Path):
    """The QA-LoRA model at the end of training, rebuilt from the base and the adapter."""
    model = qalora_tinystories656k(
        ["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
        lora_rank=4, lora_alpha=8, group_size=32,
    )
    checkpointer = QALoRACheckpointer(str(MODEL), "LLAMA2", str(run))
    checkpointer.load_base(model)
    adapter, _ = read_adapter(run / "epoch_0" / "adapter", checkpointer.key_map)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QALoRALinear):
                name = clean_module_name(name)
                module.lora_a.weight.copy_(adapter[f"{name}.lora_a.weight"])
                module.lora_b.weight.copy_(adapter[f"{name}.lora_b.weight"])
    return model.eval()


def _tensors_and_metadata(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def _relative_errors(logits, reference):
    return (logits - reference).norm(dim=-1) / reference.norm(dim=-1)


@requires_shared
@torch.no_grad()
def test_every_loader_reproduces_the_unmerged_model_within_the_reported_bound(trained):
    merged_dir = trained / "epoch_0" / "merged_int4"
    report = json.loads((merged_dir / "merge_report.json").read_text())
    bound = report["max_relative_logit_error"]
    assert 0 < bound < 1e-4  # fp32 zeros: the merge rounds each zero once
    assert report["perplexity_relative_difference"] < 1e-5
    probe, heldout = _probe_and_heldout()
    unmerged = full_logits(_unmerged_model(trained)(probe["tokens"]))

    loaded = qalora_tune.load_merged(merged_dir)
    assert type(loaded.layers[0].attn.q_proj.weight).__name__ == "CpuInt4Tensor"
    assert report["format"] == "intx"  # auto on CPU: what stock torchao runs
    ours = full_logits(loaded(probe["tokens"]))
    # same kernels and dtype as the in-training merge; the intx file's fp32 zero point
    # (-z / s) rounds once more, far below the merge's own deviation
    assert _relative_errors(ours, unmerged).max().item() == pytest.approx(bound, rel=1e-2, abs=1e-6)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert type(hf.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    theirs = hf(probe["tokens"]).logits.float()
    # transformers' attention differs from torchtune's by fp32 rounding only
    assert _relative_errors(theirs, unmerged).max().item() <= bound + 1e-5

    class _HF(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return self.model(tokens).logits

    ppl_ours = evaluate_lm(loaded, heldout, torch.device("cpu"))["perplexity"]
    ppl_hf = evaluate_lm(_HF(hf), heldout, torch.device("cpu"))["perplexity"]
    assert ppl_hf == pytest.approx(ppl_ours, rel=1e-5)
    out = hf.generate(probe["tokens"][:1, :8], max_new_tokens=8, do_sample=False)
    assert out.shape[1] > 8


@requires_shared
def test_merged_file_size_is_about_four_bits_per_weight_plus_scales(trained):
    merged_dir = trained / "epoch_0" / "merged_int4"
    size = json.loads((merged_dir / "merge_report.json").read_text())["size"]
    # the intx file (auto on CPU): an int8 code per weight, an fp32 scale and zero point per
    # group of 32 -> 8 + 2 * 32 / 32 = 10 bits (merged_format=int4_plain: 4 + 2 = 6)
    assert size["bits_per_quantized_parameter"] == pytest.approx(10.0)
    # per layer: q and o 128x128, k and v 64x128 (4 KV heads of 16), three MLP 128x384
    assert size["quantized_parameters"] == 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 384)
    embeddings = 2048 * 128 * 4  # tied fp32 embeddings; norms and the header are small
    file_bytes = (merged_dir / "model.safetensors").stat().st_size
    assert 0 < file_bytes - size["quantized_bytes"] - embeddings < 32_000
    print(f"merged_int4: {size['bits_per_quantized_parameter']:.2f} bits per quantized weight")


@requires_shared
def test_offline_merge_equals_the_training_merge_and_refuses_mismatches(trained, tmp_path):
    adapter = trained / "epoch_0" / "adapter"
    merged = tmp_path / "offline"
    result = _tune(
        "qalora_merge", *_overrides(trained), f"adapter_dir={adapter}", f"merged_dir={merged}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    training = trained / "epoch_0" / "merged_int4" / "model.safetensors"
    offline, online = (_tensors_and_metadata(p) for p in (merged / "model.safetensors", training))
    assert offline[1] == online[1]  # same torchao metadata
    assert offline[0].keys() == online[0].keys()
    assert all(torch.equal(offline[0][k], online[0][k]) for k in online[0])  # bit for bit
    assert json.loads((merged / "merge_report.json").read_text())["adapter_dir"] == str(adapter)

    wrong_group = _tune(
        "qalora_merge", *_overrides(trained), f"adapter_dir={adapter}",
        f"merged_dir={tmp_path / 'g64'}", "model.group_size=64", "model.lora_rank=2",
    )
    assert wrong_group.returncode == 1
    line = wrong_group.stderr.strip().splitlines()[-1]
    assert line.startswith("qalora_merge: error:") and "group_size=32" in line
    assert "model.group_size" in line
    assert not (tmp_path / "g64").exists()

    other_base = tmp_path / "other_base"
    shutil.copytree(MODEL, other_base)
    config = json.loads((other_base / "config.json").read_text())
    (other_base / "config.json").write_text(json.dumps(dict(config, note="edited")))
    wrong_base = _tune(
        "qalora_merge", *_overrides(trained, checkpoint_dir=other_base),
        f"adapter_dir={adapter}", f"merged_dir={tmp_path / 'other'}",
    )
    assert wrong_base.returncode == 1
    line = wrong_base.stderr.strip().splitlines()[-1]
    assert "another base checkpoint" in line and "checkpointer.checkpoint_dir" in line

    missing = _tune("qalora_merge", *_overrides(trained))
    assert missing.returncode == 1 and "adapter_dir" in missing.stderr.strip().splitlines()[-1]


@requires_shared
def test_generate_recipe_writes_text_from_the_merged_model(trained):
    result = _tune(
        "qalora_generate", "--config", "tinystories656K_qalora_generate",
        f"output_dir={trained}", "max_new_tokens=16", "temperature=0.0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout.strip().splitlines()[-1]
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time") + 10
    assert "tokens/s" in result.stderr + result.stdout


def test_generate_recipe_missing_model_is_a_one_line_error(tmp_path):
    result = _tune(
        "qalora_generate", "--config", "tiny_qalora_generate", f"output_dir={tmp_path}",
        timeout=300,
    )
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("qalora_generate: error: ") and "qalora_finetune" in line
    assert f"merged_dir={tmp_path}/epoch_0/merged_int4 does not exist" in line


@requires_shared
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
    reason="needs a CUDA GPU with compute capability 8.0+ (tinygemm int4 kernel)",
)
@torch.no_grad()
def test_load_merged_and_transformers_on_cuda(trained):
    """The same merged_int4/ on a GPU in bf16 (tinygemm), against the CPU fp32 model."""
    from transformers import AutoModelForCausalLM

    merged_dir = trained / "epoch_0" / "merged_int4"
    probe, _ = _probe_and_heldout()
    reference = full_logits(qalora_tune.load_merged(merged_dir)(probe["tokens"]))
    tokens = probe["tokens"].cuda()
    ours = qalora_tune.load_merged(merged_dir, device="cuda", dtype=torch.bfloat16)
    assert type(ours.layers[0].attn.q_proj.weight).__name__ == "Int4TilePackedTo4dTensor"
    assert _relative_errors(full_logits(ours(tokens)).cpu(), reference).max() < 5e-2
    hf = AutoModelForCausalLM.from_pretrained(
        str(merged_dir), device_map="cuda", dtype=torch.bfloat16
    )
    theirs = hf(tokens).logits.float().cpu()
    assert _relative_errors(theirs, reference).max() < 5e-2
