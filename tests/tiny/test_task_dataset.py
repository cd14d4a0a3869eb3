import pytest
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft

from qalora_tune.tiny import (
    TinyTokenizer,
    generate_examples,
    glossary,
    tiny_task_dataset,
)
from qalora_tune.tiny.task import GLOSSARY_SIZE, WORDS_PER_EXAMPLE


def test_examples_follow_the_glossary():
    table = glossary()
    assert len(table) == GLOSSARY_SIZE and glossary() == table  # fixed by its seed
    for prompt, answer in generate_examples("train", 50, seed=3):
        words = prompt[:-1].split(" ")
        assert prompt.endswith("=") and len(words) == WORDS_PER_EXAMPLE
        assert answer == " ".join(table[w] for w in words)


def test_deterministic_by_seed_and_splits_disjoint():
    assert generate_examples("train", 200, seed=1) == generate_examples("train", 200, seed=1)
    assert generate_examples("train", 200, seed=1) != generate_examples("train", 200, seed=2)
    train = {p for p, _ in generate_examples("train", 3000, seed=0)}
    for seed in (0, 1):
        validation = {p for p, _ in generate_examples("validation", 1000, seed=seed)}
        assert not train & validation


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="unknown split"):
        generate_examples("test", 10)
    with pytest.raises(ValueError, match="positive"):
        generate_examples("train", 0)
    with pytest.raises(ValueError, match="glossary size"):
        glossary(0)


def test_labels_mask_the_prompt_and_collate_the_torchtune_way():
    tok = TinyTokenizer()
    ds = tiny_task_dataset(tok, split="validation", num_examples=20, seed=5)
    assert len(ds) == 20
    for (prompt, answer), item in zip(ds.examples, ds):
        tokens, labels = item["tokens"], item["labels"]
        assert tokens == tok.encode(prompt + answer)
        n_prompt = len(prompt) + 1  # with <bos>
        assert labels[:n_prompt] == [CROSS_ENTROPY_IGNORE_IDX] * n_prompt
        assert labels[n_prompt:] == tokens[n_prompt:]  # aligned: the recipe shifts
        assert tok.decode(labels[n_prompt:]) == answer and labels[-1] == tok.eos_id
    batch = padded_collate_sft([ds[i] for i in range(4)])
    assert batch["tokens"].shape == batch["labels"].shape
