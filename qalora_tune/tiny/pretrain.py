"""Pretrain the full-precision tiny base on the generated train split."""

import math
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torchtune.data import padded_collate_sft

from qalora_tune.errors import UserValueError
from qalora_tune.tiny.dataset import encode_example
from qalora_tune.tiny.metrics import shifted_loss_and_correct
from qalora_tune.tiny.task import generate_examples
from qalora_tune.tiny.tokenizer import TinyTokenizer

__all__ = ["pretrain"]


def pretrain(
    model: nn.Module,
    tokenizer: TinyTokenizer,
    steps: int,
    batch_size: int = 64,
    lr: float = 5e-3,
    warmup_steps: int = 50,
    seed: int = 0,
    max_seconds: Optional[float] = None,
    log: Optional[Callable[[str], None]] = print,
) -> Dict[str, float]:
    """Train every parameter with AdamW on fresh train-split examples (no example repeats).

    Linear warm-up then cosine decay to zero, gradient clipping at 1.0, no weight decay.
    The loss is the mean cross-entropy over answer tokens, torchtune-shifted.

    Args:
        model (nn.Module): decoder, tokens ``(B, L)`` -> logits ``(B, L, V)``.
        tokenizer (TinyTokenizer): character tokenizer.
        steps (int): optimizer steps.
        batch_size (int): examples per step.
        lr (float): peak learning rate.
        warmup_steps (int): linear warm-up length.
        seed (int): seed of the training examples' stream.
        max_seconds (float, optional): stop early once training has taken this long.
        log (Callable[[str], None], optional): progress sink (a few lines); None for quiet.

    Returns:
        Dict[str, float]: ``steps`` done, ``seconds`` (generation + training) and the last
        ``train_loss``.

    Raises:
        ValueError: if ``steps`` or ``batch_size`` is not positive.
    """
    if steps <= 0 or batch_size <= 0:
        raise UserValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    start = time.perf_counter()
    examples = generate_examples("train", steps * batch_size, seed=seed)
    items = [encode_example(tokenizer, p, a) for p, a in examples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def schedule(step: int) -> float:
        warm = min(1.0, (step + 1) / max(warmup_steps, 1))
        return warm * 0.5 * (1.0 + math.cos(math.pi * step / steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    loss_value = float("nan")
    done = 0
    log_every = max(steps // 4, 1)
    for step in range(steps):
        batch = padded_collate_sft(items[step * batch_size : (step + 1) * batch_size])
        loss_sum, _, n_tokens = shifted_loss_and_correct(model(batch["tokens"]), batch["labels"])
        loss = loss_sum / n_tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        done = step + 1
        elapsed = time.perf_counter() - start
        if log is not None and (done % log_every == 0 or done == steps):
            log(f"[tiny base] step {done}/{steps}  loss {loss_value:.4f}  {elapsed:.1f}s")
        if max_seconds is not None and elapsed > max_seconds and done < steps:
            if log is not None:
                log(f"[tiny base] time budget {max_seconds:.0f}s reached at step {done}")
            break
    model.eval()
    return {"steps": done, "seconds": time.perf_counter() - start, "train_loss": loss_value}
