"""A save killed with SIGKILL leaves the previous checkpoint intact and loadable, and no
directory that looks complete."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from qalora_tune.checkpointing import QALoRACheckpointer, load_merged, read_adapter
from qalora_tune.models import qalora_llama2

BUILDER = "qalora_tune.models.qalora_llama2"
SIZES = dict(
    vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
    max_seq_len=32, intermediate_dim=128,
)


def small_qalora_llama(lora_attn_modules, apply_lora_to_mlp=False, **kwargs):
    """The model the subprocess trains (a registered builder, so ``load_merged`` takes it)."""
    return qalora_llama2(lora_attn_modules, apply_lora_to_mlp, **SIZES, **kwargs)

ROOT = Path(__file__).resolve().parents[2]

# Runs in a subprocess: builds a small QA-LoRA model, saves epoch_0 (adapter, merged_int4,
# recipe state); with HANG set, saves again (epoch given by argv) but stops inside the
# merged-model write, after the adapter is written, until it is killed.
SCRIPT = r'''
import json, sys, time
from pathlib import Path

import torch

import qalora_tune.checkpointing._checkpointer as checkpointer_module
from qalora_tune.checkpointing import QALoRACheckpointer
from qalora_tune.modules import QALoRALinear
from tests.checkpointing.test_interrupted_save import BUILDER, SIZES, small_qalora_llama

root, epoch, hang, seed = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "hang", int(sys.argv[4])
base = root / "base"
base.mkdir(exist_ok=True)
(base / "config.json").write_text(json.dumps(
    {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}))
torch.manual_seed(seed)
model = small_qalora_llama(["q_proj", "v_proj"], True, lora_rank=2, lora_alpha=4, group_size=32)
layers = {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
for layer in layers.values():
    torch.nn.init.normal_(layer.lora_b.weight, std=0.1)
    layer.merge()
with torch.no_grad():
    torch.save(model(torch.arange(16)[None]), root / f"merged_logits_{seed}.pt")
metadata = {
    "rank": 2, "alpha": 4, "group_size": 32, "bits": 4, "lora_dropout": 0.0,
    "model": {"_component_": BUILDER, "lora_attn_modules": [], "group_size": 32, **SIZES},
}
if hang:
    original = checkpointer_module.write_merged_int4
    def slow_write(*args, **kwargs):
        stats = original(*args, **kwargs)
        (root / "inside_save").touch()
        time.sleep(120)
        return stats
    checkpointer_module.write_merged_int4 = slow_write
checkpointer = QALoRACheckpointer(str(base), "LLAMA2", str(root / "out"))
checkpointer.save_checkpoint(
    epoch, layers, metadata, {"step": seed}, merged_model=model, merged_format="int4_plain"
)  # the lossless format: the reloaded logits are bit for bit
print("saved", flush=True)
'''


def _run(root: Path, epoch: int, hang: bool, seed: int):
    command = [sys.executable, "-c", SCRIPT, str(root), str(epoch), "hang" if hang else "ok", str(seed)]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _kill_inside_save(root: Path, epoch: int, seed: int) -> None:
    marker = root / "inside_save"
    marker.unlink(missing_ok=True)
    process = _run(root, epoch, hang=True, seed=seed)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the save never reached the merged-model write"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def _snapshot(directory: Path):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_killed_save_keeps_the_previous_checkpoint(tmp_path):
    first = _run(tmp_path, epoch=0, hang=False, seed=0)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    out = tmp_path / "out"
    before = _snapshot(out / "epoch_0")
    assert {"adapter/adapter_model.safetensors", "merged_int4/model.safetensors",
            "recipe_state.pt"} <= set(before)

    # a new epoch killed half way: it does not appear, epoch_0 stays the latest
    _kill_inside_save(tmp_path, epoch=1, seed=1)
    assert not (out / "epoch_1").exists()
    checkpointer = QALoRACheckpointer(str(tmp_path / "base"), "LLAMA2", str(out))
    assert checkpointer.latest_epoch_dir() == out / "epoch_0"

    # overwriting epoch_0 killed half way: the old epoch_0 is untouched, byte for byte
    _kill_inside_save(tmp_path, epoch=0, seed=2)
    assert _snapshot(out / "epoch_0") == before
    leftovers = [p.name for p in out.iterdir() if p.name != "epoch_0"]
    assert leftovers and all(name.startswith(".epoch_") for name in leftovers)  # hidden staging

    # and it is still usable
    adapter, _ = read_adapter(out / "epoch_0" / "adapter", checkpointer.key_map)
    assert len(adapter) == 2 * 2 * 5  # q, v, w1, w2, w3 in 2 layers, A and B each
    loaded = load_merged(out / "epoch_0" / "merged_int4")
    with torch.no_grad():
        logits = loaded(torch.arange(16)[None])
    assert torch.equal(logits, torch.load(tmp_path / "merged_logits_0.pt"))
