"""The embedded tiny default: a procedurally generated task, tokenizer and base model.

A package of its own, above the library: it uses the library (the model builders,
checkpointing, evaluation) and nothing in the library imports it. Its model builder,
``qalora_tune.tiny.qalora_tiny_llama``, is named in configs and merged model files.

``tune run qalora_finetune --config tiny_qalora`` needs no download: the base is a small
llama2-architecture decoder pretrained here on a generated glossary-translation task
(:func:`prepare_tiny_base`), then quantized to int4 and adapted with QA-LoRA.
"""

from qalora_tune.tiny.base import (
    is_complete_tiny_base,
    load_tiny_base,
    prepare_tiny_base,
)
from qalora_tune.tiny.dataset import TinyTaskDataset, encode_example, tiny_task_dataset
from qalora_tune.tiny.metrics import answer_metrics, to_qalora_
from qalora_tune.tiny.model import (
    TINY_LLAMA_SIZES,
    build_tiny_base,
    qalora_tiny_llama,
    tiny_llama_sizes,
)
from qalora_tune.tiny.task import generate_examples, glossary
from qalora_tune.tiny.tokenizer import TOKENIZER_FILENAME, TinyTokenizer, tiny_tokenizer

__all__ = [
    "TINY_LLAMA_SIZES",
    "TOKENIZER_FILENAME",
    "TinyTaskDataset",
    "TinyTokenizer",
    "answer_metrics",
    "build_tiny_base",
    "encode_example",
    "generate_examples",
    "glossary",
    "is_complete_tiny_base",
    "load_tiny_base",
    "prepare_tiny_base",
    "qalora_tiny_llama",
    "tiny_llama_sizes",
    "tiny_task_dataset",
    "tiny_tokenizer",
    "to_qalora_",
]
