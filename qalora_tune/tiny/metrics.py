"""Answer-token loss and accuracy of a decoder, and int4 (QA-LoRA) conversion of its linears.

Loss and accuracy follow torchtune's recipes: labels are aligned with tokens and shifted
by one here (``logits[:, t]`` predicts ``labels[:, t + 1]``); positions labelled
``CROSS_ENTROPY_IGNORE_IDX`` (the prompt) do not count.
"""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft

from qalora_tune.models import swap_linears
from qalora_tune.modules import QALoRAConfig
from qalora_tune.recipe_utils import evaluate_lm

__all__ = ["answer_metrics", "shifted_loss_and_correct", "to_qalora_"]


def shifted_loss_and_correct(
    logits: torch.Tensor, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and correct-token count over the answer tokens.

    Args:
        logits (torch.Tensor): ``(B, L, V)``.
        labels (torch.Tensor): ``(B, L)``, aligned with the input tokens.

    Returns:
        Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: summed loss (scalar, nats),
        number of correct argmax predictions (scalar) and number of answer tokens (scalar).
    """
    loss, hits, keep = _shifted(logits, labels)
    return loss, hits[keep].sum(), keep.sum()


def _shifted(
    logits: torch.Tensor, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # torchtune's shift: logits[:, t] predicts labels[:, t + 1]
    ignore = torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_IDX)
    targets = torch.cat((labels[:, 1:], ignore), dim=1)
    keep = targets != CROSS_ENTROPY_IGNORE_IDX
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), reduction="sum",
        ignore_index=CROSS_ENTROPY_IGNORE_IDX,
    )
    hits = logits.argmax(-1) == targets  # (B, L)
    return loss, hits, keep


def answer_metrics(
    model: nn.Module, items: Sequence[Dict[str, List[int]]], batch_size: int = 250
) -> Dict[str, float]:
    """Mean answer-token cross-entropy and argmax accuracy (teacher forcing), through the
    recipe's own :func:`~qalora_tune.recipe_utils.evaluate_lm`.

    Args:
        model (nn.Module): decoder mapping tokens ``(B, L)`` to logits ``(B, L, V)``.
        items (Sequence[Dict[str, List[int]]]): ``{"tokens", "labels"}`` items, e.g. a
            :class:`~qalora_tune.tiny.dataset.TinyTaskDataset`.
        batch_size (int): evaluation batch size.

    Returns:
        Dict[str, float]: ``loss`` (nats per answer token), ``accuracy`` (fraction of
        answer tokens predicted right), ``exact_match`` (fraction of examples with every
        answer token right), ``perplexity`` and ``tokens`` (number of answer tokens).
    """
    batches = (
        padded_collate_sft([items[i] for i in range(start, min(start + batch_size, len(items)))])
        for start in range(0, len(items), batch_size)
    )
    device = next(model.parameters(), torch.empty(0)).device
    return evaluate_lm(model, batches, device)


def to_qalora_(
    model: nn.Module, rank: int = 8, alpha: float = 16.0, group_size: int = 32
) -> nn.Module:
    """Replace every ``nn.Linear`` (output projection included) by a :class:`QALoRALinear`.

    The bases are quantized to int4 (RTN, asymmetric, ``group_size`` inputs per group);
    ``B = 0``, so the model computes the int4 base exactly. Everything except the adapters
    (``lora_a.weight``, ``lora_b.weight``) is frozen.

    Args:
        model (nn.Module): full-precision model, changed in place.
        rank (int): adapter rank.
        alpha (float): adapter scaling numerator.
        group_size (int): quantization and pooling group size.

    Returns:
        nn.Module: ``model``.
    """
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    swap_linears(model, names, QALoRAConfig(group_size=group_size, rank=rank, alpha=alpha))
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(("lora_a.weight", "lora_b.weight")))
    return model
