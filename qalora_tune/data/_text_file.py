"""Language-modelling blocks cut from a plain text file, with a held-out tail."""

from pathlib import Path
from typing import Any, Dict, List

import torch
from torch.utils.data import Dataset

__all__ = ["TextBlockDataset", "text_file_dataset"]


class TextBlockDataset(Dataset):
    """Consecutive, non-overlapping blocks of ``block_size`` tokens of one token stream.

    Items are ``{"tokens": List[int], "labels": List[int]}`` with labels equal to the
    tokens (torchtune's recipes shift them by one position).
    """

    def __init__(self, token_ids: List[int], block_size: int):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        self._ids = torch.tensor(token_ids, dtype=torch.long)
        self._block_size = block_size
        if len(self) == 0:
            raise ValueError(
                f"the text has {len(token_ids)} tokens, fewer than block_size={block_size}; "
                "use a longer text or a smaller block_size"
            )

    def __len__(self) -> int:
        return len(self._ids) // self._block_size

    def __getitem__(self, index: int) -> Dict[str, Any]:
        block = self._ids[index * self._block_size : (index + 1) * self._block_size].tolist()
        return {"tokens": block, "labels": list(block)}


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
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found; set dataset.path")
    text = path.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * (1.0 - val_fraction))) + 1
    part = text[:cut] if split == "train" else text[cut:]
    if max_chars:
        part = part[:max_chars]
    return TextBlockDataset(tokenizer.encode(part, add_bos=True, add_eos=True), block_size)
