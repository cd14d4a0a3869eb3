"""One training step of the fine-tuning recipe: the next-token loss of a batch and the
optimizer step on gradients summed over tokens (and ranks).

The recipe calls these in its loop; ``benchmarks/accuracy.py`` trains its QA-LoRA, LoRA
and QLoRA models through the same two functions.
"""

import contextlib
import math
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torchtune import training

from qalora_tune.recipe_utils._data_loaders import IGNORE_INDEX
from qalora_tune.recipe_utils._distributed import all_reduce_gradients, all_reduce_sum
from qalora_tune.recipe_utils._errors import TrainingError

__all__ = ["check_finite_loss", "loss_step", "optimizer_step"]


def loss_step(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: Dict[str, torch.Tensor],
    activations_ctx: Optional[contextlib.AbstractContextManager] = None,
) -> torch.Tensor:
    """The loss of one batch: position ``t`` predicts token ``t + 1``.

    Args:
        model (nn.Module): returns logits ``(batch, seq, vocab)``, or a list of chunks of
            them along ``seq`` (then ``loss_fn`` takes the list, as torchtune's
            ``CEWithChunkedOutputLoss`` does).
        loss_fn (nn.Module): cross-entropy with ``ignore_index=-100``.
        batch (Dict[str, torch.Tensor]): ``tokens`` and ``labels`` ``(batch, seq)``,
            labels aligned with the tokens (``-100``: no loss). ``labels`` is popped and the
            rest is passed to the model as keywords.
        activations_ctx (contextlib.AbstractContextManager, optional): wraps the forward
            (the recipe's activation offloading).

    Returns:
        torch.Tensor: the loss, a scalar.
    """
    labels = batch.pop("labels")
    with activations_ctx if activations_ctx is not None else contextlib.nullcontext():
        logits = model(**batch)
    # position t predicts token t + 1: shift labels left, pad with the ignore index
    labels = torch.hstack((labels[..., 1:], torch.full_like(labels[..., :1], IGNORE_INDEX)))
    if not isinstance(logits, list):
        labels = labels.reshape(-1)
        logits = logits.reshape(-1, logits.size(-1))
    loss = loss_fn(logits, labels)
    del logits
    return loss


def optimizer_step(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Optional[Any],
    running_loss: torch.Tensor,
    num_tokens: torch.Tensor,
    clip_grad_norm: Optional[float] = None,
) -> Tuple[Optional[torch.Tensor], float]:
    """Sum gradients, loss and token counts over ranks, normalise by the global token
    count and step.

    Args:
        model (nn.Module): the model whose gradients are scaled.
        params (Iterable[nn.Parameter]): the trained parameters.
        optimizer (torch.optim.Optimizer): steps ``params``.
        lr_scheduler (optional): stepped after the optimizer when given.
        running_loss (torch.Tensor): the losses of the micro-batches since the last step,
            each multiplied by its token count, summed (a scalar).
        num_tokens (torch.Tensor): the labelled tokens of those micro-batches.
        clip_grad_norm (float, optional): clip the gradient norm of ``params`` to this.

    Returns:
        Tuple[Optional[torch.Tensor], float]: the gradient norm (when clipping) and the
        step's loss per token.
    """
    params = list(params)
    totals = torch.stack([running_loss.to(torch.float64), num_tokens.to(torch.float64)])
    loss_sum, token_count = all_reduce_sum(totals).tolist()
    all_reduce_gradients(params)
    device = running_loss.device
    training.scale_grads(model, 1 / torch.tensor(token_count, device=device))
    grad_norm = None
    if clip_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=float(clip_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:
        lr_scheduler.step()
    return grad_norm, loss_sum / token_count


def check_finite_loss(step_loss: float, global_step: int, checkpointer: Any) -> None:
    """Stop a run whose loss stopped being finite, naming the last good checkpoint.

    Raises:
        TrainingError: if ``step_loss`` is NaN or infinite.
    """
    if math.isfinite(step_loss):
        return
    last_good = checkpointer.latest_checkpoint_dir()
    kept = (
        f"the last good checkpoint, {last_good}, is kept as it was"
        if last_good is not None
        else "no checkpoint was saved"
    )
    raise TrainingError(
        f"the loss became {step_loss} at step {global_step}; lower optimizer.lr or set "
        f"clip_grad_norm; {kept}"
    )
