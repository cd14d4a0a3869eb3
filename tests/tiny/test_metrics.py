import torch
from torch import nn

from qalora_tune.tiny import TinyTokenizer, answer_metrics, tiny_task_dataset


class _Oracle(nn.Module):
    """Predicts token t + 1 at position t (what a perfect decoder does)."""

    def __init__(self, vocab_size: int, shift: int = 1):
        super().__init__()
        self.vocab_size, self.shift = vocab_size, shift

    def forward(self, tokens):
        nxt = torch.roll(tokens, -self.shift, dims=1)
        return 20.0 * nn.functional.one_hot(nxt, self.vocab_size).float()


def test_metrics_use_the_torchtune_shift():
    tok = TinyTokenizer()
    ds = tiny_task_dataset(tok, split="validation", num_examples=30, seed=0)
    perfect = answer_metrics(_Oracle(tok.vocab_size), ds, batch_size=8)
    assert perfect["accuracy"] == 1.0 and perfect["exact_match"] == 1.0
    assert perfect["loss"] < 1e-6
    # "3 words of 3 digits + 2 spaces + <eos>" answer tokens per example
    assert perfect["tokens"] == 30 * 12
    unshifted = answer_metrics(_Oracle(tok.vocab_size, shift=0), ds)
    assert unshifted["accuracy"] < 0.2 and unshifted["exact_match"] == 0.0
