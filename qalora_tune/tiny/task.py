"""The embedded tiny task: translating words through a procedurally generated glossary.

A fixed *glossary* maps ``GLOSSARY_SIZE`` random three-letter words to random three-digit
codes; it is generated from :data:`GLOSSARY_SEED`, so it is part of the task definition and
shared by every split. An example translates a few words::

    prompt: "qzk bma tuf="      answer: "417 203 998"

Each answer digit depends on all three letters of one word and on a fact the model has to
store in its weights (the glossary cannot be inferred from the prompt). Stored facts are
what weight quantization damages first, which is why the task is used to show QA-LoRA
recovering an int4 base.

Splits are disjoint by construction: a sentence belongs to the validation split iff a
stable hash of its prompt falls in bucket 0 of :data:`_NUM_BUCKETS`; each split only keeps
its own sentences, and the two splits also draw from different random streams.
"""

import itertools
import random
import zlib
from typing import Dict, List, Tuple

from qalora_tune.errors import UserValueError

__all__ = [
    "DEFAULT_NUM_EXAMPLES",
    "GLOSSARY_SEED",
    "GLOSSARY_SIZE",
    "SPLITS",
    "WORDS_PER_EXAMPLE",
    "generate_examples",
    "glossary",
    "make_example",
]

GLOSSARY_SEED = 20230917
"""Seed of the glossary (the task's 'knowledge'); fixed, independent of the split seeds."""

GLOSSARY_SIZE = 500
"""Number of words in the glossary."""

WORDS_PER_EXAMPLE = 3
"""Words translated per example."""

DEFAULT_NUM_EXAMPLES = 10_000
"""Default number of examples of a dataset split."""

SPLITS = ("train", "validation")
"""Known split names."""

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_NUM_BUCKETS = 8  # validation is hash bucket 0: 1/8 of all sentences


def glossary(size: int = GLOSSARY_SIZE, seed: int = GLOSSARY_SEED) -> Dict[str, str]:
    """The word -> code table.

    Args:
        size (int): number of words (at most 26**3).
        seed (int): glossary seed.

    Returns:
        Dict[str, str]: ``size`` distinct three-letter words, in generation order, each
        mapped to a three-digit code (codes may repeat).

    Raises:
        ValueError: if ``size`` is not in ``[1, 26**3]``.
    """
    if not 1 <= size <= len(_LETTERS) ** 3:
        raise UserValueError(f"glossary size must be in [1, {len(_LETTERS) ** 3}], got {size}")
    rng = random.Random(seed)
    all_words = ["".join(w) for w in itertools.product(_LETTERS, repeat=3)]
    words = rng.sample(all_words, size)
    return {w: f"{rng.randrange(1000):03d}" for w in words}


_GLOSSARY = glossary()
_WORDS = list(_GLOSSARY)


def make_example(rng: random.Random) -> Tuple[str, str]:
    """Draw one example.

    Args:
        rng (random.Random): source of randomness.

    Returns:
        Tuple[str, str]: ``(prompt, answer)``, e.g. ``("qzk bma tuf=", "417 203 998")``.
    """
    words = [rng.choice(_WORDS) for _ in range(WORDS_PER_EXAMPLE)]
    return " ".join(words) + "=", " ".join(_GLOSSARY[w] for w in words)


def split_of(prompt: str) -> str:
    """The split a prompt belongs to (stable across runs and platforms)."""
    return "validation" if zlib.crc32(prompt.encode()) % _NUM_BUCKETS == 0 else "train"


def generate_examples(split: str, num_examples: int, seed: int = 0) -> List[Tuple[str, str]]:
    """Deterministic examples of one split.

    Args:
        split (str): ``"train"`` or ``"validation"``.
        num_examples (int): how many examples.
        seed (int): seed of the split's random stream.

    Returns:
        List[Tuple[str, str]]: ``num_examples`` ``(prompt, answer)`` pairs; the same
        arguments always give the same list, and no prompt of one split occurs in the other.

    Raises:
        ValueError: for an unknown split or a non-positive ``num_examples``.
    """
    if split not in SPLITS:
        raise UserValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if num_examples <= 0:
        raise UserValueError(f"num_examples must be positive, got {num_examples}")
    rng = random.Random(f"qalora_tune.tiny:{split}:{seed}")
    examples: List[Tuple[str, str]] = []
    while len(examples) < num_examples:
        prompt, answer = make_example(rng)
        if split_of(prompt) == split:
            examples.append((prompt, answer))
    return examples
