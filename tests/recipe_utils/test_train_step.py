"""The recipe's training step: next-token loss and the optimizer step on token-summed
gradients, against float64 references on fresh random data."""

import torch
from torch import nn

from qalora_tune.recipe_utils import IGNORE_INDEX, loss_step, optimizer_step


class _TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def _batch(generator: torch.Generator, vocab: int, batch: int, seq: int):
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = tokens.clone()
    labels[torch.rand(batch, seq, generator=generator) < 0.3] = IGNORE_INDEX
    return {"tokens": tokens, "labels": labels}


def _reference_loss(model: nn.Module, batch) -> torch.Tensor:
    """Sum over labelled positions t >= 1 of -log p(label_t | tokens_<t), in float64."""
    logits = model.double()(batch["tokens"])[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1)
    return -logp[mask].gather(-1, labels[mask][:, None]).sum(), int(mask.sum())


def test_loss_step_is_the_mean_next_token_cross_entropy():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    model = _TinyLM(vocab=17, dim=8)
    batch = _batch(generator, 17, batch=3, seq=9)
    reference = {k: v.clone() for k, v in batch.items()}
    loss = loss_step(model, nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX), batch)
    assert "labels" not in batch  # popped, the rest went to the model
    total, count = _reference_loss(model, reference)
    torch.testing.assert_close(loss.double(), total / count, rtol=1e-5, atol=0)


def test_optimizer_step_divides_token_summed_gradients_by_the_token_count():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    model = _TinyLM(vocab=11, dim=6)
    batches = [_batch(generator, 11, batch=2, seq=7) for _ in range(2)]
    reference_model = _TinyLM(11, 6)
    reference_model.load_state_dict(model.state_dict())
    reference_model.double()

    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.5)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    running, tokens = 0.0, 0
    for batch in batches:  # two micro-batches, as with gradient accumulation
        count = (batch["labels"] != IGNORE_INDEX).sum()
        loss = loss_step(model, loss_fn, dict(batch)) * count
        running, tokens = running + loss.detach(), tokens + count
        loss.backward()
    _, step_loss = optimizer_step(model, params, optimizer, None, running, tokens)

    # the recipe weights each micro-batch's mean loss by all its labels (position 0 too)
    weighted, all_labels = 0.0, 0
    for batch in batches:
        total, count = _reference_loss(reference_model, batch)
        labels = int((batch["labels"] != IGNORE_INDEX).sum())
        weighted, all_labels = weighted + total / count * labels, all_labels + labels
    (weighted / all_labels).backward()
    expected_loss = weighted.detach() / all_labels
    step_loss = torch.tensor(step_loss, dtype=torch.float64)
    torch.testing.assert_close(step_loss, expected_loss, rtol=1e-5, atol=0)
    for param, ref in zip(model.parameters(), reference_model.parameters()):
        expected = ref.detach() - 0.5 * ref.grad
        torch.testing.assert_close(param.detach().double(), expected, rtol=1e-5, atol=1e-6)
        assert param.grad is None  # zeroed for the next step
