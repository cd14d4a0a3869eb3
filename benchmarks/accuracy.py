"""Held-out perplexity after adapting TinyStories-656K: QA-LoRA vs fine-tune-then-quantize.

    python benchmarks/accuracy.py --json docs/results/accuracy.json \\
        --markdown docs/results/accuracy.md --plot docs/results/accuracy.png
    python benchmarks/accuracy.py --quick          # a few steps of everything (the test)

The real pretrained checkpoint ``../shared/models/tinystories656K`` (``--shared``) is
adapted to two targets with the same training budget for every method (steps, batch,
sequence length, rank 8, alpha 16, adapters on q/k/v/output_proj and w1/w2/w3, no dropout,
AdamW without weight decay, linear warmup over 10% of the steps then cosine decay):

- ``shakespeare``: ``data/tinyshakespeare_train.txt`` cut by position (at line breaks) into
  train (first 90%), validation (next 5%) and test (last 5%);
- ``alpaca``: ``data/alpaca_4500.json``, records 0-3999 train, 4000-4249 validation, the
  last 250 test, in the project's Alpaca prompt format with the loss (and the perplexity)
  on the response tokens only.

Rows, for each bit width ``b`` and group size ``G``:

1. ``fp32 base``: the checkpoint, no training.
2. ``int-b base``: every linear quantized with the project's ``rtn``, ``hqq`` or ``gptq``
   (calibrated on the target's training split), no training.
3. ``LoRA fp32``: torchtune's ``LoRALinear`` on the full-precision model.
4. ``LoRA -> PTQ``: that LoRA merged into the fp32 weights, then every linear quantized.
5. ``QLoRA NF4 -> merge -> PTQ``: ``LoRALinear`` over a torchao NF4 base (block 64; the
   scaler block is 256 where it divides the number of scalers, else the largest power of
   two that does: 128 for the 64 x 128 k/v projections), merged into fp32 (dequantized NF4
   plus the scaled ``B @ A``), then quantized as in 4.
6. ``QA-LoRA merged``: the project's QA-LoRA model on the int-b base of each quantizer,
   trained, then every ``QALoRALinear`` merged into its zero points; also evaluated
   unmerged (the merged-vs-unmerged deviation is reported).

The output projection is tied to the token embeddings and stays in fp32 in every row.

Learning rates are tuned per method on the validation split with the first seed; a grid
is extended past its edge (``--max-lr-extensions`` times per side) while a method's best
is at an edge. LoRA and QLoRA are trained once per learning rate and each ``(b, G,
quantizer)`` row takes the learning rate whose post-PTQ validation perplexity is best.
QA-LoRA is tuned per ``(b, G)`` on the rtn base over the learning rate and the pooling
normalisation (``mean``: alpha 16, the project's average; ``sum``: alpha 16 * G, the
paper's group sum), and the choice is reused for hqq and gptq. The headline rows (per
``b`` and ``G`` in ``--headline-group-sizes``: the QA-LoRA quantizer and the
fine-tune-then-quantize baseline with the best validation perplexity) are repeated with
every seed of ``--seeds``; their cells show mean +- standard deviation.

Every perplexity is reported on the target's test split and on a fixed slice of
``data/tinystories_val_a.txt`` (forgetting, one story per sequence). Each target runs in its
own process (``--jobs``) with one torch thread (``--threads``): on a busy 2-core machine
two threads per process stalled each other 10-20x. Output: a markdown summary on stdout,
``--json`` (environment, settings, every learning rate tried, every row), ``--markdown``
(the command, then one table per target) and ``--plot`` (perplexity vs bits).

Every method trains through the fine-tuning recipe's steps
(``qalora_tune.recipe_utils.loss_step`` and ``optimizer_step``) and is evaluated by its
``evaluate_lm``. This file holds the command line; the pieces live next to it:
``_accuracy_common.py`` (constants, learning-rate search helpers), ``_accuracy_data.py``
(targets and batches), ``_accuracy_models.py`` (models and training),
``_accuracy_runner.py`` (the rows) and ``_accuracy_report.py`` (tables and plot).
"""

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from _accuracy_common import (
    ALPACA_SIZES,
    ALPHA,
    BUILDER,
    DEFAULT_SHARED,
    FP32_BASE,
    IGNORE_INDEX,
    INT_BASE,
    LORA_FP32,
    LORA_PTQ,
    MODEL_SUBDIR,
    POOLINGS,
    QALORA,
    QALORA_DEFAULTS,
    QLORA_PTQ,
    QUANTIZER_NAMES,
    QUICK_DEFAULTS,
    RANK,
    TARGETS,
    TEXT_FRACTIONS,
    WARMUP_FRACTION,
    best_lr,
    grid_ratio,
    is_bracketed,
    lr_extensions,
    mean_std,
    nf4_scaler_block_size,
    qalora_alpha,
    relative_difference,
    split_by_position,
    split_records,
    tuning_quantizer,
)
from _accuracy_data import alpaca_target, shakespeare_target, tinystories_batches, training_batches
from _accuracy_models import perplexity
from _accuracy_report import comparisons, environment, markdown_report, plot
from _accuracy_runner import Benchmark
from _report import write_outputs

# the row names and helpers that tests and other benchmarks (double_quant.py) use from here
__all__ = [
    "BUILDER",
    "DEFAULT_SHARED",
    "FP32_BASE",
    "INT_BASE",
    "LORA_FP32",
    "LORA_PTQ",
    "QALORA",
    "QALORA_DEFAULTS",
    "QLORA_PTQ",
    "QUANTIZER_NAMES",
    "TARGETS",
    "best_lr",
    "comparisons",
    "grid_ratio",
    "is_bracketed",
    "lr_extensions",
    "main",
    "mean_std",
    "nf4_scaler_block_size",
    "parse_args",
    "perplexity",
    "qalora_alpha",
    "relative_difference",
    "split_by_position",
    "split_records",
    "tinystories_batches",
    "training_batches",
]


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared/ folder")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[32, 64, 8])
    parser.add_argument(
        "--quantizers", nargs="+", choices=QUANTIZER_NAMES, default=list(QUANTIZER_NAMES)
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help="the first tunes every row; all of them run the headline rows",
    )
    parser.add_argument(
        "--seed-targets",
        nargs="+",
        choices=TARGETS,
        default=list(TARGETS),
        help="targets whose headline rows run every seed",
    )
    parser.add_argument("--headline-group-sizes", nargs="+", type=int, default=[32, 64])
    parser.add_argument(
        "--lr-grid",
        nargs="+",
        type=float,
        default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
        help="initial learning-rate grid of LoRA and QLoRA",
    )
    parser.add_argument(
        "--qalora-lr-grid",
        nargs="+",
        type=float,
        default=[3e-2, 1e-1, 3e-1],
        help="initial grid of QA-LoRA with mean pooling (alpha 16)",
    )
    parser.add_argument(
        "--qalora-sum-lr-grid",
        nargs="+",
        type=float,
        default=[3e-3, 1e-2, 3e-2],
        help="initial grid of QA-LoRA with sum pooling (alpha 16 * G)",
    )
    parser.add_argument("--pooling", nargs="+", choices=POOLINGS, default=list(POOLINGS))
    parser.add_argument(
        "--max-lr-extensions",
        type=int,
        default=3,
        help="grid steps added past each end while a best is at the edge",
    )
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=32768,
        help="cap on the predicted tokens of each test split (0: all)",
    )
    parser.add_argument(
        "--val-tokens",
        type=int,
        default=16384,
        help="cap on the predicted tokens of each validation split (0: all)",
    )
    parser.add_argument("--tinystories-tokens", type=int, default=32768)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=64,
        help="GPTQ calibration sequences from the target's training split",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process; on a shared machine several threads "
        "per process can stall each other (OpenMP spin-waits) and run 10x slower",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(len(TARGETS), os.cpu_count() or 1),
        help="processes, one target each",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few steps of everything, 4-bit G32, one seed (for the test)",
    )
    parser.add_argument(
        "--packaged-defaults",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add QA-LoRA trained with the packaged config's lr and schedule, not searched",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--quick`` changes the defaults, explicit options win."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK_DEFAULTS)
    args = parser.parse_args(argv)
    if args.steps < 0 or args.batch_size < 1 or args.seq_len < 2:
        parser.error("--steps must be >= 0, --batch-size >= 1 and --seq-len >= 2")
    if any(b not in (2, 3, 4, 8) for b in args.bits):
        parser.error("--bits takes 2, 3, 4 or 8")
    if any(lr <= 0 for lr in args.lr_grid + args.qalora_lr_grid + args.qalora_sum_lr_grid):
        parser.error("learning rates must be positive")
    return args


TARGET_LOADERS = {"shakespeare": shakespeare_target, "alpaca": alpaca_target}


def run_target(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """All rows of one target, in this process (also the worker of ``--jobs``).

    Returns:
        Dict[str, Any]: rows, learning-rate search, trainings and facts about the run.
    """
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    benchmark = Benchmark(args)
    target = TARGET_LOADERS[name](benchmark.tokenizer, args)
    benchmark.run_target(target)
    return {
        "rows": benchmark.rows,
        "lr_search": benchmark.search,
        "trainings": benchmark.trainings,
        "storage": benchmark.models.storage,
        "nf4_scaler_blocks": benchmark.models.nf4_scaler_blocks,
        "phase_seconds": benchmark.phase_seconds,
        "split_tokens": {
            split: sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            for split, batches in (("val", target.val), ("test", target.test))
        },
    }


def run_targets(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every target's results, in ``--jobs`` processes (the targets are independent)."""
    if args.jobs <= 1 or len(args.targets) <= 1:
        return [run_target(args, name) for name in args.targets]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(args.jobs, len(args.targets)), mp_context=context) as pool:
        return list(pool.map(run_target, [args] * len(args.targets), args.targets))


def _settings(args: argparse.Namespace, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("json", "markdown", "plot")
    }
    settings.update(
        rank=RANK,
        alpha=ALPHA,
        lora_dropout=0.0,
        warmup_fraction=WARMUP_FRACTION,
        schedule="linear warmup, cosine",
        optimizer="AdamW(weight_decay=0)",
        text_split=TEXT_FRACTIONS,
        alpaca_split=ALPACA_SIZES,
        tuning_quantizer=tuning_quantizer(args.quantizers),
        split_tokens={name: r["split_tokens"] for name, r in zip(args.targets, results)},
    )
    return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the markdown summary and write the requested outputs.

    Returns:
        Dict[str, Any]: the report (what ``--json`` holds).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not (args.shared / MODEL_SUBDIR).is_dir():
        raise SystemExit(
            f"accuracy: error: {args.shared / MODEL_SUBDIR} not found; this benchmark needs the "
            "shared checkpoints and data (pass --shared PATH to the shared/ folder)"
        )
    start = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        results = run_targets(args)
    finally:
        torch.set_num_threads(threads)
    rows = [row for r in results for row in r["rows"]]
    report: dict[str, Any] = {
        "environment": environment(argv, args),
        "settings": _settings(args, results),
        "storage": {k: v for r in results for k, v in r["storage"].items()},
        "nf4_scaler_blocks": {k: v for r in results for k, v in r["nf4_scaler_blocks"].items()},
        "lr_search": [entry for r in results for entry in r["lr_search"]],
        "trainings": [entry for r in results for entry in r["trainings"]],
        "rows": rows,
        "comparisons": comparisons(rows, args.targets, args.bits, args.group_sizes),
        "phase_seconds": {k: v for r in results for k, v in r["phase_seconds"].items()},
        "wall_seconds": time.perf_counter() - start,
    }
    markdown = markdown_report(report)
    print(markdown)
    write_outputs(args.json, args.markdown, report, markdown, indent=1)
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
