"""A loss component whose value is always NaN (``loss._component_=tests.recipes.nan_loss.NaNLoss``):
how ``tests/recipes/test_bad_inputs.py`` makes a resumed run's loss non-finite (a config's
learning rate cannot, since resuming restores the optimizer's saved one)."""

import torch
from torchtune.modules.loss import CEWithChunkedOutputLoss

__all__ = ["NaNLoss"]


class NaNLoss(CEWithChunkedOutputLoss):
    """torchtune's chunked cross-entropy, multiplied by NaN."""

    def forward(self, logits, labels) -> torch.Tensor:
        return super().forward(logits, labels) * float("nan")
