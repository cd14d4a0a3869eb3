"""The report of ``benchmarks/decode.py``: the environment it ran in, known GPU
bandwidths, and the markdown summary."""

import os
import platform
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from _decode_timing import MODELS
from _report import command_line, cpu_model_name

import qalora_tune

# HBM bandwidth (GB/s) of GPUs whose name identifies the part
_KNOWN_BANDWIDTH_GBPS = (
    (("H200",), 4800.0),
    (("H100", "HBM3"), 3350.0),
    (("H100", "SXM"), 3350.0),
    (("A100", "SXM4-80GB"), 2039.0),
)

# CPU features the bf16 and int4 CPU kernels use
_CPU_FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def _environment(device: torch.device, argv: Sequence[str]) -> Dict[str, Any]:
    from importlib.metadata import version

    cpu_model, cpu_flags = cpu_model_name(), []
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    for line in info:
        if line.startswith("flags"):
            cpu_flags = [f for f in line.split(":", 1)[1].split() if f in _CPU_FLAGS_OF_NOTE]
            break
    return {
        "torch": torch.__version__,
        "torchao": version("torchao"),
        "torchtune": version("torchtune"),
        "qalora_tune": qalora_tune.__version__,
        "python": platform.python_version(),
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_model}"
        ),
        "cpu_model": cpu_model,
        "cpu_flags_of_note": cpu_flags,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "command": command_line("benchmarks/decode.py", argv),
    }


def default_bandwidth_gbps(device: torch.device) -> Optional[float]:
    """HBM bandwidth of a known GPU (H100 SXM, H200, A100 80GB SXM), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for parts, gbps in _KNOWN_BANDWIDTH_GBPS:
        if all(part in name for part in parts):
            return gbps
    return None


def _fmt(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


def markdown(result: Dict[str, Any]) -> str:
    """A markdown report: settings, one row per (mode, model), ratios and targets."""
    s, env = result["settings"], result["environment"]
    shape = s["shape"]
    flags = env.get("cpu_flags_of_note")
    lines = [
        f"# Decode benchmark: {shape['name']} on {env['device']}",
        "",
        f"`{env['command']}`",
        "",
        f"{shape['num_layers']} layers, dim {shape['embed_dim']}, ffn {shape['intermediate_dim']}, "
        f"vocab {shape['vocab_size']}, group size {shape['group_size']}, rank {shape['rank']}, "
        f"alpha {shape['alpha']:g}; prompt {s['prompt_len']} tokens, {s['new_tokens']} decoded "
        f"(greedy, KV cache), batch 1, bf16, median of {s['repeats']} interleaved repeats. "
        f"torch {env['torch']}, torchao {env['torchao']}, torchtune {env['torchtune']}, "
        f"{env['torch_threads']} threads"
        + (f", CPU flags {' '.join(flags)}." if flags else "."),
        "",
        "| mode | model | prefill tok/s | decode tok/s | ms/token | weight MB/token "
        "| weight GB/s | % of bandwidth |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, per_model in result["results"].items():
        for name in MODELS:
            entry = per_model.get(name, {})
            title = result["models"][name]["title"]
            if "error" in entry:
                lines.append(f"| {mode} | {title} | error: {entry['error'][:120]} | | | | | |")
                continue
            mb = result["models"][name]["weight_bytes_per_token"] / 1e6
            fraction = entry.get("bandwidth_fraction")
            lines.append(
                f"| {mode} | {title} | {_fmt(entry['prefill_tokens_per_s'])} | "
                f"{_fmt(entry['decode_tokens_per_s'], 2)} | "
                f"{_fmt(entry['decode_ms_per_token'], 1)} | "
                f"{_fmt(mb, 1)} | {_fmt(entry['weight_gb_per_s'], 2)} | "
                f"{'n/a' if fraction is None else f'{100 * fraction:.1f}%'} |"
            )
    lines += [
        "",
        "| mode | prefill int4/bf16 | decode int4/bf16 | prefill int4/QLoRA | decode int4/QLoRA |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, r in result["ratios"].items():
        lines.append(
            f"| {mode} | {_fmt(r['prefill_int4_over_bf16'], 2, 'x')} | "
            f"{_fmt(r['decode_int4_over_bf16'], 2, 'x')} | "
            f"{_fmt(r['prefill_int4_over_qlora'], 2, 'x')} | "
            f"{_fmt(r['decode_int4_over_qlora'], 2, 'x')} |"
        )
    verdict = {True: "met", False: "NOT met", None: "not measured"}
    lines += ["", "Targets (issue 7, best over modes): " + "; ".join(
        f"{k} >= {v['target']}: {_fmt(v['measured_best'], 2)} ({verdict[v['met']]})"
        for k, v in result["targets"].items()
    )]
    agreement = ", ".join(f"{k.split('_vs_')[0]} {v:.3g}" for k, v in result["logits"].items())
    greedy = "; ".join(
        f"{mode}: " + ", ".join(f"{k} {v:.0%}" for k, v in g.items())
        for mode, g in result["greedy_agreement"].items()
    )
    lines += ["", f"Prefill logits vs the bf16 merged LoRA model (relative Frobenius error, "
              f"no KV cache): {agreement or 'n/a'}. Greedy tokens equal to the bf16 model's: "
              f"{greedy or 'n/a'}."]
    if shape.get("checkpoint_dir") is None:
        lines += ["", "Random weights: the logits are close to noise, so any 4-bit base (int4 RTN "
                  "here, NF4 in QLoRA) moves them by a similar amount and changes most greedy "
                  "tokens. That the served int4 model computes the dequantized int4 base plus "
                  "the merged adapter within bf16 rounding is checked by "
                  "`tests/benchmarks/test_decode.py`."]
    lines += ["", "Weight tensor classes, and the ops one decode step spends its time in "
              "(profiler, self time):", ""]
    for name in MODELS:
        info = result["models"][name]
        classes = ", ".join(f"`{c}`" for c in info.get("weight_classes", [])) or "n/a"
        lines.append(f"- {info['title']}: {classes}" + (
            f"; build error: {info['build_error']}" if "build_error" in info else "")
            + (f"; {info['served_as']}" if "served_as" in info else ""))
        for mode, per_model in result["results"].items():
            top_ops = per_model.get(name, {}).get("top_ops_decode_step", [])
            ops = ", ".join(f"`{op}`" for op in top_ops)
            if ops:
                lines.append(f"  - {mode}: {ops}")
    return "\n".join(lines) + "\n"

