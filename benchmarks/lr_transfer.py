"""Learning-rate transfer of QA-LoRA's pooled adapter: mean pooling (earlier qalora-tune)
against sum pooling with LoRA's initialisation of A (this version).

    python benchmarks/lr_transfer.py --jobs 2 --json docs/results/lr_transfer.json \\
        --markdown docs/results/lr_transfer.md --plot docs/results/lr_transfer.png
    python benchmarks/lr_transfer.py --quick        # two points of one small case (the test)

Every point is one run of the project's own recipe (``recipes/qalora_finetune.py``, run
in this process from a packaged config with ``key=value`` overrides, as ``tune run
qalora_finetune --config NAME key=value ...`` would), so what is measured is the packaged
training loop: its data, optimizer (AdamW), schedule and validation. A point's score is
the validation loss after training (the config's validation set; perplexity is its
exponential). Only the learning rate, the seed, the pooling, and the case's knobs change.

Parametrizations (``--poolings``):

- ``mean``: the adapter's input is the group average, ``A`` is ``nn.Linear``'s default on
  its ``(rank, n_groups)`` shape (earlier qalora-tune);
- ``sum``: the group sum, ``A`` drawn as torchtune's LoRA draws a ``(rank, in_dim)`` A
  (this version's ``QALoRALinear``; ``docs/design.md`` section 2 gives the reason).

Design: a full factorial over model, width, group size, rank and bit width is too
expensive for one CPU core, so the cases form a *cross*: a centre point, and each axis
swept around it with the other knobs at the centre's values (``CASES``):

- tiny bases of widths 128-1024 (``qalora_tune.tiny``: the embedded task's architecture, 2
  layers, one head per 32 features, feed-forward 2x; random init, then pretrained briefly
  on the task: ``TINY_PRETRAIN``), fine-tuned on the same task (``TINY_PROTOCOL``);
  centre width 512, G=64, 2 bits, rank 8, alpha 16; axes: width, G, bits, rank;
- the packaged shared-model configs (``stories260K_qalora``, ``tinystories656K_qalora``:
  Tiny Shakespeare, their own steps and batches) and ``tiny_qalora`` at 2 and 4 bits, and
  tinystories656K at G=64 and 128.

Each case runs every learning rate of its pooling's grid (``--mean-grid``, ``--sum-grid``,
extended by a grid step past an edge while the best is there, ``--max-lr-extensions``)
with every seed (``--seeds``; the seed draws the adapter's initialisation and the data
order). Side studies at a few cases: separate learning rates for ``B`` and ``A``
(LoRA+, ``--lora-plus-ratios``) and the schedule's floor (``--schedule-floors``).

Results are cached one line per point in ``--work-dir``/points.jsonl, so an interrupted
sweep resumes where it stopped. Outputs: a markdown summary on stdout, ``--json``
(environment, settings, every point, the analysis), ``--markdown`` and ``--plot``
(validation loss relative to each case's best against the learning rate, per axis, the
two parametrizations side by side).
"""

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch

from _accuracy_common import best_lr, grid_ratio, is_bracketed, lr_extensions
from _report import (
    add_output_arguments,
    command_line,
    cpu_model_name,
    parse_with_quick,
    publish,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = ROOT.parent / "shared"
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "qalora-tune" / "lr_transfer"
POOLINGS = ("mean", "sum")

TINY_PRETRAIN = {"steps": 300, "batch_size": 32, "peak_lr_at_width_128": 5e-3}
"""Pretraining of the wider tiny bases (random init, then this; peak lr scaled by
sqrt(128 / width)): brief, so the bases know the task's format and part of its glossary."""

TINY_PROTOCOL = {
    "max_steps_per_epoch": 100,
    "batch_size": 16,
    "dataset.num_examples": 4000,
    "validation.dataset.num_examples": 500,
    "lr_scheduler.num_warmup_steps": 10,
}
"""Fine-tuning of the tiny-width cases (``tiny_qalora`` with these overrides)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One setting whose loss-vs-learning-rate curve is measured."""

    name: str
    config: str
    axes: tuple[str, ...]
    group_size: int
    bits: int
    rank: int
    alpha: float
    width: int | None = None  # a tiny base of this width (None: the config's own model)
    overrides: tuple[str, ...] = ()

    def key(self) -> str:
        return self.name


def _tiny(width: int, group_size: int = 64, bits: int = 2, rank: int = 8, axes=()) -> Case:
    return Case(
        f"tiny w{width} G{group_size} b{bits} r{rank}", "tiny_qalora", tuple(axes),
        group_size, bits, rank, 16.0, width=width,
    )


def _config(config: str, group_size: int, bits: int, rank: int, alpha: float, axes=()) -> Case:
    return Case(f"{config} G{group_size} b{bits}", config, tuple(axes), group_size, bits, rank, alpha)


CASES: tuple[Case, ...] = (
    _config("tiny_qalora", 32, 2, 8, 16.0, axes=("config", "model")),
    _config("tiny_qalora", 32, 4, 8, 16.0, axes=("config",)),
    _config("stories260K_qalora", 32, 2, 2, 4.0, axes=("config", "model")),
    _config("stories260K_qalora", 32, 4, 2, 4.0, axes=("config",)),
    _config("tinystories656K_qalora", 32, 2, 4, 8.0, axes=("config", "model", "shared_group_size")),
    _config("tinystories656K_qalora", 32, 4, 4, 8.0, axes=("config",)),
    _config("tinystories656K_qalora", 64, 2, 4, 8.0, axes=("shared_group_size",)),
    _config("tinystories656K_qalora", 128, 2, 4, 8.0, axes=("shared_group_size",)),
    _tiny(128, axes=("width",)),
    _tiny(256, axes=("width",)),
    _tiny(512, axes=("centre", "width", "group_size", "rank")),
    _tiny(512, group_size=32, axes=("group_size",)),
    _tiny(512, group_size=128, axes=("group_size",)),
    _tiny(512, rank=2, axes=("rank",)),
    _tiny(512, rank=32, axes=("rank",)),
    _tiny(1024, axes=("width",)),
)
"""The cross, cheapest first: the packaged configs (their own protocols, at 2 and 4 bits),
then the tiny widths around the centre (width 512, G=64, 2 bits, rank 8, alpha 16)."""

AXES = {
    "width": "tiny base width (G=64, 2 bits, rank 8)",
    "group_size": "group size G (tiny w512, 2 bits, rank 8)",
    "rank": "rank at alpha 16 (tiny w512, G=64, 2 bits)",
    "shared_group_size": "group size G (tinystories656K config, 2 bits)",
    "model": "model (packaged configs, 2 bits)",
    "config": "packaged configs at 2 and 4 bits",
}

QUICK_DEFAULTS = {
    "cases": ["tiny w128 G64 b2 r8"],
    "seeds": [0],
    "mean_grid": [0.1],
    "sum_grid": [0.03],
    "max_lr_extensions": 0,
    "lora_plus_ratios": [4.0],
    "schedule_floors": [0.1],
    "warmup_factors": [2.0],
    "lora_plus_cases": ["tiny w128 G64 b2 r8"],
    "schedule_cases": ["tiny w128 G64 b2 r8"],
    "steps": 3,
    "pretrain_steps": 10,
    "jobs": 1,
}


def _log(message: str) -> None:
    print(f"[lr_transfer {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- components


def adapted_model(
    builder: str, pooling: str = "sum", embed_dim: int | None = None, **knobs: Any
) -> torch.nn.Module:
    """A config component: the QA-LoRA model of ``builder`` (a model builder's import path)
    or, with ``embed_dim``, a tiny base of that width, with its adapters in ``pooling``.

    ``sum`` is what the builders make (nothing changes: the point equals ``tune run``);
    ``mean`` switches every adapter to mean pooling and draws its ``A`` again in that
    convention (earlier qalora-tune's initialisation).
    """
    from torchtune.models.llama2 import llama2

    from qalora_tune._compat import get_component_from_path
    from qalora_tune.models import qalora_transformer
    from qalora_tune.tiny import tiny_llama_sizes

    if embed_dim is not None:
        knobs.setdefault("lora_attn_modules", [])
        model = qalora_transformer(partial(llama2, **tiny_llama_sizes(embed_dim)), **knobs)
    else:
        model = get_component_from_path(builder)(**knobs)
    return use_pooling(model, pooling)


def use_pooling(model: torch.nn.Module, pooling: str) -> torch.nn.Module:
    """Switch every QA-LoRA adapter of ``model`` to ``pooling`` (``sum``: what the builders
    make; ``mean``: earlier qalora-tune's parametrization), drawing ``A`` again in that
    convention where it changes."""
    from qalora_tune.modules import QALoRALinear

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    for module in model.modules():
        if isinstance(module, QALoRALinear) and module.pooling != pooling:
            module.pooling = pooling
            module.initialize_parameters()
    return model


def adamw_lora_plus(params: Iterable[torch.nn.Parameter], lr: float, b_lr_ratio: float = 1.0,
                    **kwargs: Any) -> torch.optim.AdamW:
    """A config component: AdamW with ``lr`` on the adapters' ``A`` and ``b_lr_ratio * lr``
    on their ``B`` (LoRA+). ``B`` is told apart by shape: ``(out_dim, rank)`` with the
    rank as its second dimension, the first of ``A``'s (parameters come in A, B order)."""
    params = list(params)
    a_params, b_params = params[0::2], params[1::2]
    if any(a.shape[0] != b.shape[1] for a, b in zip(a_params, b_params)):
        raise ValueError("adamw_lora_plus expects the adapter parameters as A, B pairs")
    groups = [{"params": a_params, "lr": lr}, {"params": b_params, "lr": lr * b_lr_ratio}]
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


# ------------------------------------------------------------------------- one point


@dataclasses.dataclass(frozen=True)
class Point:
    """One training run: a case, a parametrization, a learning rate, a seed, a variant."""

    case: str
    pooling: str
    lr: float
    seed: int
    b_lr_ratio: float = 1.0
    min_lr_ratio: float | None = None  # None: the config's schedule (cosine to zero)
    warmup_steps: int | None = None  # None: the config's warmup

    @classmethod
    def of(cls, record: dict[str, Any]) -> "Point":
        """The point of a result record (fields added later take their defaults)."""
        return cls(**{f.name: record.get(f.name, f.default) for f in dataclasses.fields(cls)})

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def case_by_name(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise ValueError(f"unknown case {name!r}; cases: {[c.name for c in CASES]}")


def tiny_base_dir(work_dir: Path, width: int) -> Path:
    return work_dir / "bases" / f"w{width}"


def point_overrides(point: Point, args: argparse.Namespace, output_dir: Path) -> list[str]:
    """The ``key=value`` overrides of the case's packaged config that make ``point``."""
    case = case_by_name(point.case)
    builder = "qalora_tune.tiny.qalora_tiny_llama"
    overrides = [
        f"output_dir={output_dir}",
        f"metric_logger.log_dir={output_dir}/logs",
        "log_every_n_steps=1000",
        "save_merged_int4=False",
        "validation.full_precision_baseline=False",
        f"seed={point.seed}",
        f"optimizer.lr={point.lr!r}",
        f"model.group_size={case.group_size}",
        f"model.bits={case.bits}",
        f"model.lora_rank={case.rank}",
        f"model.lora_alpha={case.alpha!r}",
    ]
    if case.config == "tiny_qalora":
        base = tiny_base_dir(args.work_dir, case.width or 128)
        if case.width is None:
            base = args.work_dir / "bases" / "tiny_qalora"  # the config's own base (700 steps)
        overrides += [
            f"prepare_base.checkpoint_dir={base}",
            f"checkpointer.checkpoint_dir={base}",
            f"tokenizer.path={base}/tiny_tokenizer.json",
        ]
    if case.width is not None:
        peak = TINY_PRETRAIN["peak_lr_at_width_128"] * math.sqrt(128 / case.width)
        overrides += [
            f"prepare_base.embed_dim={case.width}",
            f"prepare_base.steps={args.pretrain_steps}",
            f"prepare_base.batch_size={TINY_PRETRAIN['batch_size']}",
            f"prepare_base.lr={peak!r}",
            f"model.embed_dim={case.width}",
            *(f"{k}={v}" for k, v in TINY_PROTOCOL.items()),
        ]
    overrides.append(f"model.builder={builder_of(case, builder)}")
    overrides += ["model._component_=lr_transfer.adapted_model", f"model.pooling={point.pooling}"]
    if point.b_lr_ratio != 1.0:
        overrides += ["optimizer._component_=lr_transfer.adamw_lora_plus",
                      f"optimizer.b_lr_ratio={point.b_lr_ratio!r}"]
    if point.min_lr_ratio is not None:
        overrides += ["lr_scheduler._component_=qalora_tune.recipe_utils.get_cosine_schedule_with_floor",
                      f"lr_scheduler.min_lr_ratio={point.min_lr_ratio!r}"]
    if point.warmup_steps is not None:
        overrides.append(f"lr_scheduler.num_warmup_steps={point.warmup_steps}")
    if args.steps is not None:
        overrides.append(f"max_steps_per_epoch={args.steps}")
    return [*overrides, *case.overrides]


def builder_of(case: Case, default: str) -> str:
    """The model builder a case's config names (the tiny widths build their own)."""
    from omegaconf import OmegaConf

    from qalora_tune.recipe_utils import resolve_config

    if case.width is not None:
        return default
    return OmegaConf.load(resolve_config(case.config)).model._component_


def _recipe(point: Point, args: argparse.Namespace, output_dir: Path) -> Any:
    """The recipe of ``point``, set up (config checked as ``tune run`` checks it)."""
    from omegaconf import OmegaConf

    import qalora_finetune
    from qalora_tune.recipe_utils import check_config, resolve_config

    case = case_by_name(point.case)
    overrides = point_overrides(point, args, output_dir)
    cfg = OmegaConf.merge(OmegaConf.load(resolve_config(case.config)), OmegaConf.from_dotlist(overrides))
    cfg = OmegaConf.create(_rebase_shared(OmegaConf.to_container(cfg), args.shared))
    check_config(cfg, qalora_finetune.CONFIG_KEYS, "qalora_finetune")
    recipe = qalora_finetune.QALoRAFinetuneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    return recipe


def run_point(point: Point, args: argparse.Namespace) -> dict[str, Any]:
    """Train one point with the recipe, in this process; its validation metrics."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lr_point_", dir=args.work_dir) as output_dir:
        start_cpu, start = time.process_time(), time.perf_counter()
        recipe = _recipe(point, args, Path(output_dir))
        try:
            recipe.train()
            recipe.summary()
            metrics = json.loads((Path(output_dir) / "summary.json").read_text())["metrics"]["QA-LoRA"]
            loss = metrics["loss"]
        except Exception as error:  # a diverged run (non-finite loss) is a result, not a crash
            if "loss became" not in str(error):
                raise
            loss, metrics = math.inf, {}
        finally:
            recipe.cleanup()
    return {
        **dataclasses.asdict(point),
        "loss": loss if math.isfinite(loss) else None,
        "perplexity": metrics.get("perplexity"),
        "accuracy": metrics.get("accuracy"),
        "cpu_seconds": round(time.process_time() - start_cpu, 2),
        "wall_seconds": round(time.perf_counter() - start, 2),
    }


@torch.no_grad()
def pooled_input_scale(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """How large each adapter's ``A p`` is at initialisation next to LoRA's ``A x`` on the
    same inputs (the case's first validation batch, through the int4 base):
    ``sqrt(E|p_sum|^2 / E|x|^2)`` with sum pooling (1 when the inputs of a group are
    uncorrelated, up to ``sqrt(G)`` when they are equal), ``sqrt(G)`` times less with mean
    pooling. Median and range over the adapted linears."""
    from qalora_tune.modules import QALoRALinear

    ratios: list[float] = []

    def record(module: QALoRALinear, inputs: tuple[torch.Tensor, ...]) -> None:
        x = module.pad_input(inputs[0]).double()
        pooled = x.unflatten(-1, (-1, module.group_size)).sum(-1)
        ratios.append((pooled.pow(2).sum() / x.pow(2).sum()).item())

    with tempfile.TemporaryDirectory(prefix="lr_stats_", dir=args.work_dir) as output_dir:
        recipe = _recipe(Point(case.name, "sum", 1e-3, args.seeds[0]), args, Path(output_dir))
        try:  # the recipe's model and validation data (its own attributes)
            layers = [m for m in recipe._model.modules() if isinstance(m, QALoRALinear)]
            handles = [layer.register_forward_pre_hook(record) for layer in layers]
            recipe._model.eval()(next(iter(recipe._val_dataloader))["tokens"])
            for handle in handles:
                handle.remove()
        finally:
            recipe.cleanup()
    scales = sorted(math.sqrt(r) for r in ratios)
    return {
        "sum": {"median": statistics.median(scales), "min": scales[0], "max": scales[-1]},
        "mean": {k: v / math.sqrt(case.group_size) for k, v in
                 {"median": statistics.median(scales), "min": scales[0], "max": scales[-1]}.items()},
    }


def _rebase_shared(node: Any, shared: Path) -> Any:
    """The config with every ``../shared/...`` path (the packaged configs' spelling,
    relative to the project root) moved under ``shared``."""
    if isinstance(node, dict):
        return {k: _rebase_shared(v, shared) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase_shared(v, shared) for v in node]
    if isinstance(node, str) and node.startswith("../shared/"):
        return str(shared / node[len("../shared/"):])
    return node


def _quiet_run_point(point: Point, args: argparse.Namespace) -> dict[str, Any]:
    """run_point in a worker: torchtune's per-run INFO lines silenced."""
    import logging

    logging.getLogger("torchtune").setLevel(logging.WARNING)
    return run_point(point, args)


# ------------------------------------------------------------------------- the sweep


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


# ------------------------------------------------------------------------- analysis


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


# ------------------------------------------------------------------------- report


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
                  "| command | metric | default lr | default (merged int4) | best lr in the sweep | "
                  "best (mean of seeds) | default vs best |", "|---|---|---|---|---|---|---|"]
        for row in report["defaults"]:
            lines.append(
                f"| `{row['command']}` | {row['metric']} | {row['default_lr']:.3g} | "
                f"{row['default']:.4f} ({row['merged_int4']:.4f}) | {row['best_lr']:.3g} | "
                f"{row['best']:.4f} | {_pct(row['excess'])} |")
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


# ------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared/ folder")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="tiny bases, the point cache and scratch outputs")
    parser.add_argument("--fresh", action="store_true", help="ignore the point cache")
    parser.add_argument("--cases", nargs="+", default=[c.name for c in CASES])
    parser.add_argument("--poolings", nargs="+", choices=POOLINGS, default=list(POOLINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--mean-grid", nargs="+", type=float,
                        default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--sum-grid", nargs="+", type=float,
                        default=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--max-lr-extensions", type=int, default=2)
    parser.add_argument("--lora-plus-ratios", nargs="*", type=float, default=[4.0, 16.0],
                        help="lr(B) / lr(A) ratios measured at --lora-plus-cases (sum pooling)")
    parser.add_argument("--lora-plus-cases", nargs="*",
                        default=["tinystories656K_qalora G32 b2", "tiny w512 G64 b2 r8"])
    parser.add_argument("--schedule-floors", nargs="*", type=float, default=[0.1],
                        help="cosine floors (fraction of the peak) measured at --schedule-cases")
    parser.add_argument("--warmup-factors", nargs="*", type=float, default=[3.0],
                        help="warmups (times the case's own) measured at --schedule-cases")
    parser.add_argument("--schedule-cases", nargs="*",
                        default=["tiny_qalora G32 b2", "tiny_qalora G32 b4", "stories260K_qalora G32 b2",
                                 "tinystories656K_qalora G32 b2", "tiny w512 G64 b2 r8"])
    parser.add_argument("--check-defaults", action="store_true",
                        help="also run each packaged-config case's real tune run command with "
                        "its defaults and compare it with the sweep's best")
    parser.add_argument("--steps", type=int, default=None,
                        help="override every case's steps (the --quick test)")
    parser.add_argument("--pretrain-steps", type=int, default=TINY_PRETRAIN["steps"],
                        help="pretraining steps of the tiny-width bases")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="processes running points")
    parser.add_argument("--quick", action="store_true", help="two points of one case (the test)")
    add_output_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--quick`` changes the defaults, explicit options win."""
    parser = build_parser()
    args = parse_with_quick(parser, QUICK_DEFAULTS, argv)
    known = {c.name for c in CASES}
    for name in [*args.cases, *args.lora_plus_cases, *args.schedule_cases]:
        if name not in known:
            parser.error(f"unknown case {name!r}; cases: {sorted(known)}")
    if any(lr <= 0 for lr in args.mean_grid + args.sum_grid):
        parser.error("learning rates must be positive")
    return args


def _shared_needed(cases: Sequence[Case]) -> bool:
    return any(case.config != "tiny_qalora" for case in cases)


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
            reference = "B/A = 1" if study == "lora_plus" else "cosine to 0"
            side[study].append({"case": name, "variant": reference, "best_lr": best_lr(plain),
                                "best_loss": min(plain.values())})
        curve = sweep.curve(name, "sum", **variant)
        side[study].append({"case": name, "variant": label, "best_lr": best_lr(curve),
                            "best_loss": min(curve.values()), "curve": {repr(k): v for k, v in curve.items()}})
    return side


def run_defaults(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run ``tune run qalora_finetune --config X model.bits=B output_dir=...`` (the packaged
    defaults, nothing else changed) for every packaged-config case of ``--cases``, ``--jobs``
    at a time; their summary metrics by case name. A finished run whose command and config
    file are unchanged (``defaults.json`` beside its summary) is read, not run again."""
    import hashlib
    import shutil
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from qalora_tune.recipe_utils import resolve_config

    tune = str(Path(sys.executable).with_name("tune"))
    cases = [case for case in (case_by_name(n) for n in args.cases) if "config" in case.axes]

    def run(case: Case) -> dict[str, Any]:
        output_dir = args.work_dir / "defaults" / f"{case.config}_b{case.bits}"
        command = [tune, "run", "qalora_finetune", "--config", case.config,
                   f"model.bits={case.bits}", f"output_dir={output_dir}"]
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
        return dict(zip((c.name for c in cases), pool.map(run, cases)))


def check_defaults(args: argparse.Namespace, sweep: Sweep) -> list[dict[str, Any]]:
    """The packaged defaults (:func:`run_defaults`) against the best of each case's sweep
    (sum pooling, mean over seeds): perplexity for text, loss for the tiny task."""
    rows = []
    for name, metrics in run_defaults(args).items():
        case = case_by_name(name)
        curve = sweep.curve(case.name, "sum")
        best = best_lr(curve)
        text = case.config != "tiny_qalora"  # text: perplexity; the tiny task: loss
        default = metrics["QA-LoRA"]["perplexity" if text else "loss"]
        reference = math.exp(curve[best]) if text else curve[best]
        rows.append({
            "case": case.name,
            "command": "tune run qalora_finetune --config " + f"{case.config} model.bits={case.bits}",
            "metric": "validation perplexity" if text else "validation loss",
            "default_lr": _config_lr(case.config),
            "default": default,
            "merged_int4": metrics["QA-LoRA merged int4"]["perplexity" if text else "loss"],
            "best_lr": best,
            "best": reference,
            "excess": default / reference - 1.0,
        })
        _log(f"defaults {case.name}: {default:.4g} vs best {reference:.4g} at lr {best:.3g}")
    return rows


def _config_warmup(case: Case) -> int:
    """The warmup steps a case trains with (the tiny widths: ``TINY_PROTOCOL``)."""
    from omegaconf import OmegaConf

    from qalora_tune.recipe_utils import resolve_config

    if case.width is not None:
        return int(TINY_PROTOCOL["lr_scheduler.num_warmup_steps"])
    return int(OmegaConf.load(resolve_config(case.config)).lr_scheduler.num_warmup_steps)


def _config_lr(config: str) -> float:
    from omegaconf import OmegaConf

    from qalora_tune.recipe_utils import resolve_config

    return float(OmegaConf.load(resolve_config(config)).optimizer.lr)


def environment(argv: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    import platform

    import torchao
    import torchtune

    return {
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "torchtune": torchtune.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "command": command_line("benchmarks/lr_transfer.py", argv),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweep (or read it from the cache); print and write the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cases = [case_by_name(name) for name in args.cases]
    if _shared_needed(cases) and not (args.shared / "models").is_dir():
        raise SystemExit(
            f"lr_transfer: error: {args.shared / 'models'} not found; the shared-model cases "
            "need ../shared (pass --shared PATH, or --cases with tiny cases only)"
        )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prepare_tiny_bases(cases, args)
    sweep = Sweep(args)
    side = run_sweep(args, sweep)
    wanted = {c.name for c in cases}
    points = [r for r in sweep.results.values() if r["case"] in wanted and r["seed"] in args.seeds]
    report = {
        "environment": environment(argv, args),
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
               if k not in ("json", "markdown", "plot")},
            "tiny_pretrain": TINY_PRETRAIN,
            "tiny_protocol": TINY_PROTOCOL,
            "cases": [dataclasses.asdict(c) for c in cases],
        },
        "points": points,
        "analysis": analyse(sweep, cases, args.poolings),
        "input_scale": {case.name: pooled_input_scale(case, args) for case in cases},
        "defaults": check_defaults(args, sweep) if args.check_defaults else [],
        **side,
        "cpu_seconds": sum(r["cpu_seconds"] for r in points),
        "wall_seconds": time.perf_counter() - start,
    }
    publish(report, markdown_report(report), args, plot)
    return report


if __name__ == "__main__":
    main()
