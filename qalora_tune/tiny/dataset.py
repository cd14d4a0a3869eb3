"""torchtune-style SFT dataset of the embedded tiny task.

Items follow torchtune's SFT convention: ``tokens`` is ``<bos> prompt answer <eos>``, and
``labels`` equals ``tokens`` with the ``<bos>`` and prompt positions set to
``CROSS_ENTROPY_IGNORE_IDX`` (-100). Labels are aligned with tokens; the recipe shifts
them by one (``labels[..., 1:]``), so the loss and the token accuracy cover exactly the
answer characters and the closing ``<eos>``. ``torchtune.data.padded_collate_sft``
collates the items.
"""

from typing import Dict, List

from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from qalora_tune.tiny.task import DEFAULT_NUM_EXAMPLES, generate_examples
from qalora_tune.tiny.tokenizer import TinyTokenizer

__all__ = ["TinyTaskDataset", "encode_example", "tiny_task_dataset"]


def encode_example(
    tokenizer: TinyTokenizer, prompt: str, answer: str
) -> Dict[str, List[int]]:
    """Tokenize one example with the prompt masked out of the labels.

    Args:
        tokenizer (TinyTokenizer): character tokenizer.
        prompt (str): the question part (not trained on).
        answer (str): the answer part (trained on, with the closing ``<eos>``).

    Returns:
        Dict[str, List[int]]: ``tokens`` and ``labels``, each of length
        ``len(prompt) + len(answer) + 2``.
    """
    prompt_ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    answer_ids = tokenizer.encode(answer, add_bos=False, add_eos=True)
    tokens = prompt_ids + answer_ids
    labels = [CROSS_ENTROPY_IGNORE_IDX] * len(prompt_ids) + answer_ids
    return {"tokens": tokens, "labels": labels}


class TinyTaskDataset(Dataset):
    """Pre-tokenized examples of the tiny task.

    Args:
        tokenizer (TinyTokenizer): character tokenizer.
        split (str): ``"train"`` or ``"validation"``.
        num_examples (int): how many examples.
        seed (int): generator seed (the two splits never share an example).
    """

    def __init__(
        self,
        tokenizer: TinyTokenizer,
        split: str = "train",
        num_examples: int = DEFAULT_NUM_EXAMPLES,
        seed: int = 0,
    ):
        self.split = split
        self.examples = generate_examples(split, num_examples, seed)
        self._items = [encode_example(tokenizer, p, a) for p, a in self.examples]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        item = self._items[index]
        return {"tokens": list(item["tokens"]), "labels": list(item["labels"])}


def tiny_task_dataset(
    tokenizer: TinyTokenizer,
    split: str = "train",
    num_examples: int = DEFAULT_NUM_EXAMPLES,
    seed: int = 0,
) -> TinyTaskDataset:
    """torchtune ``_component_`` builder for the tiny task dataset.

    Args:
        tokenizer (TinyTokenizer): the tiny base's tokenizer.
        split (str): ``"train"`` or ``"validation"``.
        num_examples (int): how many examples.
        seed (int): generator seed.

    Returns:
        TinyTaskDataset: items ``{"tokens": List[int], "labels": List[int]}``.

    Raises:
        ValueError: for an unknown split or a non-positive ``num_examples``.
    """
    return TinyTaskDataset(tokenizer, split=split, num_examples=num_examples, seed=seed)
