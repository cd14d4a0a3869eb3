"""Held-out loss, perplexity and next-token accuracy of a causal language model."""

import contextlib
import math
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from qalora_tune.errors import UserValueError
from qalora_tune.recipe_utils._distributed import all_reduce_sum

__all__ = ["adapters_disabled", "evaluate_lm", "full_logits", "joined_logits", "next_token_loss"]

IGNORE_INDEX = -100


def joined_logits(output) -> torch.Tensor:
    """A model's logits ``(batch, seq, vocab)`` in its own dtype, joining torchtune's
    chunked output."""
    return torch.cat(output, dim=1) if isinstance(output, list) else output


def full_logits(output) -> torch.Tensor:
    """A model's logits ``(batch, seq, vocab)`` in fp32, joining torchtune's chunked output."""
    return joined_logits(output).float()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, first: int = 0) -> Tuple[float, int]:
    """Summed next-token cross-entropy (nats) and the number of labelled tokens.

    Args:
        logits (torch.Tensor): ``(batch, positions, vocab)``: the logits of positions
            ``first, first + 1, ...`` (by default all of them).
        labels (torch.Tensor): ``(batch, seq)`` aligned with the tokens, ``-100`` where no
            loss is taken; position ``t`` predicts ``labels[t + 1]`` (the last position
            predicts nothing).
        first (int): the position of ``logits[:, 0]``, for logits taken a slice of
            positions at a time.
    """
    targets = labels[:, first + 1 : first + 1 + logits.shape[1]]
    mask = targets != IGNORE_INDEX
    loss = F.cross_entropy(logits[:, : targets.shape[1]][mask], targets[mask], reduction="sum")
    return loss.item(), int(mask.sum())


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    batches: Iterable[Dict[str, torch.Tensor]],
    device: torch.device,
    max_batches: Optional[int] = None,
    sum_across_ranks: bool = False,
) -> Dict[str, float]:
    """Mean next-token cross-entropy (nats), perplexity and accuracy over labelled tokens,
    and exact match: the share of sequences whose labelled tokens are all predicted right.

    Labels follow torchtune's SFT convention: aligned with ``tokens``, ``-100`` where no
    loss is taken; position ``t`` predicts ``labels[t + 1]``.

    Args:
        model (nn.Module): returns logits ``(batch, seq, vocab)`` (or a list of chunks of
            them along ``seq``).
        batches (Iterable): dicts with ``tokens`` and ``labels`` of shape ``(batch, seq)``.
        device (torch.device): where the model runs.
        max_batches (int, optional): stop after this many batches.
        sum_across_ranks (bool): ``batches`` is this rank's shard of the data: the counts
            are summed over the ranks of the process group (every rank must call).

    Returns:
        Dict[str, float]: ``loss``, ``perplexity``, ``accuracy``, ``exact_match`` and
        ``tokens``.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count, exact, sequences = 0.0, 0, 0, 0, 0
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        tokens = batch["tokens"].to(device)
        labels = batch["labels"].to(device)[:, 1:]
        logits = full_logits(model(tokens))
        batch_loss, _ = next_token_loss(logits, batch["labels"].to(device))
        total_loss += batch_loss
        logits = logits[:, :-1]
        mask = labels != IGNORE_INDEX
        hits = logits.argmax(-1) == labels
        correct += hits[mask].sum().item()
        count += int(mask.sum())
        labelled = mask.any(dim=1)
        exact += int(((hits | ~mask).all(dim=1) & labelled).sum())
        sequences += int(labelled.sum())
    model.train(was_training)
    if sum_across_ranks:
        totals = torch.tensor([total_loss, correct, count, exact, sequences], dtype=torch.float64)
        total_loss, correct, count, exact, sequences = all_reduce_sum(totals.to(device)).tolist()
    if count == 0:
        raise UserValueError("the validation data has no labelled tokens to evaluate")
    loss = total_loss / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "accuracy": correct / count,
        "exact_match": exact / sequences,
        "tokens": int(count),
    }


@contextlib.contextmanager
def adapters_disabled(layers: Iterable[Any]) -> Iterator[None]:
    """Run the QA-LoRA ``layers`` as their int4 base alone inside the block."""
    layers = list(layers)
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False
