"""Real model sizes end to end on a CPU: time and peak memory of every phase a user runs.

    python benchmarks/real_size.py --shape llama2_7b                        # the whole model
    python benchmarks/real_size.py --shape llama2_13b --workdir /data/rs    # ~26 GB of disk
    python benchmarks/real_size.py --shape llama2_7b --layers 2 --out docs/results/real_size_7b_2layers

Phases, each a child process whose wall time and peak RSS (``wait4``'s ``ru_maxrss``) are
recorded:

1. ``write``: a random-weight Hugging Face checkpoint of the shape (``_real_shapes.py``:
   bf16, sharded about 2 GB per file with ``model.safetensors.index.json``, written one
   tensor at a time), a stand-in tokenizer of its format and a synthetic text;
2. ``finetune``: ``tune run qalora_finetune --config <its packaged config> device=cpu
   dtype=bf16`` with checkpoint, tokenizer and dataset overridden, ``--steps`` steps of
   ``--seq-len`` tokens, writing ``epoch_0/merged_int4``; its log gives the load+quantize
   time, throughput and peak, and (``log_peak_memory_stats=True``) the training peak;
3. ``merge``: ``tune run qalora_merge`` of that adapter into a second ``merged_int4``;
4. ``load_merged``: ``qalora_tune.load_merged`` + a greedy 4-token generation;
5. ``transformers``: ``AutoModelForCausalLM.from_pretrained`` + ``generate`` (4 tokens);
6. ``eval``: ``tune run qalora_eval`` of the merged model on the text (perplexity).

The memory bounds the project holds itself to (the model bytes are the int4 linears plus
the full-precision embeddings and norms, as in ``merged_int4/``):

- load + quantize <= model bytes + the largest bf16 tensor + 1.5 GB;
- training <= model bytes + adapters with gradients and AdamW state + 1.5 GB (activations
  of ``--seq-len`` tokens are inside the 1.5 GB);
- merge and export at the end of ``finetune`` <= the training peak + one merged layer in
  flight (the largest quantized layer as written: the export streams one tensor at a time
  and builds the merge report on the model itself) + 64 MB of working buffers, and the
  offline ``merge`` (which loads the base as well) <= the fine-tuning's load or training
  peak + the same;
- ``load_merged`` and transformers (load + first forward), above the RSS of the imports
  alone, <= 1.2 x the merged files' size.

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (default ``docs/results/real_size``).
The stand-in tokenizer and random weights make the losses meaningless; the shapes, the
bytes moved and the memory are the real ones.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_shapes  # noqa: E402
from _report import command_line, cpu_model_name, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("write", "finetune", "merge", "load_merged", "transformers", "eval")
GB = 1e9
ALLOWANCE = 1.5e9
LOADER_RATIO = 1.2
# the block buffers of a layer's conversion (a few of BLOCK_BYTES = 16 MB) and the merge
# report's probe forward: fixed, whatever the model's size
WORKING_BUFFERS = 64e6

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
        command = [sys.executable, __file__, "--child-write", shape, str(checkpoint),
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


def check_bounds(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each memory bound of the module notes: its measured value, its limit, whether held."""
    phases, bounds = results["phases"], []
    # the int4 model as trained (CPU kernel layout, 4.5 bits at G=64); the merged files
    # may be larger (the default CPU format, intx, keeps a byte per code)
    model = results.get("int4_model_bytes") or results.get("merged_file_bytes")
    files = results.get("merged_file_bytes")
    finetune = phases.get("finetune", {})
    if model and "load_peak_rss_bytes" in finetune and "largest_tensor_bytes" in results:
        limit = model + results["largest_tensor_bytes"] + ALLOWANCE
        bounds.append(_bound("load + quantize", finetune["load_peak_rss_bytes"], limit,
                             "model + largest bf16 tensor + 1.5 GB"))
    if model and "train_peak_rss_bytes" in finetune:
        # adapters in bf16: weights, gradients and AdamW's two moments
        limit = model + 4 * results.get("adapter_bytes", 0) + ALLOWANCE
        bounds.append(_bound("training", finetune["train_peak_rss_bytes"], limit,
                             "model + adapter, gradient and AdamW state + 1.5 GB"))
        train = finetune["train_peak_rss_bytes"]
        in_flight = results.get("largest_quantized_layer_bytes", 0) + WORKING_BUFFERS
        if "save_peak_rss_bytes" in finetune:
            bounds.append(_bound("merge + export (in training)", finetune["save_peak_rss_bytes"],
                                 train + in_flight,
                                 "training peak + one merged layer in flight + 64 MB"))
        if "merge" in phases:  # it loads the base too: compared with the fine-tuning's load
            limit = max(finetune.get("load_peak_rss_bytes", 0), train) + in_flight
            bounds.append(_bound("qalora_merge (load, merge, export)",
                                 phases["merge"]["peak_rss_bytes"], limit,
                                 "fine-tuning's load or training peak + one merged layer + 64 MB"))
    for loader in ("load_merged", "transformers"):
        if files and loader in phases:
            phase = phases[loader]
            bounds.append(_bound(f"{loader} (load + first forward)",
                                 phase["peak_rss_bytes"] - phase["rss_after_import_bytes"],
                                 LOADER_RATIO * files, "1.2 x merged files, above the imports"))
    return bounds


def _bound(name: str, value: float, limit: float, rule: str) -> Dict[str, Any]:
    return {"bound": name, "measured_bytes": value, "limit_bytes": limit, "rule": rule,
            "holds": bool(value <= limit)}


def model_bytes(config: Dict[str, Any], group_size: int = 64, rank: int = 16) -> Dict[str, int]:
    """What a shape's QA-LoRA model holds, from its sizes (the packaged configs' settings:
    int4 linears at group size 64 with bf16 scales and zero points, bf16 embeddings and
    norms, rank-16 adapters on every projection): the bytes of the model (as merged),
    of its checkpoint in bf16, of its largest bf16 tensor and of its adapters."""
    linear, dense, largest, adapters = 0, 0, 0, 0
    for name, shape in _real_shapes.hf_tensor_shapes(config):
        count = 1
        for size in shape:
            count *= size
        largest = max(largest, 2 * count)
        if len(shape) == 2 and "embed_tokens" not in name:
            linear += count
            if "lm_head" not in name:  # no adapter on the output projection
                adapters += rank * (shape[1] // group_size + shape[0])  # A (r, K/G), B (N, r)
        else:
            dense += count
    return {
        "model": int(linear * (0.5 + 4 / group_size) + 2 * dense),
        "checkpoint": 2 * (linear + dense),
        "largest_tensor": largest,
        "adapters": 2 * adapters,
    }


def memory_model(reports: List[Dict[str, Any]]) -> List[str]:
    """Peak RSS per phase at full depth, predicted as the full model's bytes plus what each
    phase took above the model's bytes in the measured runs (the overhead does not grow
    with depth: one layer in flight, buffers, the imports)."""
    lines = []
    for report in reports:
        shape = report["settings"]["shape"]
        files = report.get("merged_file_bytes")
        measured = model_bytes(_real_shapes.hf_config(shape, report["settings"]["layers"]))
        full = model_bytes(_real_shapes.hf_config(shape))
        measured_model = measured["model"]
        finetune = report["phases"].get("finetune", {})
        rows = [
            ("load + quantize", finetune.get("load_peak_rss_bytes"),
             full["largest_tensor"] - measured["largest_tensor"]),
            ("training", finetune.get("train_peak_rss_bytes"), 4 * (full["adapters"] - measured["adapters"])),
            ("merge + export", finetune.get("save_peak_rss_bytes"), 0),
        ]
        phase = report["phases"].get("load_merged")
        rows.append(("load_merged", phase and phase["peak_rss_bytes"], 0))
        phase = report["phases"].get("transformers")
        if phase and files:  # it holds the files' layout: scales with the files
            rows.append(("transformers", phase["peak_rss_bytes"],
                         (full["model"] - measured_model) * (files / measured_model - 1)))
        lines += [
            f"### {shape} at its full depth ({_real_shapes.SHAPES[shape]['config']['num_hidden_layers']} layers), "
            f"derived from the {report['settings']['layers'] or 'full'}-layer run",
            "",
            f"Model as trained (int4 linears, bf16 embeddings) {full['model'] / GB:.2f} GB "
            f"(formula; {measured_model / GB:.3f} GB at the measured depth, whose merged "
            f"files took {(files or 0) / GB:.3f} GB); checkpoint {full['checkpoint'] / GB:.2f} GB in bf16.",
            "",
            "| phase | measured peak | above the model | predicted at full depth |",
            "|---|---:|---:|---:|",
        ]
        for name, peak, extra in rows:
            if not peak:
                continue
            above = peak - measured_model
            lines.append(f"| {name} | {peak / GB:.2f} GB | {above / GB:.2f} GB | "
                         f"{(full['model'] + above + extra) / GB:.2f} GB |")
        if finetune.get("load_gb_per_s"):
            lines += ["", f"Load + quantize at the measured {finetune['load_gb_per_s']:.3f} GB/s: "
                      f"about {full['checkpoint'] / GB / finetune['load_gb_per_s'] / 60:.0f} min for the full checkpoint."]
        lines.append("")
    return lines


def markdown(reports: List[Dict[str, Any]], command: str) -> str:
    lines = [
        "# Real sizes on a CPU: time and peak memory per phase",
        "",
        f"Command: `{command}`  ",
        f"Machine: {cpu_model_name()}, {os.cpu_count()} cores; random bf16 weights, a stand-in "
        "tokenizer of each model's format and a synthetic text (the real tokenizers and "
        "weights are not available offline): shapes, bytes and memory are real, losses are not.",
        "",
    ]
    for report in reports:
        settings = report["settings"]
        layers = settings["layers"] or _real_shapes.SHAPES[settings["shape"]]["config"]["num_hidden_layers"]
        lines += [
            f"## {settings['shape']}, {layers} layers",
            "",
            f"Checkpoint {report.get('checkpoint_bytes', 0) / GB:.2f} GB in "
            f"{report.get('checkpoint_files', 0)} files; merged int4 "
            f"{report.get('merged_file_bytes', 0) / GB:.2f} GB in {report.get('merged_files', 0)} "
            f"file(s); {settings['steps']} steps of {settings['seq_len']} tokens, "
            f"{settings['threads']} threads.",
            "",
            "| phase | wall time | CPU time | peak RSS | notes |",
            "|---|---:|---:|---:|---|",
        ]
        for name, phase in report["phases"].items():
            note = ""
            if name == "finetune" and "load_s" in phase:
                note = (f"load + quantize {phase['load_s']:.0f} s ({phase['load_gb_per_s']:.3f} GB/s, "
                        f"peak {phase['load_peak_rss_bytes'] / GB:.2f} GB); training peak "
                        f"{phase.get('train_peak_rss_bytes', 0) / GB:.2f} GB; merge + export "
                        f"{phase.get('save_s', 0):.0f} s, peak {phase.get('save_peak_rss_bytes', 0) / GB:.2f} GB")
            if name in ("load_merged", "transformers"):
                note = (f"load {phase['load_s']:.1f} s, 4 tokens {phase['generate_s']:.1f} s; RSS after "
                        f"imports {phase['rss_after_import_bytes'] / GB:.2f} GB, after load "
                        f"{phase['rss_after_load_bytes'] / GB:.2f} GB")
            lines.append(f"| {name} | {phase['wall_s']:.0f} s | {phase.get('cpu_s', 0):.0f} s | "
                         f"{phase['peak_rss_bytes'] / GB:.2f} GB | {note} |")
        lines += ["", "| memory bound | measured | limit | rule | holds |", "|---|---:|---:|---|---|"]
        for bound in report["bounds"]:
            lines.append(f"| {bound['bound']} | {bound['measured_bytes'] / GB:.2f} GB | "
                         f"{bound['limit_bytes'] / GB:.2f} GB | {bound['rule']} | "
                         f"{'yes' if bound['holds'] else '**no**'} |")
        merge = report.get("merge_report") or {}
        weight = merge.get("merge_weight_error") or {}
        if weight:
            lines += ["", f"Merge report: merge error in weight space {weight['max_abs']:.2e} "
                      f"({weight['max_relative_to_zero_point']:.2e} of |z'|, bf16 unit roundoff "
                      f"{weight['unit_roundoff']:.1e}); merged vs unmerged logits (kernel rounding) "
                      f"{merge['max_relative_logit_error']:.2e}."]
        lines.append("")
    model = memory_model(reports)
    if model:
        lines += ["## Memory model", "", *model]
    return "\n".join(lines)


def plot(reports: List[Dict[str, Any]], path: Path) -> None:
    """Peak RSS (bars) and wall time (dots) per phase, one panel per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4), squeeze=False)
    for axis, report in zip(axes[0], reports):
        names = list(report["phases"])
        peaks = [report["phases"][n]["peak_rss_bytes"] / GB for n in names]
        axis.bar(names, peaks, color="tab:blue", label="peak RSS (GB)")
        if report.get("merged_file_bytes"):
            axis.axhline(report["merged_file_bytes"] / GB, color="tab:gray", linestyle="--",
                         label="merged int4 files (GB)")
        axis.set_ylabel("peak RSS (GB)")
        axis.tick_params(axis="x", rotation=30)
        twin = axis.twinx()
        twin.plot(names, [report["phases"][n]["wall_s"] for n in names], "o", color="tab:red",
                  label="wall time (s)")
        twin.set_ylabel("wall time (s)")
        settings = report["settings"]
        axis.set_title(f"{settings['shape']}, {settings['layers'] or 'all'} layers")
        axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def combine_reports(outputs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One report per shape and depth from runs that each did some of its phases (in the
    order given: a later run's phases and sizes complete an earlier one's); the bounds are
    checked again on the whole."""
    combined: Dict[Tuple[str, Any], Dict[str, Any]] = {}
    for output in outputs:
        for report in output["reports"]:
            settings = report["settings"]
            key = (settings["shape"], settings["layers"])
            into = combined.setdefault(key, {"phases": {}, "settings": dict(settings, phases=[])})
            into["phases"].update(report["phases"])
            into["settings"]["phases"] += [p for p in settings["phases"] if p not in into["settings"]["phases"]]
            into.update({k: v for k, v in report.items() if k not in ("phases", "settings", "bounds")})
    for report in combined.values():
        settings = report["settings"]
        report["int4_model_bytes"] = model_bytes(
            _real_shapes.hf_config(settings["shape"], settings["layers"]))["model"]
        report["bounds"] = check_bounds(report)
    return list(combined.values())


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-write":
        shape, directory, layers, shards = argv[1], Path(argv[2]), int(argv[3]), int(argv[4])
        info = _real_shapes.write_random_checkpoint(directory, shape, layers=layers or None,
                                                    shards=shards or None, progress=True)
        print(json.dumps({"files": info["files"], "bytes": info["bytes"]}))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", choices=sorted(_real_shapes.SHAPES), required=True)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qalora-tune-real-size"))
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--shards", type=int, default=None, help="checkpoint files (default: ~2 GB each)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "real_size")
    parser.add_argument("--from-json", type=Path, action="append", default=[],
                        help="combine the reports of earlier runs (phases run separately) "
                             "into --out instead of running anything")
    args = parser.parse_args(argv)
    if args.from_json:
        outputs = [json.loads(p.read_text()) for p in args.from_json]
        reports = combine_reports(outputs)
        command = " && ".join(output["command"] for output in outputs)
        write_outputs(args.out.with_suffix(".json"), args.out.with_suffix(".md"),
                      {"command": command, "cpu": cpu_model_name(), "reports": reports},
                      markdown(reports, command))
        plot(reports, args.out.with_suffix(".png"))
        return
    phases = [p for p in args.phases.split(",") if p]
    reports = []
    for shape in args.shape:
        report = run(shape, args.workdir / shape, args.layers, phases, args.threads, args.seq_len,
                     args.steps, args.max_shard_size, args.shards, args.keep)
        report["settings"] = {"shape": shape, "layers": args.layers, "threads": args.threads,
                              "seq_len": args.seq_len, "steps": args.steps,
                              "max_shard_size": args.max_shard_size, "phases": phases}
        reports.append(report)
        for bound in report["bounds"]:
            print(f"{shape}: {bound['bound']}: {bound['measured_bytes'] / GB:.2f} GB "
                  f"<= {bound['limit_bytes'] / GB:.2f} GB: {bound['holds']}", flush=True)
    command = command_line("benchmarks/real_size.py", argv)
    out = args.out
    write_outputs(out.with_suffix(".json"), out.with_suffix(".md"),
                  {"command": command, "cpu": cpu_model_name(), "reports": reports},
                  markdown(reports, command))
    plot(reports, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
