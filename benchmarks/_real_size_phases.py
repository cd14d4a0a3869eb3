"""The phases of ``benchmarks/real_size.py``: each a child process (the checkpoint
written, ``tune run`` of the recipes, the loaders), its wall time and peak RSS, and the
sizes of what it wrote."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import _real_shapes
from _real_size_bounds import check_bounds, model_bytes

ROOT = Path(__file__).resolve().parents[1]
# the entry script: its ``--child-write`` writes the checkpoint in a child process
SCRIPT = Path(__file__).resolve().with_name("real_size.py")
PHASES = ("write", "finetune", "merge", "load_merged", "transformers", "eval")

# a child that loads a merged model (one loader) and generates 4 tokens greedily
_LOADER_CHILD = r"""
import json, sys, time
import torch
import qalora_tune
from qalora_tune._memory import peak_rss_bytes, rss_bytes
loader, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
imports = rss_bytes()
start = time.perf_counter()
if loader == "transformers":
    from transformers import AutoModelForCausalLM
    imports = rss_bytes()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path)
else:
    model = qalora_tune.load_merged(path)
loaded = time.perf_counter()
after_load = rss_bytes()
tokens = torch.tensor([[1, 100, 200, 300, 400, 500, 600, 700]])
with torch.no_grad():
    if loader == "transformers":
        first = model(tokens).logits
        out = model.generate(tokens, max_new_tokens=4, do_sample=False)[0, tokens.shape[1]:]
    else:
        first = model(tokens)
        out = []
        for _ in range(4):
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            tokens = torch.cat([tokens, nxt], dim=1)
print(json.dumps({"rss_after_import_bytes": imports, "load_s": loaded - start,
                  "rss_after_load_bytes": after_load, "generate_s": time.perf_counter() - loaded,
                  "peak_rss_bytes": peak_rss_bytes(), "finite": bool(torch.isfinite(first).all()),
                  "generated": [int(t) for t in out]}))
"""


def tune_command() -> str:
    return str(Path(sys.executable).with_name("tune"))


def run_phase(name: str, command: Sequence[str], log_path: Path, env: Optional[Dict[str, str]] = None,
              cwd: Optional[Path] = None, timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run one phase as a child process; its wall time, peak RSS and output (in ``log_path``).

    Raises:
        RuntimeError: if it fails (the end of its log in the message).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                 env=env, cwd=cwd)
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.2)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    output = log_path.read_text(errors="replace")
    if child.returncode:
        raise RuntimeError(f"phase {name} failed ({child.returncode}): {' '.join(command)}\n{output[-4000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "output": output}


def _child_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("QALORA_TUNE_PROGRESS", None)
    return env


def finetune_overrides(shape: str, checkpoint_dir: Path, tokenizer: Dict[str, str], corpus: Path,
                       output_dir: Path, layers: Optional[int], seq_len: int, steps: int,
                       max_shard_size: str) -> List[str]:
    """The ``key=value`` overrides that point a shape's packaged config at a random
    checkpoint, its stand-in tokenizer and the synthetic text, for a short CPU run."""
    overrides = [
        "device=cpu", "dtype=bf16",
        f"checkpointer.checkpoint_dir={checkpoint_dir}",
        f"checkpointer.max_shard_size={max_shard_size}",
        *(f"tokenizer.{key}={value}" for key, value in tokenizer.items()),
        "dataset=qalora_tune.data.text_file_dataset", f"dataset.path={corpus}",
        f"dataset.block_size={seq_len}", "~dataset.packed",
        "batch_size=1", "gradient_accumulation_steps=1", "epochs=1",
        f"max_steps_per_epoch={steps}", "merge_probe_size=2", "log_peak_memory_stats=True",
        "seed=0", f"output_dir={output_dir}",
    ]
    if layers is not None:
        overrides.append(f"model.num_layers={layers}")
    return overrides


def parse_finetune_log(output: str, metrics_dir: Path) -> Dict[str, Any]:
    """Load+quantize time, throughput and peak from the recipe's log; the training peak
    (the last step's ``peak_rss_gib``) from its metric log."""
    found: Dict[str, Any] = {}
    load = re.search(r"Read and quantized ([\d.]+) GB from (\d+) file\(s\) in ([\d.]+)s "
                     r"\(([\d.]+) GB/s\); peak RSS ([\d.]+) GiB", output)
    if load:
        found.update(load_gb=float(load[1]), load_files=int(load[2]), load_s=float(load[3]),
                     load_gb_per_s=float(load[4]), load_peak_rss_bytes=float(load[5]) * 2**30)
    peaks = []
    for log in sorted(metrics_dir.glob("*.txt")):
        peaks += [float(v) for v in re.findall(r"peak_rss_gib:([\d.]+)", log.read_text())]
    if peaks:
        found["train_peak_rss_bytes"] = peaks[-1] * 2**30
    ready = re.search(r"Model ready in ([\d.]+)s", output)
    if ready:
        found["model_ready_s"] = float(ready[1])
    save = re.search(r"Saved \S+ in ([\d.]+)s \(peak RSS of the merge and export ([\d.]+) GiB\)", output)
    if save:
        found.update(save_s=float(save[1]), save_peak_rss_bytes=float(save[2]) * 2**30)
    return found


def _eval_config(path: Path, shape: str, merged_dir: Path, tokenizer: Dict[str, str],
                 corpus: Path, seq_len: int, output_dir: Path) -> Path:
    kind = _real_shapes.SHAPES[shape]["tokenizer"]
    component = {"sentencepiece": "torchtune.models.llama2.llama2_tokenizer",
                 "tiktoken": "torchtune.models.llama3.llama3_tokenizer",
                 "qwen2": "torchtune.models.qwen2_5.qwen2_5_tokenizer"}[kind]
    if shape.startswith("mistral"):
        component = "torchtune.models.mistral.mistral_tokenizer"
    tokenizer_cfg = {"_component_": component, **tokenizer}
    if kind == "sentencepiece":
        tokenizer_cfg["prompt_template"] = None
    config = {
        "output_dir": str(output_dir),
        "checkpoint": {"kind": "merged", "merged_dir": str(merged_dir)},
        "tokenizer": tokenizer_cfg,
        "datasets": [{"_component_": "qalora_tune.data.text_file_dataset", "path": str(corpus),
                      "block_size": seq_len, "split": "validation"}],
        "batch_size": 1, "max_batches": 2, "device": "cpu", "dtype": "bf16", "lm_eval": None,
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def run(shape: str, workdir: Path, layers: Optional[int] = None, phases: Sequence[str] = PHASES,
        threads: int = 2, seq_len: int = 32, steps: int = 2, max_shard_size: str = "5GB",
        shards: Optional[int] = None, keep: bool = False, timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run the phases of one shape in ``workdir``; returns the measurements."""
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "checkpoint"
    corpus = workdir / "corpus.txt"
    run_dir = workdir / "run"
    merged = run_dir / "epoch_0" / "merged_int4"
    offline = workdir / "merged_offline"
    env = _child_env(threads)
    config = _real_shapes.SHAPES[shape]["packaged_config"]
    results: Dict[str, Any] = {"phases": {}}
    if "write" in phases:
        shutil.rmtree(checkpoint, ignore_errors=True)
        command = [sys.executable, str(SCRIPT), "--child-write", shape, str(checkpoint),
                   str(layers or 0), str(shards or 0)]
        results["phases"]["write"] = _strip(run_phase("write", command, workdir / "write.log", env, ROOT, timeout))
    tokenizer = _real_shapes.write_stand_in_tokenizer(shape, workdir / "tokenizer",
                                                      _real_shapes.write_corpus(corpus))
    overrides = finetune_overrides(shape, checkpoint, tokenizer, corpus, run_dir, layers,
                                   seq_len, steps, max_shard_size)
    if "finetune" in phases:
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [tune_command(), "run", "qalora_finetune", "--config", config, *overrides]
        phase = run_phase("finetune", command, workdir / "finetune.log", env, ROOT, timeout)
        phase.update(parse_finetune_log(phase["output"], run_dir / "logs"))
        # the recipe restarts the kernel's peak at each stage (log_peak_memory_stats):
        # the process's peak is the largest of the stages'
        phase["peak_rss_bytes"] = max(phase[k] for k in (
            "peak_rss_bytes", "load_peak_rss_bytes", "train_peak_rss_bytes", "save_peak_rss_bytes")
            if k in phase)
        results["phases"]["finetune"] = _strip(phase)
    if "merge" in phases:
        shutil.rmtree(offline, ignore_errors=True)
        command = [tune_command(), "run", "qalora_merge", "--config", config, *overrides,
                   f"adapter_dir={run_dir / 'epoch_0' / 'adapter'}", f"merged_dir={offline}"]
        results["phases"]["merge"] = _strip(run_phase("merge", command, workdir / "merge.log", env, ROOT, timeout))
    for loader in ("load_merged", "transformers"):
        if loader in phases:
            command = [sys.executable, "-c", _LOADER_CHILD, loader, str(merged), str(threads)]
            phase = run_phase(loader, command, workdir / f"{loader}.log", env, ROOT, timeout)
            phase.update(json.loads(phase["output"].strip().splitlines()[-1]))
            results["phases"][loader] = _strip(phase)
    if "eval" in phases:
        eval_config = _eval_config(workdir / "eval.yaml", shape, merged, tokenizer, corpus,
                                   seq_len, workdir / "eval")
        command = [tune_command(), "run", "qalora_eval", "--config", str(eval_config)]
        results["phases"]["eval"] = _strip(run_phase("eval", command, workdir / "eval.log", env, ROOT, timeout))
    results.update(_sizes(checkpoint, merged))
    results["int4_model_bytes"] = model_bytes(_real_shapes.hf_config(shape, layers))["model"]
    results["bounds"] = check_bounds(results)
    if not keep:
        for path in (checkpoint, run_dir, offline):
            shutil.rmtree(path, ignore_errors=True)
    return results


def _strip(phase: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in phase.items() if k != "output"}


def _sizes(checkpoint: Path, merged: Path) -> Dict[str, Any]:
    sizes: Dict[str, Any] = {}
    if checkpoint.is_dir():
        sizes["checkpoint_bytes"] = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        sizes["checkpoint_files"] = len(list(checkpoint.glob("*.safetensors")))
        from qalora_tune.checkpointing import SafetensorsReader

        largest = 0
        for path in checkpoint.glob("*.safetensors"):
            with SafetensorsReader(path) as reader:
                largest = max([largest] + [reader.nbytes(k) for k in reader.keys()])
        sizes["largest_tensor_bytes"] = largest
    if merged.is_dir():
        from qalora_tune.checkpointing import SafetensorsReader, safetensors_files

        layers: Dict[str, int] = {}
        for path in safetensors_files(merged):
            with SafetensorsReader(path) as reader:
                for key in reader.keys():
                    if "._weight_" in key:  # a quantized layer's flattened parts
                        owner = key.split("._weight_")[0]
                        layers[owner] = layers.get(owner, 0) + reader.nbytes(key)
        sizes["largest_quantized_layer_bytes"] = max(layers.values(), default=0)
        report = json.loads((merged / "merge_report.json").read_text())
        sizes["merged_file_bytes"] = report["size"]["file_bytes"]
        sizes["merged_files"] = report["size"].get("shards", 1)
        sizes["quantized_bytes"] = report["size"]["quantized_bytes"]
        sizes["merge_report"] = {k: report.get(k) for k in (
            "merge_weight_error", "max_relative_logit_error", "perplexity_relative_difference")}
        adapter = merged.parent / "adapter" / "adapter_model.safetensors"
        sizes["adapter_bytes"] = adapter.stat().st_size if adapter.is_file() else 0
    return sizes
