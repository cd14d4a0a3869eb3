"""A cosine learning-rate schedule with warmup that decays to a floor instead of zero."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from qalora_tune.errors import UserValueError

__all__ = ["get_cosine_schedule_with_floor"]


def get_cosine_schedule_with_floor(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    min_lr_ratio: float = 0.1,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warmup from 0 to the optimizer's ``lr`` over ``num_warmup_steps``, then a half
    cosine from ``lr`` down to ``min_lr_ratio * lr`` at ``num_training_steps`` (held there
    after it). ``min_lr_ratio=0`` is torchtune's ``get_cosine_schedule_with_warmup``.

    A config component, as torchtune's schedulers are::

        lr_scheduler:
          _component_: qalora_tune.recipe_utils.get_cosine_schedule_with_floor
          num_warmup_steps: 10
          min_lr_ratio: 0.1

    Args:
        optimizer (Optimizer): the optimizer whose learning rates are scheduled.
        num_warmup_steps (int): steps of linear warmup.
        num_training_steps (int): steps of the whole run (the recipe passes it).
        min_lr_ratio (float): the floor, as a fraction of the peak learning rate, in [0, 1].
        last_epoch (int): the index of the last step when resuming (-1: a fresh start).

    Returns:
        LambdaLR: the schedule (its state dict resumes it).

    Raises:
        UserValueError: if ``min_lr_ratio`` is outside [0, 1] or a step count is negative.
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise UserValueError(
            f"lr_scheduler.min_lr_ratio={min_lr_ratio!r} must be in [0, 1] (a fraction of "
            "optimizer.lr); set it to e.g. 0.1"
        )
    if num_warmup_steps < 0 or num_training_steps < 0:
        raise UserValueError(
            f"lr_scheduler.num_warmup_steps={num_warmup_steps} and num_training_steps="
            f"{num_training_steps} must not be negative"
        )

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = min(1.0, (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor, last_epoch)
