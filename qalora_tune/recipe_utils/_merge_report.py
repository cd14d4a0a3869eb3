"""Merge the adapters into the int4 zero points, measuring what the merge changed."""

import math
from typing import Any, Dict, Iterable, Mapping

import torch
from torch import nn

from qalora_tune.modules import QALoRALinear
from qalora_tune.recipe_utils._evaluation import full_logits, next_token_loss

__all__ = ["merge_with_report"]


def _perplexity(loss: float, count: int) -> Dict[str, float]:
    mean = loss / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 80.0))}


@torch.no_grad()
def merge_with_report(
    model: nn.Module,
    adapters: Iterable[QALoRALinear],
    probe: Mapping[str, torch.Tensor],
    device: torch.device,
) -> Dict[str, Any]:
    """Merge every adapter (``z += (alpha/r)(BA)/G``) and report merged vs unmerged logits.

    The model computes the probe batch before and after the merge, in eval mode.
    ``unmerge()`` restores the previous zeros bit for bit.

    Args:
        model (nn.Module): the QA-LoRA model; its adapters are merged on return.
        adapters (Iterable[QALoRALinear]): the model's adapted layers, not merged.
        probe (Mapping[str, torch.Tensor]): a batch with ``tokens`` ``(batch, seq)`` and,
            for perplexities, ``labels`` (``-100`` where no loss is taken).
        device (torch.device): where the model runs.

    Returns:
        Dict[str, Any]: ``max_relative_logit_error`` and ``mean_relative_logit_error``
        (per position ``|l_merged - l_unmerged|_2 / |l_unmerged|_2``, max and mean over
        positions), ``max_abs_logit_error``, the loss and perplexity of ``unmerged`` and
        ``merged`` on the labelled tokens, their ``perplexity_relative_difference``, and the
        probe's size.
    """
    was_training = model.training
    model.eval()
    tokens = probe["tokens"].to(device)
    labels = probe.get("labels")
    unmerged = full_logits(model(tokens))
    for layer in adapters:
        layer.merge()
    merged = full_logits(model(tokens))
    model.train(was_training)
    error = (merged - unmerged).norm(dim=-1) / unmerged.norm(dim=-1).clamp_min(1e-30)
    report: Dict[str, Any] = {
        "probe_sequences": int(tokens.shape[0]),
        "probe_tokens": int(tokens.numel()),
        "max_relative_logit_error": error.max().item(),
        "mean_relative_logit_error": error.mean().item(),
        "max_abs_logit_error": (merged - unmerged).abs().max().item(),
    }
    if labels is not None:
        labels = labels.to(device)
        report["unmerged"] = _perplexity(*next_token_loss(unmerged, labels))
        report["merged"] = _perplexity(*next_token_loss(merged, labels))
        before, after = report["unmerged"]["perplexity"], report["merged"]["perplexity"]
        report["perplexity_relative_difference"] = abs(after - before) / before
    report["definition"] = (
        "per token position, |logits_merged - logits_unmerged|_2 / |logits_unmerged|_2 on "
        "the probe batch, same dtype and kernels as training"
    )
    return report
