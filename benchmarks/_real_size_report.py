"""The report of ``benchmarks/real_size.py``: the markdown page (phases, bounds, the
memory model at full depth), the plot, and reports of separate runs combined."""

import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import _real_shapes
from _real_size_bounds import GB, check_bounds, model_bytes
from _report import cpu_model_name


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
