"""What each recipe reads from its config: the keys (for the unknown-key check) and the
types and ranges of its scalar settings (checked before anything runs).

The recipes share these tables from here, so that no recipe imports another.
"""

from typing import Tuple

from qalora_tune.checkpointing import MERGE_OUTPUT_FORMATS, MERGED_FORMATS
from qalora_tune.recipe_utils._calibration import CALIBRATION_CONFIG_KEYS
from qalora_tune.recipe_utils._settings import (
    SettingsSchema,
    boolean,
    byte_size,
    device_name,
    fraction,
    non_negative_int,
    non_negative_number,
    one_of,
    positive_int,
    positive_number,
    prompt_text,
    text,
)

__all__ = [
    "EVAL_KEYS",
    "EVAL_SETTINGS",
    "FINETUNE_KEYS",
    "FINETUNE_SETTINGS",
    "GENERATE_KEYS",
    "GENERATE_SETTINGS",
    "MERGE_KEYS",
    "MERGE_SETTINGS",
]

# every top-level key the fine-tuning recipe reads ("section.key": keys of a section that
# is not a component); check_config refuses others (did-you-mean) before anything runs
FINETUNE_KEYS: Tuple[str, ...] = (
    "batch_size",
    *CALIBRATION_CONFIG_KEYS,
    "checkpointer",
    "clip_grad_norm",
    "compile",
    "dataset",
    "device",
    "dtype",
    "enable_activation_checkpointing",
    "enable_activation_offloading",
    "epochs",
    "gradient_accumulation_steps",
    "log_every_n_steps",
    "log_peak_memory_stats",
    "loss",
    "lr_scheduler",
    "max_steps_per_epoch",
    "merge_probe_size",
    "merged_format",
    "metric_logger",
    "model",
    "optimizer",
    "output_dir",
    "overwrite",
    "prepare_base",
    "resume_from_checkpoint",
    "save_every_n_steps",
    "save_merged_int4",
    "seed",
    "shuffle",
    "tokenizer",
    "validation",
    "validation.batch_size",
    "validation.dataset",
    "validation.full_precision_baseline",
    "validation.max_batches",
)

_MODEL_AND_RUN: SettingsSchema = {
    "output_dir": text("/tmp/qalora-tune/my_run").needed(),
    "device": device_name().needed(),
    "dtype": text("bf16").optional(),
    "seed": non_negative_int("0").optional(),
    "merge_probe_size": non_negative_int("8"),
    "merged_format": one_of(*MERGED_FORMATS),
    "checkpointer.checkpoint_dir": text("/tmp/Llama-2-7b-hf"),
    "checkpointer.max_shard_size": byte_size("5GB"),
    "model.num_layers": positive_int("2").optional(),
    "tokenizer.path": text("/tmp/Llama-2-7b-hf/tokenizer.model"),
}

FINETUNE_SETTINGS: SettingsSchema = {
    **_MODEL_AND_RUN,
    "batch_size": positive_int("4").needed(),
    "epochs": positive_int("1").needed(),
    "max_steps_per_epoch": positive_int("100").optional(),
    "gradient_accumulation_steps": positive_int("8"),
    "clip_grad_norm": positive_number("1.0").optional(),
    "log_every_n_steps": positive_int("1"),
    "save_every_n_steps": positive_int("200").optional(),
    "shuffle": boolean(),
    "compile": boolean(),
    "resume_from_checkpoint": boolean(),
    "overwrite": boolean(),
    "save_merged_int4": boolean(),
    "enable_activation_checkpointing": boolean(),
    "enable_activation_offloading": boolean(),
    "log_peak_memory_stats": boolean(),
    "optimizer.lr": positive_number("1e-3"),
    "optimizer.weight_decay": non_negative_number("0.01"),
    "lr_scheduler.num_warmup_steps": non_negative_int("100"),
    "lr_scheduler.min_lr_ratio": fraction("0.1"),
    "validation.batch_size": positive_int("8"),
    "validation.max_batches": positive_int("10").optional(),
    "validation.full_precision_baseline": boolean(),
}

# a training config (every key the fine-tuning recipe reads) plus the adapter to merge
MERGE_KEYS: Tuple[str, ...] = FINETUNE_KEYS + ("adapter_dir", "merged_dir") + (
    "base_dir", "task_name",  # merged_format=zero_table (qalora_tune.tasks)
)

MERGE_SETTINGS: SettingsSchema = {
    **FINETUNE_SETTINGS,
    "adapter_dir": text("/tmp/qalora-tune/tiny_qalora/epoch_0/adapter").needed(),
    "merged_dir": text("/tmp/qalora-tune/my_int4").optional(),
    "merged_format": one_of(*MERGE_OUTPUT_FORMATS),  # zero_table: qalora_tune.tasks
    "base_dir": text("/models/base_int4").optional(),
    "task_name": text("shakespeare").optional(),
}

GENERATE_KEYS: Tuple[str, ...] = (
    "device",
    "dtype",
    "max_new_tokens",
    "merged_dir",
    "output_dir",
    "prompt",
    "seed",
    "task",
    "temperature",
    "tokenizer",
    "top_k",
)

GENERATE_SETTINGS: SettingsSchema = {
    "device": device_name().needed(),
    "dtype": text("bf16").optional(),
    "merged_dir": text("/tmp/qalora-tune/tiny_qalora/epoch_0/merged_int4").needed(),
    "task": text("/tasks/shakespeare").optional(),
    "prompt": prompt_text().needed(),
    "max_new_tokens": positive_int("64").needed(),
    "temperature": non_negative_number("0.8"),
    "top_k": positive_int("50").optional(),
    "seed": non_negative_int("0").optional(),
    "tokenizer.path": text("/tmp/qalora-tune/tiny_qalora/epoch_0/merged_int4/tiny_tokenizer.json"),
}

EVAL_KEYS: Tuple[str, ...] = (
    "batch_size",
    "checkpoint",
    "checkpoint.adapter_dir",
    "checkpoint.kind",
    "checkpoint.merged_dir",
    *CALIBRATION_CONFIG_KEYS,
    "checkpointer",
    "datasets",
    "device",
    "dtype",
    "lm_eval",
    "lm_eval.batch_size",
    "lm_eval.enable_kv_cache",
    "lm_eval.include_path",
    "lm_eval.limit",
    "lm_eval.max_seq_length",
    "lm_eval.tasks",
    "max_batches",
    "model",
    "output_dir",
    "task",
    "tokenizer",
)

EVAL_SETTINGS: SettingsSchema = {
    "output_dir": text("/tmp/qalora-tune/eval").needed(),
    "device": device_name().needed(),
    "dtype": text("bf16").optional(),
    "batch_size": positive_int("8"),
    "max_batches": positive_int("10").optional(),
    "checkpoint.adapter_dir": text("/tmp/qalora-tune/run/epoch_0/adapter").optional(),
    "checkpoint.merged_dir": text("/tmp/qalora-tune/run/epoch_0/merged_int4").optional(),
    "task": text("/tasks/shakespeare").optional(),
    "checkpointer.checkpoint_dir": text("/tmp/Llama-2-7b-hf"),
    "tokenizer.path": text("/tmp/Llama-2-7b-hf/tokenizer.model"),
    "lm_eval.limit": positive_int("100").optional(),
    "lm_eval.batch_size": positive_int("8").optional(),
    "lm_eval.max_seq_length": positive_int("4096").optional(),
    "lm_eval.enable_kv_cache": boolean(),
}
