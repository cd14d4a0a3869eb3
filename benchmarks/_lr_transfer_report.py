"""The analysis and report of ``benchmarks/lr_transfer.py``: each curve's optimum, the
transfer along each axis, the markdown summary and the plot."""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _accuracy_common import best_lr, is_bracketed
from _lr_transfer_cases import AXES, CASES, Case, case_by_name
from _lr_transfer_sweep import Sweep


def log_parabola_minimum(curve: dict[float, float]) -> float:
    """The learning rate at the minimum of a parabola through the best grid point and its
    two neighbours, in log(lr) (the grid point itself at an edge or with a flat top)."""
    lrs = sorted(lr for lr in curve if math.isfinite(curve[lr]))
    best = best_lr({lr: curve[lr] for lr in lrs})
    i = lrs.index(best)
    if i == 0 or i == len(lrs) - 1:
        return best
    (x0, x1, x2), (y0, y1, y2) = ([math.log(lrs[j]) for j in (i - 1, i, i + 1)],
                                  [curve[lrs[j]] for j in (i - 1, i, i + 1)])
    denominator = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denominator
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denominator
    if a <= 0:
        return best
    return math.exp(min(max(-b / (2 * a), x0), x2))


def single_rate_regret(curves: dict[str, dict[float, float]]) -> dict[str, Any]:
    """The one learning rate (among those every case ran) with the smallest worst-case
    excess loss over each case's own best, and that excess per case (relative)."""
    shared = set.intersection(*(set(c) for c in curves.values())) if curves else set()
    best = {case: min(c.values()) for case, c in curves.items()}

    def worst(lr: float) -> float:
        return max(curves[case][lr] / best[case] - 1.0 for case in curves)

    if not shared:
        return {"lr": None, "worst_excess": None, "excess": {}}
    lr = min(sorted(shared), key=worst)
    return {
        "lr": lr,
        "worst_excess": worst(lr),
        "excess": {case: curves[case][lr] / best[case] - 1.0 for case in curves},
    }


def analyse(sweep: Sweep, cases: Sequence[Case], poolings: Sequence[str]) -> dict[str, Any]:
    """Per case and pooling: the curve, best grid lr, interpolated optimum, bracketing;
    per axis and pooling: the spread of the optima and the best single rate's regret."""
    per_case: dict[str, dict[str, Any]] = {}
    for case in cases:
        per_case[case.name] = {}
        for pooling in poolings:
            curve = sweep.curve(case.name, pooling)
            if not curve or not any(math.isfinite(v) for v in curve.values()):
                continue
            per_case[case.name][pooling] = {
                "curve": {repr(lr): (v if math.isfinite(v) else None) for lr, v in curve.items()},
                "best_lr": best_lr(curve),
                "optimum_lr": log_parabola_minimum(curve),
                "best_loss": min(curve.values()),
                "bracketed": is_bracketed(curve),
            }
    per_axis: dict[str, dict[str, Any]] = {}
    for axis in AXES:
        members = [c.name for c in cases if axis in c.axes]
        per_axis[axis] = {}
        for pooling in poolings:
            found = {m: per_case[m][pooling] for m in members if pooling in per_case.get(m, {})}
            if len(found) < 2:
                continue
            optima = [f["optimum_lr"] for f in found.values()]
            curves = {m: {float(lr): (math.inf if v is None else v) for lr, v in f["curve"].items()}
                      for m, f in found.items()}
            per_axis[axis][pooling] = {
                "optima": {m: f["optimum_lr"] for m, f in found.items()},
                "optimum_spread": max(optima) / min(optima),
                "single_rate": single_rate_regret(curves),
            }
    return {"cases": per_case, "axes": per_axis}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def markdown_report(report: dict[str, Any]) -> str:
    """The command, the design, then per axis the optima of both parametrizations."""
    analysis, settings = report["analysis"], report["settings"]
    lines = [
        f"`{report['environment']['command']}`",
        "",
        f"{len(report['points'])} training runs of the `qalora_finetune` recipe; seeds "
        f"{settings['seeds']}; {report['environment']['cpu']}, {settings['jobs']} process(es) of "
        f"{settings['threads']} thread(s); {report['cpu_seconds'] / 3600:.2f} CPU-hours "
        f"({report['wall_seconds'] / 3600:.2f} h wall).",
        "",
        "## Optimal learning rate per case",
        "",
        "| case | axes | " + " | ".join(f"{p}: best lr (interpolated), loss" for p in settings["poolings"])
        + " | A p / LoRA's A x at init, sum (mean) |",
        "|---|---|" + "---|" * len(settings["poolings"]) + "---|",
    ]
    for name, found in analysis["cases"].items():
        axes = ", ".join(a for a in case_by_name(name).axes)
        scale = report.get("input_scale", {}).get(name)
        scale_cell = "–" if scale is None else (
            f"{scale['sum']['median']:.2f} [{scale['sum']['min']:.2f}-{scale['sum']['max']:.2f}] "
            f"({scale['mean']['median']:.3f})")
        cells = []
        for pooling in settings["poolings"]:
            f = found.get(pooling)
            cells.append("–" if f is None else
                         f"{f['best_lr']:.3g} ({f['optimum_lr']:.3g}), {f['best_loss']:.4f}"
                         + ("" if f["bracketed"] else " (edge)"))
        lines.append(f"| {name} | {axes} | " + " | ".join(cells) + f" | {scale_cell} |")
    lines += ["", "Interpolated: the minimum of a parabola in log(lr) through the best grid point "
              "and its neighbours. Init scale: median [range] over the adapted linears, on the "
              "first validation batch.", "", "## Transfer along each axis", "",
              "Spread: largest over smallest interpolated optimum. Single rate: the one grid "
              "learning rate with the smallest worst-case excess validation loss over each "
              "case's own best (and that worst case).", "",
              "| axis | " + " | ".join(f"{p}: spread / single rate (worst excess)" for p in settings["poolings"]) + " |",
              "|---|" + "---|" * len(settings["poolings"])]
    for axis, found in analysis["axes"].items():
        cells = []
        for pooling in settings["poolings"]:
            f = found.get(pooling)
            cells.append("–" if f is None else
                         f"{f['optimum_spread']:.2f}x / {f['single_rate']['lr']:.3g} "
                         f"({_pct(f['single_rate']['worst_excess'])})")
        lines.append(f"| {AXES[axis]} | " + " | ".join(cells) + " |")
    if report.get("defaults"):
        lines += ["", "## The packaged defaults (no lr override)", "",
                  "Each default is run once per seed (the config's own, then `seed=S`); default "
                  "and best are means over the same seeds (of the loss: geometric means of "
                  "perplexities).", "",
                  "| command | metric | default lr | default, mean of seeds (merged int4) | "
                  "per seed | best lr in the sweep | best (mean of seeds) | default vs best |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in report["defaults"]:
            per_seed = ", ".join(f"{v:.4f}" for v in row.get("default_per_seed", [row["default"]]))
            lines.append(
                f"| `{row['command']}` | {row['metric']} | {row['default_lr']:.3g} | "
                f"{row['default']:.4f} ({row['merged_int4']:.4f}) | {per_seed} | "
                f"{row['best_lr']:.3g} | {row['best']:.4f} | {_pct(row['excess'])} |")
    for title, key in (("LoRA+ (lr of B / lr of A)", "lora_plus"), ("Schedule floor", "schedule")):
        side = report.get(key) or {}
        if not side:
            continue
        lines += ["", f"## {title}", "", "| case | variant | best lr | best loss |", "|---|---|---|---|"]
        for entry in side:
            lines.append(f"| {entry['case']} | {entry['variant']} | {entry['best_lr']:.3g} | "
                         f"{entry['best_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Loss relative to each case's best against the learning rate: one row per axis, one
    column per parametrization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis, poolings = report["analysis"], report["settings"]["poolings"]
    measured = {name for name, found in analysis["cases"].items() if found}
    axes_shown = [a for a in AXES if a != "config" and any(
        a in c.axes and c.name in measured for c in CASES)]
    if not axes_shown:
        return
    figure, grid = plt.subplots(len(axes_shown), len(poolings), squeeze=False,
                                figsize=(5.5 * len(poolings), 3.2 * len(axes_shown)))
    for row, axis in enumerate(axes_shown):
        for column, pooling in enumerate(poolings):
            ax = grid[row][column]
            for case in (c for c in CASES if axis in c.axes):
                found = analysis["cases"].get(case.name, {}).get(pooling)
                if found is None:
                    continue
                points = sorted((float(lr), v / found["best_loss"]) for lr, v in found["curve"].items()
                                if v is not None)
                line, = ax.plot(*zip(*points), marker="o", label=case.name)
                ax.axvline(found["optimum_lr"], color=line.get_color(), linestyle=":", linewidth=1)
            ax.set_xscale("log")
            ax.set_ylim(0.995, 1.25)
            ax.set_title(f"{pooling} pooling: {AXES[axis]}", fontsize=9)
            ax.set_xlabel("learning rate")
            ax.set_ylabel("val loss / case best")
            ax.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
