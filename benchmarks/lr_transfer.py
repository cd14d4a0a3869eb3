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
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from _lr_transfer_cases import (
    AXES,
    CASES,
    DEFAULT_SHARED,
    DEFAULT_WORK_DIR,
    POOLINGS,
    TINY_PRETRAIN,
    TINY_PROTOCOL,
    Case,
    _config_lr,
    _config_seed,
    adamw_lora_plus,
    adapted_model,
    case_by_name,
    use_pooling,
)
from _lr_transfer_points import (
    Point,
    _quiet_run_point,
    _rebase_shared,
    point_overrides,
    pooled_input_scale,
    run_point,
)
from _lr_transfer_report import analyse, log_parabola_minimum, markdown_report, plot, single_rate_regret
from _lr_transfer_sweep import Sweep, check_defaults, prepare_tiny_bases, run_defaults, run_sweep
from _report import (
    add_output_arguments,
    command_line,
    cpu_model_name,
    parse_with_quick,
    publish,
)

# what tests use from here, and the components the points' configs name
# (``lr_transfer.adapted_model``, ``lr_transfer.adamw_lora_plus``)
__all__ = [
    "AXES",
    "CASES",
    "QUICK_DEFAULTS",
    "Case",
    "Point",
    "Sweep",
    "_config_lr",
    "_config_seed",
    "_quiet_run_point",
    "_rebase_shared",
    "adamw_lora_plus",
    "adapted_model",
    "analyse",
    "case_by_name",
    "check_defaults",
    "log_parabola_minimum",
    "main",
    "parse_args",
    "point_overrides",
    "pooled_input_scale",
    "run_defaults",
    "run_point",
    "single_rate_regret",
    "use_pooling",
]

QUICK_DEFAULTS = {
    "cases": ["tiny w128 G64 b2 r8"],
    "seeds": [0],
    "mean_grid": [0.1],
    "sum_grid": [0.03],
    "max_lr_extensions": 0,
    "lora_plus_ratios": [4.0],
    "schedule_floors": [0.0],
    "warmup_factors": [2.0],
    "lora_plus_cases": ["tiny w128 G64 b2 r8"],
    "schedule_cases": ["tiny w128 G64 b2 r8"],
    "steps": 3,
    "pretrain_steps": 10,
    "jobs": 1,
}


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
    parser.add_argument("--schedule-floors", nargs="*", type=float, default=[0.0],
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
