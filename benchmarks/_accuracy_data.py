"""The data of ``benchmarks/accuracy.py``: each target's training examples, evaluation
batches and GPTQ calibration, the TinyStories forgetting slice, and the training batches
every method sees in the same order."""

import argparse
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from _accuracy_common import (
    ALPACA_FILE,
    ALPACA_SIZES,
    IGNORE_INDEX,
    SHAKESPEARE_FILE,
    TEXT_FRACTIONS,
    TINYSTORIES_FILE,
    Example,
    split_by_position,
    split_records,
)

Batch = dict[str, torch.Tensor]


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

