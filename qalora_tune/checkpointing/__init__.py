"""Loading bases and saving QA-LoRA outputs (atomically)."""

from qalora_tune.checkpointing._adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    check_adapter_matches,
    check_resume_matches,
    load_adapter_into,
    read_adapter,
    write_adapter,
)
from qalora_tune.checkpointing._atomic import (
    CheckpointWriteError,
    atomic_directory,
    atomic_write_text,
)
from qalora_tune.checkpointing._checkpointer import (
    PROGRESS_NAME,
    RECIPE_STATE_NAME,
    QALoRACheckpointer,
)
from qalora_tune.checkpointing._hf_keys import HFKeyMap
from qalora_tune.checkpointing._merged_int4 import (
    MERGE_REPORT_NAME,
    MERGED_DIR_NAME,
    clean_module_name,
    load_merged,
    merged_state_dict,
    write_merged_int4,
    write_merged_tensors,
)
from qalora_tune.checkpointing._safetensors_io import (
    SAFETENSORS_INDEX_NAME,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    safetensors_files,
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
    "CheckpointWriteError",
    "HFKeyMap",
    "HF_MODEL_TYPES",
    "MERGED_DIR_NAME",
    "MERGE_REPORT_NAME",
    "QALoRACheckpointer",
    "PROGRESS_NAME",
    "RECIPE_STATE_NAME",
    "SAFETENSORS_INDEX_NAME",
    "SafetensorsReader",
    "ShardedSafetensorsWriter",
    "atomic_directory",
    "atomic_write_text",
    "check_adapter_matches",
    "check_resume_matches",
    "load_adapter_into",
    "find_checkpoint_files",
    "clean_module_name",
    "iter_hf_tensors",
    "load_checkpoint_weights",
    "load_hf_weights",
    "load_merged",
    "merged_state_dict",
    "read_adapter",
    "read_checkpoint_config",
    "read_hf_config",
    "safetensors_files",
    "write_adapter",
    "write_merged_int4",
    "write_merged_tensors",
]
