"""Config resolution (--config NAME) and held-out evaluation of a causal LM."""

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from qalora_tune.recipe_utils import (
    evaluate_lm,
    packaged_config_names,
    resolve_config,
    resolve_config_argv,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


# ---------------------------------------------------------------------- configs


def test_packaged_names_are_the_yaml_files_in_configs():
    names = packaged_config_names()
    assert names == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "llama2_7B_qalora" in names and "stories260K_qalora" in names


@pytest.mark.parametrize("name", ["llama2_7B_qalora", "llama2_7B_qalora.yaml"])
def test_resolve_packaged_name_with_or_without_extension(name):
    path = Path(resolve_config(name))
    assert path.is_file() and path.name == "llama2_7B_qalora.yaml"
    assert path.read_bytes() == (CONFIG_DIR / "llama2_7B_qalora.yaml").read_bytes()


def test_resolve_existing_path_is_kept(tmp_path):
    custom = tmp_path / "llama2_7B_qalora.yaml"  # same name as a packaged one: path wins
    custom.write_text("model: {}\n")
    assert resolve_config(str(custom)) == str(custom)


def test_unknown_config_lists_the_packaged_names():
    with pytest.raises(ValueError, match="neither a file nor a packaged config") as info:
        resolve_config("llama9_1T_qalora")
    message = str(info.value)
    assert "llama9_1T_qalora" in message
    for name in packaged_config_names():
        assert name in message


def test_resolve_config_argv_rewrites_only_the_config_value(tmp_path):
    argv = [
        "qalora_finetune", "--config", "stories260K_qalora", "batch_size=4",
        "model.lora_rank=2", "output_dir=stories260K_qalora",
    ]
    resolved = resolve_config_argv(argv)
    assert resolved[2] == resolve_config("stories260K_qalora")
    assert resolved[:2] + resolved[3:] == argv[:2] + argv[3:]
    assert argv[2] == "stories260K_qalora"  # the input is not mutated
    # no --config, or --config as the last word: unchanged
    assert resolve_config_argv(["a", "b=1"]) == ["a", "b=1"]
    assert resolve_config_argv(["a", "--config"]) == ["a", "--config"]
    with pytest.raises(ValueError, match="packaged configs"):
        resolve_config_argv(["--config", "nope"])


@pytest.mark.parametrize("name", packaged_config_names())
def test_every_config_opens_with_its_own_run_command(name):
    lines = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()
    assert lines and lines[0].startswith("#"), f"{name}.yaml does not open with a comment"
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    recipe = "qalora_finetune"
    for suffix in ("_generate", "_eval"):  # configs of the generation and evaluation recipes
        if name.endswith(suffix):
            recipe = f"qalora{suffix}"
    assert f"tune run {recipe} --config {name}" in text
    # every command in the header is for this config, not copied from another one (a
    # generation or evaluation config also names the training config that writes its model)
    allowed = {name, name.removesuffix("_generate").removesuffix("_eval")}
    assert name in set(re.findall(r"--config\s+(\S+)", text)) <= allowed


# ---------------------------------------------------------------------- evaluate_lm


class TinyLM(nn.Module):
    """Bigram-plus-position logits: enough structure for a nontrivial reference."""

    def __init__(self, vocab=11, dim=8, seed=0, chunks=None):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, dim, generator=gen))
        self.pos = nn.Parameter(torch.randn(64, dim, generator=gen) * 0.5)
        self.proj = nn.Parameter(torch.randn(vocab, dim, generator=gen))
        self.chunks = chunks

    def forward(self, tokens):
        h = torch.tanh(self.embed[tokens] + self.pos[: tokens.shape[1]])
        logits = h @ self.proj.t() * 2.0
        if self.chunks:
            return list(logits.chunk(self.chunks, dim=1))
        return logits


def _reference(model, batches):
    """Float64 loop over (b, t): position t predicts labels[t + 1], -100 skipped."""
    total, correct, count = 0.0, 0, 0
    for batch in batches:
        with torch.no_grad():
            logits = model(batch["tokens"])
        if isinstance(logits, list):
            logits = torch.cat(logits, dim=1)
        logp = torch.log_softmax(logits.double(), dim=-1)
        bsz, seq = batch["tokens"].shape
        for b in range(bsz):
            for t in range(seq - 1):
                target = int(batch["labels"][b, t + 1])
                if target == -100:
                    continue
                total -= logp[b, t, target].item()
                correct += int(int(logp[b, t].argmax()) == target)
                count += 1
    return total / count, correct / count, count


def _batches(seed=0, vocab=11):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for bsz, seq in ((3, 9), (2, 14)):
        tokens = torch.randint(0, vocab, (bsz, seq), generator=gen)
        labels = tokens.clone()
        labels[torch.rand(bsz, seq, generator=gen) < 0.3] = -100
        labels[0, :4] = -100  # a masked prompt
        labels[-1, -1] = -100
        out.append({"tokens": tokens, "labels": labels})
    return out


@pytest.mark.parametrize("chunks", [None, 3], ids=["tensor", "chunked"])
def test_evaluate_lm_matches_a_float64_reference(chunks):
    model = TinyLM(chunks=chunks)
    batches = _batches()
    loss, accuracy, count = _reference(model, batches)
    model.train()
    result = evaluate_lm(model, batches, torch.device("cpu"))
    assert model.training  # restored
    assert result["tokens"] == count
    # fp32 log-softmax over 11 logits of size ~10: relative error ~1e-6
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["accuracy"] == accuracy
    assert 0.0 < accuracy < 1.0  # the accuracy check is not degenerate


def test_evaluate_lm_uses_the_next_label_not_the_current_one():
    # a model that always predicts the *current* token with certainty: under the shift
    # convention every labelled position where the next token differs costs ~20 nats
    vocab = 5

    class Copy(nn.Module):
        def forward(self, tokens):
            return torch.nn.functional.one_hot(tokens, vocab).float() * 40.0

    tokens = torch.tensor([[0, 1, 2, 3, 4, 0]])
    result = evaluate_lm(Copy(), [{"tokens": tokens, "labels": tokens.clone()}], "cpu")
    assert result["tokens"] == 5 and result["accuracy"] == 0.0
    assert result["loss"] == pytest.approx(40.0 + math.log1p(4 * math.exp(-40.0)), rel=1e-6)

    class Next(nn.Module):
        def forward(self, tokens):
            return torch.nn.functional.one_hot((tokens + 1) % vocab, vocab).float() * 40.0

    result = evaluate_lm(Next(), [{"tokens": tokens, "labels": tokens.clone()}], "cpu")
    assert result["accuracy"] == 1.0 and result["loss"] < 1e-12


def test_evaluate_lm_max_batches_and_empty_labels():
    model = TinyLM()
    batches = _batches(seed=1)
    loss, _, count = _reference(model, batches[:1])
    result = evaluate_lm(model, iter(batches), "cpu", max_batches=1)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(loss, rel=1e-5)

    tokens = torch.randint(0, 11, (2, 6))
    masked = {"tokens": tokens, "labels": torch.full_like(tokens, -100)}
    with pytest.raises(ValueError, match="no labelled tokens"):
        evaluate_lm(model, [masked], "cpu")
    # labels only at position 0 are never predicted (nothing precedes them)
    first_only = torch.full_like(tokens, -100)
    first_only[:, 0] = tokens[:, 0]
    with pytest.raises(ValueError, match="no labelled tokens"):
        evaluate_lm(model, [{"tokens": tokens, "labels": first_only}], "cpu")
