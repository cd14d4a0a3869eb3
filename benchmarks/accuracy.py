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
"""

import argparse
import itertools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _report import command_line, cpu_model_name, write_outputs
from torch import nn

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
METHOD_ORDER = (FP32_BASE, INT_BASE, LORA_FP32, LORA_PTQ, QLORA_PTQ, QALORA)
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
Batch = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


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


# ------------------------------------------------------------------------- data


@dataclass
class TargetData:
    """One adaptation target: training examples, evaluation batches, GPTQ calibration."""

    name: str
    train: list[Example]
    val: list[Batch]
    test: list[Batch]
    calibration: list[torch.Tensor] = field(default_factory=list)


def _labelled(example: Example) -> int:
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def _cap_tokens(examples: Sequence[Example], max_tokens: int) -> list[Example]:
    """The first examples holding ``max_tokens`` predicted tokens (0: all); examples
    with none are dropped."""
    kept, count = [], 0
    for example in examples:
        if max_tokens and count >= max_tokens:
            break
        labelled = _labelled(example)
        if labelled:
            kept.append(example)
            count += labelled
    return kept


def _eval_batches(examples: Sequence[Example], batch_size: int) -> list[Batch]:
    from torchtune.data import padded_collate_sft

    ordered = sorted(examples, key=lambda e: len(e["tokens"]))  # less padding
    return [
        padded_collate_sft(ordered[i : i + batch_size], padding_idx=0, ignore_idx=IGNORE_INDEX)
        for i in range(0, len(ordered), batch_size)
    ]


def _blocks(tokenizer: Any, text: str, block_size: int) -> list[Example]:
    """Consecutive blocks of ``text``'s tokens, each of ``block_size`` tokens starting
    with BOS (how the model saw text in pretraining)."""
    from qalora_tune.data import TextBlockDataset

    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    dataset = TextBlockDataset(ids, block_size - 1)
    blocks = []
    for i in range(len(dataset)):
        tokens = [tokenizer.bos_id, *dataset[i]["tokens"]]
        blocks.append({"tokens": tokens, "labels": list(tokens)})
    return blocks


def _token_cap(split: str, args: argparse.Namespace) -> int:
    return args.val_tokens if split == "val" else args.eval_tokens


def _calibration(train: list[Example], args: argparse.Namespace) -> list[torch.Tensor]:
    from qalora_tune.quantization.gptq_calibration import sample_calibration_sequences

    return sample_calibration_sequences(train, args.calibration_samples, args.seq_len, seed=0)


def shakespeare_target(tokenizer: Any, args: argparse.Namespace) -> TargetData:
    """Tiny Shakespeare cut by position into 90% train, 5% validation, 5% test."""
    text = (args.shared / SHAKESPEARE_FILE).read_text(encoding="utf-8")
    train, val, test = split_by_position(text, TEXT_FRACTIONS)
    train_blocks = _blocks(tokenizer, train, args.seq_len)
    evaluation = {
        name: _eval_batches(
            _cap_tokens(_blocks(tokenizer, part, args.eval_seq_len), _token_cap(name, args)),
            args.eval_batch_size,
        )
        for name, part in (("val", val), ("test", test))
    }
    return TargetData(
        "shakespeare",
        train_blocks,
        evaluation["val"],
        evaluation["test"],
        _calibration(train_blocks, args),
    )


def alpaca_target(tokenizer: Any, args: argparse.Namespace) -> TargetData:
    """Alpaca records 0-3999 train, 4000-4249 validation, the last 250 test; the loss
    covers the response tokens only (the project's instruction dataset)."""
    from qalora_tune.data import InstructJSONDataset

    records = json.loads((args.shared / ALPACA_FILE).read_text(encoding="utf-8"))
    train, val, test = split_records(records, ALPACA_SIZES)

    def examples(part: list[dict[str, str]], max_seq_len: int) -> list[Example]:
        dataset = InstructJSONDataset(part, tokenizer, max_seq_len=max_seq_len)
        return [dataset[i] for i in range(len(dataset))]

    train_examples = _cap_tokens(examples(train, args.seq_len), 0)
    if not train_examples:
        raise ValueError(f"no Alpaca response fits in --seq-len {args.seq_len} tokens; raise it")
    evaluation = {
        name: _eval_batches(
            _cap_tokens(examples(part, args.eval_seq_len), _token_cap(name, args)),
            args.eval_batch_size,
        )
        for name, part in (("val", val), ("test", test))
    }
    return TargetData(
        "alpaca",
        train_examples,
        evaluation["val"],
        evaluation["test"],
        _calibration(train_examples, args),
    )


def tinystories_batches(tokenizer: Any, args: argparse.Namespace) -> list[Batch]:
    """The first stories of the TinyStories text holding ``--tinystories-tokens`` predicted
    tokens, one sequence per story (BOS first, as in pretraining), cut at
    ``--eval-seq-len``."""
    text = (args.shared / TINYSTORIES_FILE).read_text(encoding="utf-8")
    stories = []
    for story in text.split("\n\n")[1:]:  # the file starts inside a story
        if story.strip():
            ids = tokenizer.encode(story.strip(), add_bos=True, add_eos=False)[: args.eval_seq_len]
            stories.append({"tokens": ids, "labels": list(ids)})
        if sum(len(s["tokens"]) - 1 for s in stories) >= args.tinystories_tokens:
            break
    return _eval_batches(_cap_tokens(stories, args.tinystories_tokens), args.eval_batch_size)


def training_batches(
    examples: Sequence[Example], batch_size: int, steps: int, seed: int
) -> Iterator[Batch]:
    """``steps`` padded batches drawn without replacement (reshuffled each pass), in an
    order fixed by ``seed``: every method sees the same batches for the same seed."""
    from torchtune.data import padded_collate_sft

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        yield padded_collate_sft(
            [examples[i] for i in chosen], padding_idx=0, ignore_idx=IGNORE_INDEX
        )


# ------------------------------------------------------------------------- training


def train(model: nn.Module, batches: Iterator[Batch], steps: int, lr: float) -> list[float]:
    """AdamW (no weight decay) on the trainable parameters, linear warmup over 10% of the
    steps then cosine decay to zero. Stops at the first non-finite loss.

    Returns:
        List[float]: the training loss of every step run.
    """
    from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

    from qalora_tune.recipe_utils import full_logits

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, round(WARMUP_FRACTION * steps)) if steps else 0
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, max(steps, 1))
    model.train()
    losses: list[float] = []
    for batch in batches:
        logits = full_logits(model(batch["tokens"]))
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1),
            batch["labels"][:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
        )
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    model.eval()
    return losses


def perplexity(model: nn.Module, batches: list[Batch]) -> float:
    """Perplexity over the labelled tokens of ``batches`` (``nan`` if it diverged)."""
    from qalora_tune.recipe_utils import evaluate_lm

    loss = evaluate_lm(model, batches, torch.device("cpu"))["loss"]
    return math.exp(loss) if math.isfinite(loss) and loss < 80 else math.nan


# ------------------------------------------------------------------------- models


class Models:
    """Builds every model of the benchmark from the checkpoint's fp32 weights."""

    def __init__(self, args: argparse.Namespace):
        from qalora_tune.checkpointing import QALoRACheckpointer
        from qalora_tune.recipe_utils import load_full_precision

        checkpointer = QALoRACheckpointer(
            str(args.shared / MODEL_SUBDIR), "LLAMA2", output_dir=tempfile.gettempdir()
        )
        model, _ = load_full_precision(
            BUILDER, checkpointer, torch.device("cpu"), torch.float32, otherwise="--shared"
        )
        self.base_state: State = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._gptq_bases: dict[tuple[str, int, int], State] = {}
        self.nf4_scaler_blocks: dict[str, int] = {}
        self.storage: dict[str, str] = {}

    @staticmethod
    def _builder() -> Callable[..., nn.Module]:
        from qalora_tune.models import qalora_tinystories656k

        return qalora_tinystories656k

    def full_precision(self, state: State | None = None) -> nn.Module:
        """The fp32 model with ``state`` (default: the checkpoint) loaded, frozen."""
        model = self._builder().full_precision()
        model.load_state_dict(self.base_state if state is None else state)
        model.requires_grad_(False)
        return model.eval()

    # ---------------------------------------------------------------- quantized bases

    def gptq_state(self, state: State, bits: int, group_size: int, target: TargetData) -> State:
        """Sequential GPTQ of the fp32 model ``state``, calibrated on the target's
        training split; returns the int state dict."""
        from qalora_tune.quantization import calibrate_gptq

        return calibrate_gptq(
            self.full_precision(state),
            target.calibration,
            group_size=group_size,
            bits=bits,
            dtype=torch.float32,
        )

    def base_gptq_state(self, bits: int, group_size: int, target: TargetData) -> State:
        """The checkpoint's GPTQ state for a target (cached)."""
        key = (target.name, bits, group_size)
        if key not in self._gptq_bases:
            self._gptq_bases[key] = self.gptq_state(self.base_state, bits, group_size, target)
        return self._gptq_bases[key]

    def quantized(
        self, state: State | None, bits: int, group_size: int, quantizer: str, target: TargetData
    ) -> nn.Module:
        """Every linear of the fp32 model ``state`` (default: the checkpoint) quantized to
        ``bits`` with groups of ``group_size`` by ``quantizer``; no adapters."""
        from qalora_tune.quantization.gptq_calibration import load_quantized_base

        model = self._builder()([], group_size=group_size, quantizer=quantizer, bits=bits)
        load_quantized_base(
            model, self._quantized_state(state, bits, group_size, quantizer, target)
        )
        self._record_storage(model, group_size)
        return model.eval()

    def _quantized_state(
        self, state: State | None, bits: int, group_size: int, quantizer: str, target: TargetData
    ) -> State:
        if quantizer != "gptq":
            return self.base_state if state is None else state  # quantized as it loads
        if state is None:
            return self.base_gptq_state(bits, group_size, target)
        return self.gptq_state(state, bits, group_size, target)

    def _record_storage(self, model: nn.Module, group_size: int) -> None:
        weight = model.layers[0].attn.q_proj.weight
        self.storage[str(group_size)] = type(weight).__name__

    # ---------------------------------------------------------------- QA-LoRA

    def qalora(
        self,
        bits: int,
        group_size: int,
        quantizer: str,
        alpha: float,
        seed: int,
        target: TargetData,
    ) -> nn.Module:
        """The project's QA-LoRA model on the int-b base, adapters initialised with ``seed``."""
        from qalora_tune.quantization.gptq_calibration import load_quantized_base

        torch.manual_seed(seed)
        model = self._builder()(
            ATTENTION_TARGETS,
            apply_lora_to_mlp=True,
            lora_rank=RANK,
            lora_alpha=alpha,
            lora_dropout=0.0,
            group_size=group_size,
            quantizer=quantizer,
            bits=bits,
        )
        load_quantized_base(model, self._quantized_state(None, bits, group_size, quantizer, target))
        return model

    # ---------------------------------------------------------------- LoRA / QLoRA

    def lora(self, seed: int, nf4: bool) -> nn.Module:
        """torchtune ``LoRALinear`` on every adapter target of the fp32 model; with
        ``nf4`` over a torchao NF4 base (QLoRA)."""
        from torchao.dtypes import to_nf4
        from torchtune.modules.peft import LoRALinear

        from qalora_tune.models import MLP_PROJECTIONS

        torch.manual_seed(seed)
        model = self.full_precision()
        targets = set(ATTENTION_TARGETS) | set(MLP_PROJECTIONS)
        for parent_name, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                if name not in targets or not isinstance(child, nn.Linear):
                    continue
                weight = child.weight.detach()
                kwargs = {}
                if nf4:
                    kwargs = {
                        "block_size": NF4_BLOCK_SIZE,
                        "scaler_block_size": nf4_scaler_block_size(weight.numel()),
                    }
                    self.nf4_scaler_blocks[f"{parent_name}.{name}"] = kwargs["scaler_block_size"]
                layer = LoRALinear(
                    child.in_features,
                    child.out_features,
                    rank=RANK,
                    alpha=ALPHA,
                    quantize_base=nf4,
                    **kwargs,
                )
                base = to_nf4(weight, **kwargs) if nf4 else weight.clone()
                layer.weight = nn.Parameter(base, requires_grad=False)
                setattr(parent, name, layer)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        return model

    @staticmethod
    @torch.no_grad()
    def merged_lora_state(model: nn.Module) -> State:
        """The fp32 state dict of a (Q)LoRA model with its adapters merged (NF4 bases
        dequantized first)."""
        from torchao.dtypes.nf4tensor import NF4Tensor
        from torchtune.modules.peft import get_merged_lora_ckpt

        state = {
            key: (value.get_original_weight() if isinstance(value, NF4Tensor) else value)
            .detach()
            .clone()
            for key, value in model.state_dict().items()
        }
        return get_merged_lora_ckpt(state, rank=RANK, alpha=ALPHA)


def adapter_state(model: nn.Module) -> State:
    """A copy of the trainable adapter weights."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def merge_all(model: nn.Module) -> int:
    """Merge every ``QALoRALinear`` of ``model``; returns how many."""
    from qalora_tune.modules import QALoRALinear

    layers = [m for m in model.modules() if isinstance(m, QALoRALinear)]
    for layer in layers:
        layer.merge()
    return len(layers)


# ------------------------------------------------------------------------- the benchmark


def _row_key(method: str, quantizer: str | None, bits: int | None, group_size: int | None) -> str:
    return "|".join(str(part) for part in (method, quantizer, bits, group_size))


class Benchmark:
    """Runs every row of one invocation and collects the results."""

    def __init__(self, args: argparse.Namespace):
        from qalora_tune.data import text_tokenizer

        self.args = args
        self.tokenizer = text_tokenizer(
            str(args.shared / MODEL_SUBDIR / "tokenizer.json"), prepend_space=False
        )
        self.models = Models(args)
        self.tinystories = tinystories_batches(self.tokenizer, args)
        self.search: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.skipped: dict[tuple[str, int, int, str], str] = {}
        self.trainings: list[dict[str, Any]] = []
        self._merged: dict[tuple, State] = {}
        self._qalora: dict[tuple, dict[str, Any]] = {}
        self._bracketed: dict[tuple, bool] = {}
        self.phase_seconds: dict[str, float] = {}

    # ---------------------------------------------------------------- helpers

    def combos(self) -> list[tuple[int, int]]:
        """Every ``(bits, group_size)`` of the run."""
        return [(b, g) for b in self.args.bits for g in self.args.group_sizes]

    def scores(
        self, model: nn.Module, target: TargetData, splits: Sequence[str]
    ) -> dict[str, float]:
        """Perplexity of ``model`` on each of ``splits`` (``val``, ``test``, ``tinystories``)."""
        batches = {"val": target.val, "test": target.test, "tinystories": self.tinystories}
        return {split: perplexity(model, batches[split]) for split in splits}

    def _record_training(
        self,
        kind: str,
        target: TargetData,
        lr: float,
        seed: int,
        losses: list[float],
        seconds: float,
        **extra: Any,
    ) -> None:
        self.trainings.append(
            dict(
                method=kind,
                target=target.name,
                lr=lr,
                seed=seed,
                steps_run=len(losses),
                first_loss=_json_float(losses[0]) if losses else None,
                final_loss=_json_float(losses[-1]) if losses else None,
                seconds=seconds,
                **extra,
            )
        )

    def add_row(
        self,
        target: TargetData,
        method: str,
        quantizer: str | None = None,
        bits: int | None = None,
        group_size: int | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Append a result row (numbers are added by :meth:`set_seeded`) and return it."""
        row = {
            "target": target.name,
            "method": method,
            "quantizer": quantizer,
            "bits": bits,
            "group_size": group_size,
            "key": _row_key(method, quantizer, bits, group_size),
        }
        row.update(fields)
        self.rows.append(row)
        return row

    @staticmethod
    def set_seeded(row: dict[str, Any], seed: int, numbers: dict[str, float]) -> None:
        """Store one seed's numbers in a row (lists per seed, plus mean and std)."""
        row.setdefault("seeds", [])
        row["seeds"].append(seed)
        for name, value in numbers.items():
            row.setdefault(name, []).append(_json_float(value))
            finite = [v for v in row[name] if v is not None]
            mean, std = mean_std(finite) if finite else (None, None)
            row[f"{name}_mean"], row[f"{name}_std"] = mean, std

    # ---------------------------------------------------------------- rows without training

    def base_rows(self, target: TargetData) -> None:
        """The fp32 base and every int-b base; a base the library refuses (``ValueError``)
        is recorded as skipped, with every row that needs it."""
        scores = self.scores(self.models.full_precision(), target, ("val", "test", "tinystories"))
        self.set_seeded(self.add_row(target, FP32_BASE), 0, _rename(scores))
        for bits, group_size in self.combos():
            for quantizer in self.args.quantizers:
                row = self.add_row(target, INT_BASE, quantizer, bits, group_size)
                try:
                    model = self.models.quantized(None, bits, group_size, quantizer, target)
                except ValueError as error:
                    self.skipped[(target.name, bits, group_size, quantizer)] = str(error)
                    row["skipped"] = str(error)
                    _log(f"{target.name}: skip b={bits} G={group_size} {quantizer}: {error}")
                    continue
                scores = self.scores(model, target, ("val", "test", "tinystories"))
                self.set_seeded(row, 0, _rename(scores))

    def is_skipped(
        self, target: TargetData, bits: int, group_size: int, quantizer: str
    ) -> str | None:
        """Why the int-b base of ``(bits, group_size, quantizer)`` could not be built, if so."""
        return self.skipped.get((target.name, bits, group_size, quantizer))

    # ---------------------------------------------------------------- LoRA / QLoRA

    def merged_baseline(self, target: TargetData, kind: str, lr: float, seed: int) -> State:
        """Train LoRA (``kind="lora"``) or QLoRA (``"qlora"``) and return the merged fp32
        weights (cached per learning rate and seed)."""
        key = (target.name, kind, lr, seed)
        if key not in self._merged:
            model = self.models.lora(seed, nf4=kind == "qlora")
            start = time.perf_counter()
            losses = train(
                model,
                training_batches(target.train, self.args.batch_size, self.args.steps, seed),
                self.args.steps,
                lr,
            )
            seconds = time.perf_counter() - start
            self._record_training(kind, target, lr, seed, losses, seconds)
            _log(
                f"{target.name}: {kind} lr={lr:.3g} seed={seed}: loss {losses[-1] if losses else '-'} "
                f"({seconds:.0f}s)"
            )
            self._merged[key] = self.models.merged_lora_state(model)
        return self._merged[key]

    def ptq_scores(
        self,
        target: TargetData,
        state: State,
        bits: int,
        group_size: int,
        quantizer: str,
        splits: Sequence[str],
    ) -> dict[str, float]:
        """Perplexities of the fp32 weights ``state`` after post-training quantization."""
        model = self.models.quantized(state, bits, group_size, quantizer, target)
        return self.scores(model, target, splits)

    def tune_baseline(self, target: TargetData, method: str) -> None:
        """Train one baseline at every learning rate (extending the grid while a row's best
        is at an edge), choose the learning rate per row, and report the rows."""
        kind = TRAINED_BASELINE[method]
        criteria: dict[str, dict[float, float]] = {}
        pending = list(self.args.lr_grid)
        while pending:
            for lr in pending:
                state = self.merged_baseline(target, kind, lr, self.args.seeds[0])
                self._baseline_candidate(target, method, lr, state, criteria)
            pending = lr_extensions(self.args.lr_grid, criteria, self.args.max_lr_extensions)
        if method == LORA_PTQ:
            self._report_baseline_row(target, LORA_FP32, None, None, None, criteria)
        for bits, group_size in self.combos():
            for quantizer in self.args.quantizers:
                self._report_baseline_row(target, method, quantizer, bits, group_size, criteria)

    def _baseline_candidate(
        self,
        target: TargetData,
        method: str,
        lr: float,
        state: State,
        criteria: dict[str, dict[float, float]],
    ) -> None:
        if method == LORA_PTQ:
            val = self.scores(self.models.full_precision(state), target, ("val",))["val"]
            criteria.setdefault(_row_key(LORA_FP32, None, None, None), {})[lr] = val
            self._record_search(target, LORA_FP32, None, None, None, lr, ALPHA, val)
        for bits, group_size in self.combos():
            for quantizer in self.args.quantizers:
                if self.is_skipped(target, bits, group_size, quantizer):
                    continue
                val = self.ptq_scores(target, state, bits, group_size, quantizer, ("val",))["val"]
                criteria.setdefault(_row_key(method, quantizer, bits, group_size), {})[lr] = val
                self._record_search(target, method, quantizer, bits, group_size, lr, ALPHA, val)

    def _report_baseline_row(
        self,
        target: TargetData,
        method: str,
        quantizer: str | None,
        bits: int | None,
        group_size: int | None,
        criteria: dict[str, dict[float, float]],
    ) -> None:
        row = self.add_row(target, method, quantizer, bits, group_size)
        reason = quantizer and self.is_skipped(target, bits, group_size, quantizer)
        if reason:
            row["skipped"] = reason
            return
        per_lr = criteria[row["key"]]
        row.update(
            lr=best_lr(per_lr),
            alpha=ALPHA,
            val_ppl_tuning=_json_float(per_lr[best_lr(per_lr)]),
            lr_bracketed=is_bracketed(per_lr),
        )
        self.baseline_seed(target, row, self.args.seeds[0])

    def baseline_seed(self, target: TargetData, row: dict[str, Any], seed: int) -> None:
        """Test and TinyStories perplexity of a baseline row trained with ``seed``."""
        kind = "lora" if row["method"] == LORA_FP32 else TRAINED_BASELINE[row["method"]]
        state = self.merged_baseline(target, kind, row["lr"], seed)
        splits = ("val", "test", "tinystories")
        if row["method"] == LORA_FP32:
            scores = self.scores(self.models.full_precision(state), target, splits)
        else:
            scores = self.ptq_scores(
                target, state, row["bits"], row["group_size"], row["quantizer"], splits
            )
        self.set_seeded(row, seed, _rename(scores))

    # ---------------------------------------------------------------- QA-LoRA

    def qalora_run(
        self,
        target: TargetData,
        bits: int,
        group_size: int,
        quantizer: str,
        lr: float,
        pooling: str,
        seed: int,
    ) -> dict[str, Any]:
        """Train QA-LoRA once (cached): adapter weights and merged validation perplexity."""
        key = (target.name, bits, group_size, quantizer, lr, pooling, seed)
        if key not in self._qalora:
            alpha = qalora_alpha(pooling, group_size)
            model = self.models.qalora(bits, group_size, quantizer, alpha, seed, target)
            start = time.perf_counter()
            losses = train(
                model,
                training_batches(target.train, self.args.batch_size, self.args.steps, seed),
                self.args.steps,
                lr,
            )
            seconds = time.perf_counter() - start
            self._record_training(
                "qalora",
                target,
                lr,
                seed,
                losses,
                seconds,
                bits=bits,
                group_size=group_size,
                quantizer=quantizer,
                pooling=pooling,
            )
            adapter = adapter_state(model)
            merge_all(model)
            val = self.scores(model, target, ("val",))["val"]
            _log(
                f"{target.name}: qalora b={bits} G={group_size} {quantizer} {pooling} lr={lr:.3g} "
                f"seed={seed}: val ppl {val:.3f} ({seconds:.0f}s)"
            )
            self._qalora[key] = {"adapter": adapter, "val": val, "alpha": alpha}
        return self._qalora[key]

    def qalora_evaluation(
        self,
        target: TargetData,
        bits: int,
        group_size: int,
        quantizer: str,
        lr: float,
        pooling: str,
        seed: int,
    ) -> dict[str, float]:
        """Unmerged and merged test perplexity, merged validation and TinyStories perplexity,
        and the merged-vs-unmerged deviation of a trained QA-LoRA model."""
        run = self.qalora_run(target, bits, group_size, quantizer, lr, pooling, seed)
        model = self.models.qalora(bits, group_size, quantizer, run["alpha"], seed, target)
        model.load_state_dict(run["adapter"], strict=False)
        unmerged = self.scores(model, target, ("test",))["test"]
        merge_all(model)
        scores = _rename(self.scores(model, target, ("val", "test", "tinystories")))
        scores["unmerged_test_ppl"] = unmerged
        scores["merge_deviation"] = abs(scores["test_ppl"] / unmerged - 1.0)
        return scores

    def tune_qalora(
        self, target: TargetData, bits: int, group_size: int
    ) -> tuple[float, str] | None:
        """The (learning rate, pooling) with the best merged validation perplexity on the
        tuning quantizer's base; ``None`` if that base is skipped."""
        quantizer = self.tuning_quantizer()
        if self.is_skipped(target, bits, group_size, quantizer):
            return None
        best: dict[str, tuple[float, float]] = {}
        for pooling in self.args.pooling:
            grid = self.args.qalora_lr_grid if pooling == "mean" else self.args.qalora_sum_lr_grid
            per_lr: dict[float, float] = {}
            pending = list(grid)
            while pending:
                for lr in pending:
                    val = self.qalora_run(
                        target, bits, group_size, quantizer, lr, pooling, self.args.seeds[0]
                    )["val"]
                    per_lr[lr] = val
                    self._record_search(
                        target,
                        QALORA,
                        quantizer,
                        bits,
                        group_size,
                        lr,
                        qalora_alpha(pooling, group_size),
                        val,
                        pooling=pooling,
                    )
                pending = lr_extensions(grid, {pooling: per_lr}, self.args.max_lr_extensions)
            lr = best_lr(per_lr)
            best[pooling] = (lr, per_lr[lr])
            self._bracketed[(target.name, bits, group_size, pooling)] = is_bracketed(per_lr)
        pooling = min(best, key=lambda p: _finite(best[p][1]))
        return best[pooling][0], pooling

    def tuning_quantizer(self) -> str:
        """See :func:`tuning_quantizer`."""
        return tuning_quantizer(self.args.quantizers)

    def qalora_rows(self, target: TargetData) -> None:
        """Tune QA-LoRA per ``(b, G)``, then report it merged on every quantizer's base."""
        for bits, group_size in self.combos():
            failure = f"the {self.tuning_quantizer()} base used for tuning is skipped"
            try:
                choice = self.tune_qalora(target, bits, group_size)
            except ValueError as error:
                choice, failure = None, str(error)
                _log(f"{target.name}: QA-LoRA b={bits} G={group_size} skipped: {error}")
            for quantizer in self.args.quantizers:
                row = self.add_row(target, QALORA, quantizer, bits, group_size)
                reason = self.is_skipped(target, bits, group_size, quantizer)
                if reason or choice is None:
                    row["skipped"] = reason or failure
                    continue
                lr, pooling = choice
                row.update(
                    lr=lr,
                    pooling=pooling,
                    alpha=qalora_alpha(pooling, group_size),
                    tuned_on=self.tuning_quantizer(),
                    lr_bracketed=self._bracketed[(target.name, bits, group_size, pooling)],
                )
                try:
                    self.qalora_seed(target, row, self.args.seeds[0])
                except ValueError as error:
                    row["skipped"] = str(error)
                    _log(
                        f"{target.name}: QA-LoRA b={bits} G={group_size} {quantizer} skipped: {error}"
                    )

    def qalora_seed(self, target: TargetData, row: dict[str, Any], seed: int) -> None:
        """Add one seed's numbers to a QA-LoRA row (trained at the row's tuned settings)."""
        scores = self.qalora_evaluation(
            target,
            row["bits"],
            row["group_size"],
            row["quantizer"],
            row["lr"],
            row["pooling"],
            seed,
        )
        self.set_seeded(row, seed, scores)

    # ---------------------------------------------------------------- seeds, search log

    def _record_search(
        self,
        target: TargetData,
        method: str,
        quantizer: str | None,
        bits: int | None,
        group_size: int | None,
        lr: float,
        alpha: float,
        val: float,
        **extra: Any,
    ) -> None:
        self.search.append(
            dict(
                target=target.name,
                method=method,
                quantizer=quantizer,
                bits=bits,
                group_size=group_size,
                lr=lr,
                alpha=alpha,
                seed=self.args.seeds[0],
                val_ppl=_json_float(val),
                **extra,
            )
        )

    def headline_rows(self, target: TargetData) -> list[dict[str, Any]]:
        """Per bit width and headline group size: the QA-LoRA row and the baseline row with
        the best validation perplexity."""
        chosen = []
        for bits in self.args.bits:
            for group_size in self.args.headline_group_sizes:
                if group_size not in self.args.group_sizes:
                    continue
                for methods in ((QALORA,), BASELINES):
                    best = best_row(self.rows, target.name, methods, bits, group_size)
                    if best is not None:
                        chosen.append(best)
        return chosen

    def seed_headline(self, target: TargetData) -> None:
        """Repeat the headline rows with every further seed of ``--seeds``."""
        for row in self.headline_rows(target):
            row["headline"] = True
            for seed in self.args.seeds[1:]:
                if row["method"] == QALORA:
                    self.qalora_seed(target, row, seed)
                else:
                    self.baseline_seed(target, row, seed)

    # ---------------------------------------------------------------- all

    def run_target(self, target: TargetData) -> None:
        """Every row of one target, in order: untrained rows, LoRA, QLoRA, QA-LoRA, and
        the extra seeds of the headline rows."""
        phases = [
            ("base rows", self.base_rows, ()),
            ("LoRA", self.tune_baseline, (LORA_PTQ,)),
            ("QLoRA", self.tune_baseline, (QLORA_PTQ,)),
            ("QA-LoRA", self.qalora_rows, ()),
        ]
        if target.name in self.args.seed_targets and len(self.args.seeds) > 1:
            phases.append(("seeds", self.seed_headline, ()))
        for phase, work, extra in phases:
            start = time.perf_counter()
            work(target, *extra)
            seconds = time.perf_counter() - start
            self.phase_seconds[f"{target.name}: {phase}"] = seconds
            _log(f"{target.name}: {phase} done in {seconds:.0f}s")


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


# ------------------------------------------------------------------------- report


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
            f"{'yes' if r['lr_bracketed'] else 'no (edge)'} | "
            f"{'-' if deviation is None else f'{100 * deviation:.4f}%'} |"
        )
    return "\n".join(lines)


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


# ------------------------------------------------------------------------- command line


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
