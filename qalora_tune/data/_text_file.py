"""Language-modelling blocks cut from a plain text file, with a held-out tail."""

from pathlib import Path
from typing import Any, Dict, List

import torch
from torch.utils.data import Dataset

from qalora_tune._files import read_text
from qalora_tune.errors import UserFileNotFoundError, UserValueError

__all__ = ["TextBlockDataset", "split_point", "text_file_dataset"]


class TextBlockDataset(Dataset):
    """Consecutive, non-overlapping blocks of ``block_size`` tokens of one token stream.

    Items are ``{"tokens": List[int], "labels": List[int]}`` with labels equal to the
    tokens (torchtune's recipes shift them by one position).
    """

    def __init__(self, token_ids: List[int], block_size: int):
        if block_size < 2:
            raise UserValueError(f"block_size must be at least 2, got {block_size}")
        self._ids = torch.tensor(token_ids, dtype=torch.long)
        self._block_size = block_size
        if len(self) == 0:
            raise UserValueError(
                f"the text has {len(token_ids)} tokens, fewer than block_size={block_size}; "
                "use a longer text or a smaller block_size"
            )

    def __len__(self) -> int:
        return len(self._ids) // self._block_size

    def __getitem__(self, index: int) -> Dict[str, Any]:
        block = self._ids[index * self._block_size : (index + 1) * self._block_size].tolist()
        return {"tokens": block, "labels": list(block)}


def split_point(text: str, fraction: float) -> int:
    """Where to cut ``text`` so that about ``fraction`` of it comes first: at the line break
    nearest before that point, else the nearest after it, else (a text without line
    breaks near there) at the nearest space, else exactly there. Both parts are non-empty
    whenever ``text`` has at least two characters."""
    target = min(max(int(len(text) * fraction), 1), max(len(text) - 1, 1))
    window = max(len(text) // 20, 1)  # look no further than 5% of the text either way
    for separator in ("\n", " "):
        before = text.rfind(separator, target - window, target)
        if before >= 0 and before + 1 < len(text):
            return before + 1
        after = text.find(separator, target, target + window)
        if 0 <= after and after + 1 < len(text):
            return after + 1
    return target


def text_file_dataset(
    tokenizer: Any,
    path: str,
    block_size: int = 128,
    split: str = "train",
    val_fraction: float = 0.05,
    max_chars: int = 0,
) -> TextBlockDataset:
    """Blocks of a text file: the first ``1 - val_fraction`` of it for ``train``, the rest
    for ``validation``.

    The split is by characters, at a line break, before tokenizing, so no block of the
    validation split has been seen in training.

    Args:
        tokenizer: anything with ``encode(text, add_bos, add_eos)``.
        path (str): a UTF-8 text file.
        block_size (int): tokens per example.
        split (str): ``"train"`` or ``"validation"``.
        val_fraction (float): share of the file (its tail) held out for validation.
        max_chars (int): read at most this many characters of the split (0: all).

    Raises:
        ValueError: for an unknown split or a fraction outside (0, 1).
    """
    if split not in ("train", "validation"):
        raise UserValueError(f"split must be 'train' or 'validation', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise UserValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserFileNotFoundError(f"dataset file {path} not found; set dataset.path")
    text = read_text(path, "dataset.path")
    cut = split_point(text, 1.0 - val_fraction)
    if cut <= 0 or cut >= len(text):
        raise UserValueError(
            f"dataset.path={path} is too short to split ({len(text)} characters) into a "
            f"training part and a validation tail of val_fraction={val_fraction}; use a "
            "longer text"
        )
    part = text[:cut] if split == "train" else text[cut:]
    if max_chars:
        part = part[:max_chars]
    return TextBlockDataset(tokenizer.encode(part, add_bos=True, add_eos=True), block_size)
