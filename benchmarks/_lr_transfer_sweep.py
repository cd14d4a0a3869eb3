"""The sweep of ``benchmarks/lr_transfer.py``: points cached in ``points.jsonl``, run in
worker processes, grids extended past an edge, the side studies around each case's best,
and the packaged defaults' own ``tune run`` compared with the sweep."""

import argparse
import json
import math
import multiprocessing
import statistics
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _accuracy_common import best_lr, grid_ratio, lr_extensions
from _lr_transfer_cases import (
    ROOT,
    TINY_PRETRAIN,
    Case,
    _config_floor,
    _config_lr,
    _config_seed,
    _config_warmup,
    _log,
    case_by_name,
    tiny_base_dir,
)
from _lr_transfer_points import Point, _quiet_run_point


class Sweep:
    """Runs points (cached in ``work_dir/points.jsonl``) and collects their scores."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cache_path = args.work_dir / "points.jsonl"
        self.results: dict[str, dict[str, Any]] = {}
        if self.cache_path.is_file() and not args.fresh:
            for line in self.cache_path.read_text().splitlines():
                record = json.loads(line)
                self.results[Point.of(record).key()] = record

    def run(self, points: Sequence[Point]) -> None:
        todo = list(dict.fromkeys(p for p in points if p.key() not in self.results))
        if not todo:
            return
        _log(f"{len(todo)} points to run ({len(points) - len(todo)} cached)")
        if self.args.jobs <= 1:
            for point in todo:
                self._record(_quiet_run_point(point, self.args))
            return
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(self.args.jobs, mp_context=context) as pool:
            for record in pool.map(_quiet_run_point, todo, [self.args] * len(todo)):
                self._record(record)

    def _record(self, record: dict[str, Any]) -> None:
        point = Point.of(record)
        self.results[point.key()] = record
        with self.cache_path.open("a") as cache:
            cache.write(json.dumps(record) + "\n")
        _log(f"{point.case} {point.pooling} lr={point.lr:.3g} seed={point.seed} "
             f"B/A={point.b_lr_ratio:g} floor={point.min_lr_ratio} warmup={point.warmup_steps} "
             f"-> loss {record['loss']} "
             f"({record['cpu_seconds']:.0f} s cpu)")

    def curve(self, case: str, pooling: str, **variant: Any) -> dict[float, float]:
        """Mean validation loss over the seeds, per learning rate (inf if any diverged)."""
        losses: dict[float, list[float]] = {}
        for record in self.results.values():
            point = Point.of(record)
            if (point.case, point.pooling) != (case, pooling) or point.seed not in self.args.seeds:
                continue
            if any(getattr(point, k) != v for k, v in {"b_lr_ratio": 1.0, "min_lr_ratio": None, "warmup_steps": None, **variant}.items()):
                continue
            loss = record["loss"]
            losses.setdefault(point.lr, []).append(math.inf if loss is None else loss)
        return {lr: statistics.fmean(v) for lr, v in sorted(losses.items()) if len(v) == len(self.args.seeds)}

    def sweep(self, curves: Sequence[tuple[str, str, Sequence[float], dict[str, Any]]]) -> None:
        """Every ``(case, pooling, grid, variant)``: each lr of the grid with every seed,
        all in one batch of points; then rounds of one grid step past an edge holding a
        curve's best (``--max-lr-extensions`` per side)."""
        self.run([Point(case, pooling, lr, seed, **variant)
                  for case, pooling, grid, variant in curves for lr in grid for seed in self.args.seeds])
        for _ in range(self.args.max_lr_extensions):
            extra = []
            for case, pooling, grid, variant in curves:
                curve = self.curve(case, pooling, **variant)
                for lr in lr_extensions(grid, {"curve": curve}, self.args.max_lr_extensions):
                    extra += [Point(case, pooling, lr, seed, **variant) for seed in self.args.seeds]
            if not extra:
                break
            self.run(extra)


def prepare_tiny_bases(cases: Sequence[Case], args: argparse.Namespace) -> None:
    """Make every tiny base the cases need, once, before points run in parallel."""
    from qalora_tune.tiny import prepare_tiny_base

    for case in cases:
        if case.config != "tiny_qalora":
            continue
        if case.width is None:
            prepare_tiny_base(str(args.work_dir / "bases" / "tiny_qalora"), seed=0, log=_log)
            continue
        prepare_tiny_base(
            str(tiny_base_dir(args.work_dir, case.width)), seed=0, embed_dim=case.width,
            steps=args.pretrain_steps, batch_size=TINY_PRETRAIN["batch_size"],
            lr=TINY_PRETRAIN["peak_lr_at_width_128"] * math.sqrt(128 / case.width), log=_log,
        )


def run_sweep(args: argparse.Namespace, sweep: Sweep) -> dict[str, Any]:
    """The cross (every case, both parametrizations), then the side studies (sum pooling)
    around each side case's best learning rate."""
    grids = {"mean": args.mean_grid, "sum": args.sum_grid}
    sweep.sweep([(name, pooling, grids[pooling], {}) for name in args.cases for pooling in args.poolings])
    side: dict[str, list[dict[str, Any]]] = {"lora_plus": [], "schedule": []}
    if "sum" not in args.poolings:
        return side
    ratio = grid_ratio(args.sum_grid)
    variants = []  # (study, case, label, variant, grid)
    for name in (n for n in args.lora_plus_cases if n in args.cases):
        best = best_lr(sweep.curve(name, "sum"))
        for b_ratio in args.lora_plus_ratios:
            # centred where lr(A) lr(B) equals the square of the plain optimum
            centre = best / math.sqrt(b_ratio)
            variants.append(("lora_plus", name, f"B/A = {b_ratio:g}", {"b_lr_ratio": b_ratio},
                             [centre / ratio, centre, centre * ratio]))
    for name in (n for n in args.schedule_cases if n in args.cases):
        best = best_lr(sweep.curve(name, "sum"))
        for factor in args.warmup_factors:
            steps = round(factor * _config_warmup(case_by_name(name)))
            variants.append(("schedule", name, f"warmup {steps} steps", {"warmup_steps": steps},
                             [best / ratio, best, best * ratio]))
        for floor in args.schedule_floors:
            variants.append(("schedule", name, f"cosine to {floor:g} x peak", {"min_lr_ratio": floor},
                             [best / ratio, best, best * ratio]))
    sweep.sweep([(name, "sum", grid, variant) for _, name, _, variant, grid in variants])
    for study, name, label, variant, _ in variants:
        plain = sweep.curve(name, "sum")
        if not any(e["case"] == name for e in side[study]):
            case = case_by_name(name)
            reference = ("B/A = 1" if study == "lora_plus" else
                         f"as packaged: warmup {_config_warmup(case)} steps, cosine to "
                         f"{_config_floor(case):g} x peak")
            side[study].append({"case": name, "variant": reference, "best_lr": best_lr(plain),
                                "best_loss": min(plain.values())})
        curve = sweep.curve(name, "sum", **variant)
        side[study].append({"case": name, "variant": label, "best_lr": best_lr(curve),
                            "best_loss": min(curve.values()), "curve": {repr(k): v for k, v in curve.items()}})
    return side


def run_defaults(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Run ``tune run qalora_finetune --config X model.bits=B output_dir=...`` (the packaged
    defaults, nothing else changed) for every packaged-config case of ``--cases``, once per
    seed of ``--seeds`` (``seed=S`` added for a seed other than the config's own), ``--jobs``
    at a time; each case's summary metrics, one per seed, by case name. A finished run whose
    command and config file are unchanged (``defaults.json`` beside its summary) is read,
    not run again."""
    import hashlib
    import shutil
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from qalora_tune.recipe_utils import resolve_config

    tune = str(Path(sys.executable).with_name("tune"))
    cases = [case for case in (case_by_name(n) for n in args.cases) if "config" in case.axes]
    runs = [(case, seed) for case in cases for seed in args.seeds]

    def run(case: Case, seed: int) -> dict[str, Any]:
        own_seed = seed == _config_seed(case.config)
        name = f"{case.config}_b{case.bits}" + ("" if own_seed else f"_seed{seed}")
        output_dir = args.work_dir / "defaults" / name
        command = [tune, "run", "qalora_finetune", "--config", case.config,
                   f"model.bits={case.bits}", *([] if own_seed else [f"seed={seed}"]),
                   f"output_dir={output_dir}"]
        stamp = {"command": command[1:],
                 "config_sha256": hashlib.sha256(Path(resolve_config(case.config)).read_bytes()).hexdigest()}
        stamp_path, summary_path = output_dir / "defaults.json", output_dir / "summary.json"
        if stamp_path.is_file() and summary_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
            return json.loads(summary_path.read_text())["metrics"]
        shutil.rmtree(output_dir, ignore_errors=True)
        sweep_base = args.work_dir / "bases" / "tiny_qalora"
        if case.config == "tiny_qalora" and (sweep_base / "TINY_BASE_COMPLETE").is_file():
            # the config's prepare_base (${output_dir}/base, seed 0) makes this same base; the
            # recipe reuses a finished one, as on a second run, and the sweep trained on it
            shutil.copytree(sweep_base, output_dir / "base")
        # from inside shared/, the configs' ../shared/... is shared/ itself
        result = subprocess.run(command, cwd=args.shared if args.shared.is_dir() else ROOT,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        stamp_path.write_text(json.dumps(stamp))
        _log(f"defaults {case.name}: ran {' '.join(command[1:])}")
        return json.loads(summary_path.read_text())["metrics"]

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        metrics = list(pool.map(lambda pair: run(*pair), runs))
    by_case: dict[str, list[dict[str, Any]]] = {case.name: [] for case in cases}
    for (case, _), found in zip(runs, metrics):
        by_case[case.name].append(found)
    return by_case


def check_defaults(args: argparse.Namespace, sweep: Sweep) -> list[dict[str, Any]]:
    """The packaged defaults (:func:`run_defaults`, one run per seed) against the best of
    each case's sweep, both as the mean over the same seeds (of the loss, so the geometric
    mean of perplexities): perplexity for text, loss for the tiny task."""
    rows = []
    for name, runs in run_defaults(args).items():
        case = case_by_name(name)
        curve = sweep.curve(case.name, "sum")
        best = best_lr(curve)
        text = case.config != "tiny_qalora"  # text: perplexity; the tiny task: loss
        metric = "perplexity" if text else "loss"

        def mean(values: list[float]) -> float:
            if text:
                return math.exp(sum(math.log(v) for v in values) / len(values))
            return sum(values) / len(values)

        per_seed = [found["QA-LoRA"][metric] for found in runs]
        default = mean(per_seed)
        reference = math.exp(curve[best]) if text else curve[best]
        rows.append({
            "case": case.name,
            "command": "tune run qalora_finetune --config " + f"{case.config} model.bits={case.bits}",
            "metric": "validation perplexity" if text else "validation loss",
            "default_lr": _config_lr(case.config),
            "seeds": list(args.seeds),
            "default_per_seed": per_seed,
            "default": default,
            "merged_int4": mean([found["QA-LoRA merged int4"][metric] for found in runs]),
            "best_lr": best,
            "best": reference,
            "excess": default / reference - 1.0,
        })
        _log(f"defaults {case.name}: {default:.4g} vs best {reference:.4g} at lr {best:.3g}")
    return rows
