"""One int4 base, many tasks: QA-LoRA tasks as tables of zero points.

A merged QA-LoRA task differs from its base only in the zero points, so a task is stored
as a *task package* (:mod:`~qalora_tune.tasks.zero_table`) and switched in place on a
loaded base (:mod:`~qalora_tune.tasks.switch`), checked against the base's fingerprint
(:mod:`~qalora_tune.tasks.base_layers`).
"""

from qalora_tune.tasks.base_layers import (
    BaseLayer,
    base_fingerprint,
    canonical_layer,
    layer_digest,
    model_base_layers,
    read_merged_base,
    read_merged_key_map,
)
from qalora_tune.tasks.hf_transformers import load_task_into_transformers
from qalora_tune.tasks.loading import load_merged
from qalora_tune.tasks.switch import (
    TaskState,
    current_task,
    enable_task_switching,
    load_task,
    model_fingerprint,
    task_state,
    zeros_in_storage,
)
from qalora_tune.tasks.zero_table import (
    TASK_METADATA_NAME,
    TASK_ZEROS_NAME,
    TaskPackage,
    export_task,
    export_task_from_merged,
    read_task_package,
    write_task_package,
)

__all__ = [
    "BaseLayer",
    "TASK_METADATA_NAME",
    "TASK_ZEROS_NAME",
    "TaskPackage",
    "TaskState",
    "base_fingerprint",
    "canonical_layer",
    "current_task",
    "enable_task_switching",
    "export_task",
    "export_task_from_merged",
    "layer_digest",
    "load_merged",
    "load_task",
    "load_task_into_transformers",
    "model_base_layers",
    "model_fingerprint",
    "read_merged_base",
    "read_merged_key_map",
    "read_task_package",
    "task_state",
    "write_task_package",
    "zeros_in_storage",
]
