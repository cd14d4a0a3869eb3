"""A dataset component for the kill-and-resume test: ``text_file_dataset`` whose examples
take ``delay`` seconds each to load, so that a run is still training when it is killed.

Loaded by the recipe subprocess from ``PYTHONPATH`` as ``slow_dataset.slow_text_file_dataset``.
"""

import time
from typing import Any, Dict

from torch.utils.data import Dataset

from qalora_tune.data import text_file_dataset


class _Slow(Dataset):
    def __init__(self, dataset: Dataset, delay: float):
        self.dataset = dataset
        self.delay = delay

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        time.sleep(self.delay)
        return self.dataset[index]


def slow_text_file_dataset(tokenizer, delay: float = 0.0, **kwargs: Any) -> Dataset:
    """``text_file_dataset(tokenizer, **kwargs)``, ``delay`` seconds per example."""
    return _Slow(text_file_dataset(tokenizer, **kwargs), delay)
