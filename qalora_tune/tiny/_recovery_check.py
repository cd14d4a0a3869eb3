"""Experiment: does a short QA-LoRA fine-tune recover the int4 tiny base?

    python -m qalora_tune.tiny._recovery_check --checkpoint-dir /tmp/tiny_base \
        --lrs 1e-2,2e-2,3e-2 --steps 200 --batch-size 32

Makes (or reuses) the tiny base, replaces every ``nn.Linear`` by
``QALoRALinear.from_linear(linear, rank=8, alpha=16, group_size=32)`` (int4 RTN base,
everything but the adapters frozen), trains the adapters with AdamW on the train split
and reports validation answer-token loss/accuracy before and after, next to the fp32 base.
"""

import argparse
import json
import math
import random
import time
from typing import Dict, List, Optional

import torch
from torchtune.data import padded_collate_sft

from qalora_tune.tiny.base import load_tiny_base, prepare_tiny_base
from qalora_tune.tiny.dataset import TinyTaskDataset
from qalora_tune.tiny.metrics import (
    answer_metrics,
    shifted_loss_and_correct,
    to_qalora_,
)
from qalora_tune.tiny.tokenizer import TinyTokenizer

__all__ = ["recover", "main"]


def recover(
    checkpoint_dir: str,
    lr: float,
    steps: int = 200,
    batch_size: int = 32,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    num_train: int = 10_000,
    num_validation: int = 1000,
    warmup_steps: int = 10,
) -> Dict[str, float]:
    """Train the QA-LoRA adapters of the int4 tiny base; return before/after metrics."""
    tokenizer = TinyTokenizer.load(checkpoint_dir)
    train = TinyTaskDataset(tokenizer, "train", num_examples=num_train, seed=seed + 1)
    validation = TinyTaskDataset(tokenizer, "validation", num_examples=num_validation, seed=0)
    torch.manual_seed(seed)
    model = load_tiny_base(checkpoint_dir)
    fp32 = answer_metrics(model, validation)
    model = to_qalora_(model, rank=rank, alpha=alpha, group_size=32)
    before = answer_metrics(model, validation)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
        batch = padded_collate_sft([train[i] for i in idx])
        loss_sum, _, n = shifted_loss_and_correct(model(batch["tokens"]), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / n).backward()
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    after = answer_metrics(model, validation)
    gap = before["loss"] - fp32["loss"]
    return {
        "lr": lr,
        "steps": steps,
        "batch_size": batch_size,
        "train_seconds": round(seconds, 2),
        "fp32_loss": fp32["loss"],
        "fp32_acc": fp32["accuracy"],
        "int4_loss": before["loss"],
        "int4_acc": before["accuracy"],
        "qalora_loss": after["loss"],
        "qalora_acc": after["accuracy"],
        "loss_gap_recovered": (before["loss"] - after["loss"]) / gap if gap > 0 else float("nan"),
    }


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint-dir", default="/tmp/qalora_tiny_base")
    parser.add_argument("--lrs", default="1e-2,2e-2,3e-2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prepare_tiny_base(args.checkpoint_dir, seed=args.seed)
    for lr in [float(x) for x in args.lrs.split(",")]:
        result = recover(
            args.checkpoint_dir, lr, steps=args.steps, batch_size=args.batch_size, seed=args.seed
        )
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
