"""Datasets and tokenizers used by the configs."""

from qalora_tune.data._text_file import TextBlockDataset, text_file_dataset
from qalora_tune.data._tokenizer import TextTokenizer, text_tokenizer

__all__ = ["TextBlockDataset", "TextTokenizer", "text_file_dataset", "text_tokenizer"]
