"""Loading bases and saving QA-LoRA outputs (atomically)."""

from qalora_tune.checkpointing._adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    adopt_pooling,
    check_adapter_before_use,
    check_adapter_matches,
    check_resume_matches,
    load_adapter_into,
    read_adapter,
    write_adapter,
)
from qalora_tune.checkpointing._adapter_config import AdapterConfig
from qalora_tune.checkpointing._atomic import (
    CheckpointWriteError,
    atomic_directory,
    atomic_write_text,
    recover_interrupted_writes,
)
from qalora_tune.checkpointing._checkpointer import (
    OUTPUT_MARKER_NAME,
    PROGRESS_NAME,
    RECIPE_STATE_NAME,
    RUN_CONFIG_NAME,
    QALoRACheckpointer,
    load_recipe_state,
)
from qalora_tune.checkpointing._formats import (
    CHECKPOINT_FORMATS,
    find_checkpoint_files,
    load_checkpoint_weights,
    read_checkpoint_config,
)
from qalora_tune.checkpointing._hf_keys import HFKeyMap
from qalora_tune.checkpointing._hf_weights import (
    HF_MODEL_TYPES,
    iter_hf_tensors,
    load_hf_weights,
    read_hf_config,
)
from qalora_tune.checkpointing._merged_formats import (
    MERGE_OUTPUT_FORMATS,
    MERGED_FORMATS,
    RUNS_ON,
    choose_merged_format,
)
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

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AdapterConfig",
    "CHECKPOINT_FORMATS",
    "CheckpointWriteError",
    "HFKeyMap",
    "HF_MODEL_TYPES",
    "MERGED_DIR_NAME",
    "MERGED_FORMATS",
    "MERGE_OUTPUT_FORMATS",
    "RUNS_ON",
    "MERGE_REPORT_NAME",
    "OUTPUT_MARKER_NAME",
    "RUN_CONFIG_NAME",
    "QALoRACheckpointer",
    "PROGRESS_NAME",
    "RECIPE_STATE_NAME",
    "SAFETENSORS_INDEX_NAME",
    "SafetensorsReader",
    "ShardedSafetensorsWriter",
    "atomic_directory",
    "atomic_write_text",
    "adopt_pooling",
    "check_adapter_before_use",
    "check_adapter_matches",
    "check_resume_matches",
    "load_adapter_into",
    "find_checkpoint_files",
    "choose_merged_format",
    "clean_module_name",
    "iter_hf_tensors",
    "load_checkpoint_weights",
    "load_hf_weights",
    "load_merged",
    "merged_state_dict",
    "load_recipe_state",
    "recover_interrupted_writes",
    "read_adapter",
    "read_checkpoint_config",
    "read_hf_config",
    "safetensors_files",
    "write_adapter",
    "write_merged_int4",
    "write_merged_tensors",
]
