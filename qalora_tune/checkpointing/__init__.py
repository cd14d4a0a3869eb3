"""Loading bases and saving QA-LoRA outputs (atomically)."""

from qalora_tune.checkpointing._atomic import atomic_directory
from qalora_tune.checkpointing._checkpointer import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    RECIPE_STATE_NAME,
    QALoRACheckpointer,
)
from qalora_tune.checkpointing._formats import (
    CHECKPOINT_FORMATS,
    find_checkpoint_files,
    load_checkpoint_weights,
    read_checkpoint_config,
)
from qalora_tune.checkpointing._hf_weights import (
    HF_MODEL_TYPES,
    iter_hf_tensors,
    load_hf_weights,
    read_hf_config,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "CHECKPOINT_FORMATS",
    "HF_MODEL_TYPES",
    "QALoRACheckpointer",
    "RECIPE_STATE_NAME",
    "atomic_directory",
    "find_checkpoint_files",
    "iter_hf_tensors",
    "load_checkpoint_weights",
    "load_hf_weights",
    "read_checkpoint_config",
    "read_hf_config",
]
