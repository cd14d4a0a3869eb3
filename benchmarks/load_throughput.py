"""Load + quantize throughput: build a real-width model and stream a checkpoint into it.

    python benchmarks/_real_shapes.py ...   (or any Hugging Face Llama-layout checkpoint)
    python benchmarks/load_throughput.py --checkpoint-dir /tmp/llama2_7b_2 --threads 1

Builds the QA-LoRA model of the checkpoint's ``config.json`` (torchtune's ``llama2``
builder at those sizes: all projections adapted, int4 base, group size 64, RTN) in bf16 on
the CPU, then times ``QALoRACheckpointer.load_base``: the checkpoint read tensor by tensor
and every linear quantized. Reports the model build time, the load time, the throughput in
GB/s of checkpoint read and quantized, and the peak RSS (a child process per run, so each
measurement starts clean). Only public APIs that the project has had from its start are
used, so the same script measures an older checkout (``--pythonpath``), for before/after
comparisons.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
from functools import partial
import torch
t0 = time.perf_counter()
from torchtune.models.llama2 import llama2
from qalora_tune.checkpointing import QALoRACheckpointer
from qalora_tune.models import qalora_transformer
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
config = json.loads(open(args["checkpoint_dir"] + "/config.json").read())
sizes = dict(
    vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
    num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
    embed_dim=config["hidden_size"], intermediate_dim=config["intermediate_size"],
    max_seq_len=config["max_position_embeddings"], norm_eps=config["rms_norm_eps"],
)
def rss():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
start_rss = rss()
torch.set_default_dtype(torch.bfloat16)
t1 = time.perf_counter()
model = qalora_transformer(
    partial(llama2, **sizes), ["q_proj", "k_proj", "v_proj", "output_proj"],
    apply_lora_to_mlp=True, lora_rank=16, lora_alpha=32.0, group_size=64,
)
t2 = time.perf_counter()
QALoRACheckpointer(args["checkpoint_dir"], "LLAMA2", args["output_dir"]).load_base(model)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t2 - t1, "load_s": t3 - t2,
                  "peak_rss_bytes": rss(), "rss_after_import_bytes": start_rss}))
"""


def _checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def measure(checkpoint_dir: Path, threads: int, pythonpath: str = "") -> dict:
    """One run in a fresh process; returns its timings, throughput and peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), QALORA_TUNE_PROGRESS="0")
    root = pythonpath or str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root
    args = {"checkpoint_dir": str(checkpoint_dir), "threads": threads, "output_dir": "/tmp"}
    # `python -c` puts the working directory first on sys.path: run in the checkout measured
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)], env=env, capture_output=True,
        text=True, check=False, cwd=root,
    )
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    run = json.loads(result.stdout.strip().splitlines()[-1])
    size = _checkpoint_bytes(checkpoint_dir)
    run["checkpoint_bytes"] = size
    run["load_gb_per_s"] = size / run["load_s"] / 1e9
    run["build_and_load_gb_per_s"] = size / (run["build_s"] + run["load_s"]) / 1e9
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--pythonpath", action="append", default=[""],
                        help="measure another checkout too (its root); '' is this one")
    args = parser.parse_args(argv)
    for _ in range(args.repeats):  # interleaved, so load on the machine hits both alike
        for path in args.pythonpath:
            run = measure(args.checkpoint_dir, args.threads, path)
            label = path or "this checkout"
            print(f"{label}: build {run['build_s']:.1f}s, load {run['load_s']:.1f}s, "
                  f"{run['build_and_load_gb_per_s']:.3f} GB/s (build + load), "
                  f"peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
            print(json.dumps(run), flush=True)


if __name__ == "__main__":
    main()
