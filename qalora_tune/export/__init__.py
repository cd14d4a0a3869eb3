"""Exporting merged QA-LoRA models to other runtimes (llama.cpp / ollama GGUF)."""

from qalora_tune.export._merged_reader import (
    MergedLinearWeight,
    iter_merged_weights,
    merged_weight_files,
    read_merged_config,
)
from qalora_tune.export._q4_1 import Q4_1Error, pack_q4_1, q4_1_refusal
from qalora_tune.export._recipe_hook import GGUF_NAME, gguf_finisher
from qalora_tune.export.gguf import DENSE_TYPES, LINEAR_TYPES, export_gguf

__all__ = [
    "DENSE_TYPES",
    "GGUF_NAME",
    "LINEAR_TYPES",
    "MergedLinearWeight",
    "Q4_1Error",
    "export_gguf",
    "gguf_finisher",
    "iter_merged_weights",
    "merged_weight_files",
    "pack_q4_1",
    "q4_1_refusal",
    "read_merged_config",
]
