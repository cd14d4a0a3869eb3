"""Datasets and tokenizers used by the configs."""

from qalora_tune.data._instruct_json import InstructJSONDataset, instruct_json_dataset
from qalora_tune.data._text_file import TextBlockDataset, text_file_dataset
from qalora_tune.data._tokenizer import TextTokenizer, text_tokenizer

__all__ = [
    "InstructJSONDataset",
    "TextBlockDataset",
    "TextTokenizer",
    "instruct_json_dataset",
    "text_file_dataset",
    "text_tokenizer",
]
