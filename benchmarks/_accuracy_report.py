"""The report of ``benchmarks/accuracy.py``: QA-LoRA vs the best baseline per
``(b, G)``, markdown tables, the plot and the environment."""

import argparse
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _accuracy_common import (
    ALPHA,
    BASELINES,
    FP32_BASE,
    INT_BASE,
    LORA_FP32,
    LORA_PTQ,
    METHOD_ORDER,
    QALORA,
    QALORA_DEFAULTS,
    QLORA_PTQ,
    QUANTIZER_NAMES,
    RANK,
    WARMUP_FRACTION,
    best_row,
    relative_difference,
)
from _report import command_line, cpu_model_name


def comparisons(
    rows: Sequence[dict[str, Any]],
    targets: Sequence[str],
    bits: Sequence[int],
    group_sizes: Sequence[int],
) -> list[dict[str, Any]]:
    """Per target and ``(b, G)``: the QA-LoRA row vs the best fine-tune-then-quantize
    baseline (each chosen by validation perplexity), relative differences of the test and
    TinyStories perplexity (means over seeds where seeded)."""
    result = []
    for target in targets:
        for b in bits:
            for g in group_sizes:
                qalora = best_row(rows, target, (QALORA,), b, g)
                baseline = best_row(rows, target, BASELINES, b, g)
                if qalora is None or baseline is None:
                    continue
                entry = {
                    "target": target,
                    "bits": b,
                    "group_size": g,
                    "qalora": _label(qalora),
                    "baseline": _label(baseline),
                }
                for name in ("test_ppl", "tinystories_ppl"):
                    q, r = qalora[f"{name}_mean"], baseline[f"{name}_mean"]
                    entry[f"qalora_{name}"], entry[f"baseline_{name}"] = q, r
                    entry[f"{name}_relative"] = relative_difference(q, r) if q and r else None
                result.append(entry)
    return result


def _label(row: dict[str, Any]) -> str:
    return f"{row['method']} ({row['quantizer']})" if row.get("quantizer") else row["method"]


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    if row.get("skipped"):
        return "skipped"

    def number(name: str) -> str:
        mean, std = row.get(f"{name}_mean"), row.get(f"{name}_std")
        if mean is None:
            return "diverged"
        return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")

    return f"{number('test_ppl')} / {number('tinystories_ppl')}"


def _columns(settings: dict[str, Any]) -> list[tuple[int | None, int | None]]:
    return [(None, None)] + [(b, g) for b in settings["bits"] for g in settings["group_sizes"]]


def target_table(rows: Sequence[dict[str, Any]], target: str, settings: dict[str, Any]) -> str:
    """One markdown table: rows = methods (per quantizer), columns = fp32 and each (b, G)."""
    columns = _columns(settings)
    head = ["method"] + ["fp32" if b is None else f"{b}-bit G{g}" for b, g in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels: list[tuple[str, str | None]] = []
    for method in METHOD_ORDER:
        for quantizer in [None, *QUANTIZER_NAMES]:
            if any(
                r["target"] == target and r["method"] == method and r["quantizer"] == quantizer
                for r in rows
            ):
                labels.append((method, quantizer))
    for method, quantizer in labels:
        cells = [method + (f" ({quantizer})" if quantizer else "")]
        for b, g in columns:
            match = [
                r
                for r in rows
                if r["target"] == target
                and r["method"] == method
                and r["quantizer"] == quantizer
                and r["bits"] == b
                and r["group_size"] == g
            ]
            cells.append(_cell(match[0] if match else None))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lr_table(rows: Sequence[dict[str, Any]], target: str) -> str:
    """The tuned learning rate (and pooling) of every trained row."""
    lines = [
        "| row | b | G | lr | pooling (alpha) | best inside the searched grid | merged vs unmerged |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["target"] != target or r.get("lr") is None:
            continue
        pooling = f"{r['pooling']} ({r['alpha']:g})" if r.get("pooling") else f"- ({r['alpha']:g})"
        deviation = r.get("merge_deviation_mean")
        lines.append(
            f"| {_label(r)} | {r['bits'] or '-'} | {r['group_size'] or '-'} | {r['lr']:.3g} | {pooling} | "
            f"{_bracketed(r)} | "
            f"{'-' if deviation is None else f'{100 * deviation:.4f}%'} |"
        )
    return "\n".join(lines)


def _bracketed(row: dict[str, Any]) -> str:
    if row["method"] == QALORA_DEFAULTS:
        return f"not searched: {row['packaged']['config']}'s lr"
    return "yes" if row["lr_bracketed"] else "no (edge)"


def comparison_lines(
    entries: Sequence[dict[str, Any]], target: str, storage: dict[str, str]
) -> list[str]:
    lines = []
    for e in entries:
        if e["target"] != target:
            continue
        test, stories = e["test_ppl_relative"], e["tinystories_ppl_relative"]
        where = storage.get(str(e["group_size"]), "?")
        lines.append(
            f"- {e['bits']}-bit G{e['group_size']} ({where}): {e['qalora']} {_num(e['qalora_test_ppl'])} vs "
            f"{e['baseline']} {_num(e['baseline_test_ppl'])}: {_percent(test)} test perplexity; "
            f"TinyStories {_num(e['qalora_tinystories_ppl'])} vs {_num(e['baseline_tinystories_ppl'])}: "
            f"{_percent(stories)}"
        )
    return lines


def _num(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.2f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def markdown_report(report: dict[str, Any]) -> str:
    settings = report["settings"]
    parts = [
        f"`{report['environment']['command']}`",
        "",
        (
            f"TinyStories-656K, {settings['steps']} steps x batch {settings['batch_size']} x "
            f"{settings['seq_len']} tokens for every method; rank {RANK}, alpha {ALPHA:g} (QA-LoRA: "
            f"alpha per pooling), adapters on q/k/v/output_proj and w1/w2/w3; AdamW (weight decay 0), "
            f"{int(WARMUP_FRACTION * 100)}% linear warmup then cosine. Seeds {settings['seeds']} on the "
            f"headline rows of {', '.join(settings['seed_targets'])} (cells: mean ± std), seed "
            f"{settings['seeds'][0]} elsewhere. Evaluation in "
            f"blocks/examples of at most {settings['eval_seq_len']} tokens; TinyStories: "
            f"{settings['tinystories_tokens']} tokens. Wall time {report['wall_seconds'] / 60:.1f} min "
            f"({report['environment']['cpu']}, {report['environment']['processes']} process(es) of "
            f"{report['environment']['threads']} thread(s))."
        ),
        "",
        "Cells: test perplexity / TinyStories perplexity (lower is better). Group-size storage: "
        + ", ".join(
            f"G{g}: {kind}"
            for g, kind in sorted(report["storage"].items(), key=lambda i: int(i[0]))
        )
        + ". QLoRA NF4 scaler blocks: "
        + ", ".join(
            f"{size} ({count} layers)" for size, count in _counts(report["nf4_scaler_blocks"])
        )
        + ".",
    ]
    for target in settings["targets"]:
        parts += [
            "",
            f"## {target}",
            "",
            target_table(report["rows"], target, settings),
            "",
            (
                "QA-LoRA vs best fine-tune-then-quantize baseline (both chosen by validation "
                "perplexity; relative difference of QA-LoRA):"
            ),
            "",
        ]
        parts += comparison_lines(report["comparisons"], target, report["storage"]) or ["- none"]
        parts += ["", "Tuned learning rates:", "", lr_table(report["rows"], target)]
    skipped = [r for r in report["rows"] if r.get("skipped")]
    if skipped:
        parts += ["", "## Skipped", ""]
        parts += sorted(
            {
                f"- {r['target']} {_label(r)} {r['bits']}-bit G{r['group_size']}: {r['skipped']}"
                for r in skipped
            }
        )
    return "\n".join(parts) + "\n"


def _counts(blocks: dict[str, int]) -> list[tuple[int, int]]:
    counts: dict[int, int] = {}
    for size in blocks.values():
        counts[size] = counts.get(size, 0) + 1
    return sorted(counts.items(), reverse=True)


def plot(report: dict[str, Any], path: Path) -> None:
    """Test perplexity vs bits per method and quantizer, one panel per target and G."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    panels = [(t, g) for t in settings["targets"] for g in settings["group_sizes"]]
    figure, axes = plt.subplots(
        len(settings["targets"]),
        len(settings["group_sizes"]),
        squeeze=False,
        figsize=(4.5 * len(settings["group_sizes"]), 3.8 * len(settings["targets"])),
    )
    colors = {
        INT_BASE: "tab:gray",
        LORA_PTQ: "tab:blue",
        QLORA_PTQ: "tab:orange",
        QALORA: "tab:green",
        QALORA_DEFAULTS: "tab:olive",
    }
    styles = {"rtn": "-", "hqq": "--", "gptq": ":"}
    for axis, (target, g) in zip(axes.flat, panels):
        rows = [r for r in report["rows"] if r["target"] == target and not r.get("skipped")]
        for method, color in colors.items():
            for quantizer, style in styles.items():
                points = sorted(
                    (r["bits"], r["test_ppl_mean"], r.get("test_ppl_std") or 0.0)
                    for r in rows
                    if r["method"] == method
                    and r["quantizer"] == quantizer
                    and r["group_size"] == g
                    and r.get("test_ppl_mean")
                )
                if points:
                    x, y, err = zip(*points)
                    axis.errorbar(
                        x,
                        y,
                        yerr=err,
                        color=color,
                        linestyle=style,
                        marker="o",
                        markersize=3,
                        label=f"{method} ({quantizer})",
                        capsize=2,
                    )
        for method, style in ((FP32_BASE, "-."), (LORA_FP32, "-")):
            fp = [r for r in rows if r["method"] == method and r.get("test_ppl_mean")]
            if fp:
                axis.axhline(
                    fp[0]["test_ppl_mean"],
                    color="black",
                    linestyle=style,
                    linewidth=0.8,
                    label=method,
                )
        axis.set_title(f"{target}, G={g} ({report['storage'].get(str(g), '?')})", fontsize=9)
        axis.set_xlabel("bits")
        axis.set_ylabel("test perplexity")
        axis.set_yscale("log")
        axis.set_xticks(settings["bits"])
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def environment(argv: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """Library versions, CPU, threads, processes and the command line."""
    import torchao
    import torchtune

    cpu = cpu_model_name()
    return {
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "torchtune": torchtune.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "processes": min(max(args.jobs, 1), len(args.targets)),
        "command": command_line("benchmarks/accuracy.py", argv),
    }

