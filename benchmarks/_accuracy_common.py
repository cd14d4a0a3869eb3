"""Constants and pure helpers of ``benchmarks/accuracy.py``: data splits, the
learning-rate search, row keys and small statistics (no torch)."""

import itertools
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = ROOT.parent / "shared"
MODEL_SUBDIR = Path("models") / "tinystories656K"
SHAKESPEARE_FILE = Path("data") / "tinyshakespeare_train.txt"
ALPACA_FILE = Path("data") / "alpaca_4500.json"
TINYSTORIES_FILE = Path("data") / "tinystories_val_a.txt"
BUILDER = "qalora_tune.models.qalora_tinystories656k"

TARGETS = ("shakespeare", "alpaca")
QUANTIZER_NAMES = ("rtn", "hqq", "gptq")
POOLINGS = ("mean", "sum")
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj"]
RANK = 8
ALPHA = 16.0
IGNORE_INDEX = -100
TEXT_FRACTIONS = (0.90, 0.05, 0.05)
ALPACA_SIZES = (4000, 250, 250)
NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256
WARMUP_FRACTION = 0.1

FP32_BASE = "fp32 base"
INT_BASE = "int-b base"
LORA_FP32 = "LoRA fp32"
LORA_PTQ = "LoRA -> PTQ"
QLORA_PTQ = "QLoRA NF4 -> merge -> PTQ"
QALORA = "QA-LoRA merged"
QALORA_DEFAULTS = "QA-LoRA merged, packaged defaults"
METHOD_ORDER = (FP32_BASE, INT_BASE, LORA_FP32, LORA_PTQ, QLORA_PTQ, QALORA, QALORA_DEFAULTS)
DEFAULTS_CONFIG = "tinystories656K_qalora"  # the packaged config of this benchmark's model
BASELINES = (LORA_PTQ, QLORA_PTQ)
TRAINED_BASELINE = {LORA_PTQ: "lora", QLORA_PTQ: "qlora"}

QUICK_DEFAULTS = {
    "steps": 3,
    "batch_size": 2,
    "seq_len": 128,
    "eval_seq_len": 128,
    "eval_tokens": 256,
    "val_tokens": 256,
    "jobs": 1,
    "tinystories_tokens": 256,
    "bits": [4],
    "group_sizes": [32],
    "seeds": [0],
    "lr_grid": [1e-3],
    "qalora_lr_grid": [1e-2],
    "qalora_sum_lr_grid": [1e-3],
    "max_lr_extensions": 0,
    "calibration_samples": 4,
    "eval_batch_size": 8,
}

Example = dict[str, list[int]]


def _log(message: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- pure helpers


def split_by_position(text: str, fractions: Sequence[float]) -> list[str]:
    """Cut ``text`` into consecutive parts of about ``fractions`` of its length.

    Each cut falls just after a line break at or before the nominal position, so no line
    is shared by two parts; the parts concatenate back to ``text``.

    Args:
        text (str): the whole text.
        fractions (Sequence[float]): positive shares summing to 1, in order.

    Returns:
        List[str]: one string per fraction.

    Raises:
        ValueError: if a fraction is not positive or they do not sum to 1.
    """
    if any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    cuts, total = [0], 0.0
    for fraction in fractions[:-1]:
        total += fraction
        cut = text.rfind("\n", 0, int(len(text) * total)) + 1
        cuts.append(max(cut, cuts[-1]))
    cuts.append(len(text))
    return [text[start:end] for start, end in itertools.pairwise(cuts)]


def split_records(records: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    """Train / validation / test records: the first ``sizes[0]``, the next ``sizes[1]``,
    and the last ``sizes[2]``.

    Raises:
        ValueError: if there are fewer records than ``sum(sizes)``.
    """
    train, val, test = sizes
    if len(records) < train + val + test:
        raise ValueError(f"need {train + val + test} records, got {len(records)}")
    return [list(records[:train]), list(records[train : train + val]), list(records[-test:])]


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


def best_lr(scores: Mapping[float, float]) -> float:
    """The learning rate with the lowest score (non-finite scores count as infinite;
    ties go to the smaller learning rate)."""
    if not scores:
        raise ValueError("no learning rate was tried")
    return min(sorted(scores), key=lambda lr: _finite(scores[lr]))


def grid_ratio(grid: Sequence[float]) -> float:
    """The geometric step of a learning-rate grid (sqrt(10) for a single value)."""
    low, high = min(grid), max(grid)
    return (high / low) ** (1.0 / (len(grid) - 1)) if len(grid) > 1 else math.sqrt(10.0)


def lr_extensions(
    grid: Sequence[float],
    scores: Mapping[str, Mapping[float, float]],
    max_extensions: int,
) -> list[float]:
    """Learning rates to add so that every criterion's best is inside the tried range.

    A criterion whose best learning rate is the smallest (largest) tried asks for one more
    step of the grid's ratio below (above) it, at most ``max_extensions`` steps past the
    initial ``grid`` on each side. Criteria with no finite score ask for nothing.

    Args:
        grid (Sequence[float]): the initial grid.
        scores (Mapping[str, Mapping[float, float]]): per criterion, learning rate ->
            validation perplexity, over the same tried learning rates.
        max_extensions (int): steps allowed past each end of ``grid``.

    Returns:
        List[float]: zero, one or two learning rates (below and/or above), not yet tried.
    """
    tried = sorted({lr for per_lr in scores.values() for lr in per_lr} | set(grid))
    ratio = grid_ratio(grid)
    below = sum(lr < min(grid) * (1 - 1e-9) for lr in tried)
    above = sum(lr > max(grid) * (1 + 1e-9) for lr in tried)
    wanted = []
    for per_lr in scores.values():
        if not any(math.isfinite(_finite(v)) for v in per_lr.values()):
            continue
        best = best_lr(per_lr)
        if best == tried[0] and below < max_extensions:
            wanted.append(tried[0] / ratio)
        if best == tried[-1] and above < max_extensions:
            wanted.append(tried[-1] * ratio)
    return sorted(set(wanted))


def is_bracketed(scores: Mapping[float, float]) -> bool:
    """Whether the best learning rate has a tried neighbour on both sides."""
    tried = sorted(scores)
    return len(tried) > 2 and best_lr(scores) not in (tried[0], tried[-1])


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def relative_difference(value: float, reference: float) -> float:
    """``value / reference - 1`` (negative: ``value`` is lower)."""
    return value / reference - 1.0


def nf4_scaler_block_size(numel: int, block_size: int = NF4_BLOCK_SIZE) -> int:
    """The NF4 scaler block for a weight of ``numel`` values: torchtune's 256 when it
    divides the number of scalers (``numel / block_size``), else the largest power of two
    that does."""
    scalers = numel // block_size
    size = NF4_SCALER_BLOCK_SIZE
    while size > 1 and scalers % size:
        size //= 2
    return size


def qalora_alpha(pooling: str, group_size: int) -> float:
    """Adapter alpha of a pooling normalisation: ``mean`` keeps 16, ``sum`` (the paper's
    group sum, equivalent to the project's mean with alpha multiplied by G) is 16 * G."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return ALPHA * (group_size if pooling == "sum" else 1)


def _row_key(method: str, quantizer: str | None, bits: int | None, group_size: int | None) -> str:
    return "|".join(str(part) for part in (method, quantizer, bits, group_size))


def tuning_quantizer(quantizers: Sequence[str]) -> str:
    """The base quantizer QA-LoRA's learning rate and pooling are tuned on: rtn if run."""
    return "rtn" if "rtn" in quantizers else quantizers[0]


def best_row(
    rows: Sequence[dict[str, Any]], target: str, methods: Sequence[str], bits: int, group_size: int
) -> dict[str, Any] | None:
    """Among the rows of ``methods`` at ``(bits, group_size)`` (not skipped), the one with
    the lowest first-seed validation perplexity."""
    candidates = [
        r
        for r in rows
        if r["target"] == target
        and r["method"] in methods
        and r["bits"] == bits
        and r["group_size"] == group_size
        and not r.get("skipped")
        and r.get("val_ppl")
    ]
    return min(candidates, key=lambda r: _finite(r["val_ppl"][0]), default=None)


def _rename(scores: dict[str, float]) -> dict[str, float]:
    return {f"{split}_ppl": value for split, value in scores.items()}


def _json_float(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None

