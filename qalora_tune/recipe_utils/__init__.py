"""Pieces the recipes share: config resolution, evaluation, data parallelism."""

from qalora_tune.recipe_utils._calibration import (
    CALIBRATION_CONFIG_KEYS,
    CALIBRATION_DEFAULTS,
    calibrate_base,
    calibration_settings,
)
from qalora_tune.recipe_utils._configs import (
    packaged_config_names,
    parse_recipe_config,
    resolve_config,
    resolve_config_argv,
)
from qalora_tune.recipe_utils._data_loaders import (
    IGNORE_INDEX,
    build_dataset,
    padded_collate,
    probe_batch,
    training_loader,
    validation_loader,
)
from qalora_tune.recipe_utils._distributed import (
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    broadcast_parameters,
    destroy_distributed,
    gather_objects,
    init_distributed,
    is_rank_zero,
    run_on_rank_zero,
    shard_indices,
    world_size_and_rank,
)
from qalora_tune.recipe_utils._entry import (
    interrupt_note,
    resume_command,
    run_recipe,
    set_interrupt_note,
)
from qalora_tune.recipe_utils._errors import TrainingError
from qalora_tune.recipe_utils._evaluation import (
    adapters_disabled,
    evaluate_lm,
    full_logits,
    joined_logits,
    next_token_loss,
)
from qalora_tune.recipe_utils._finetune_preflight import finetune_preflight
from qalora_tune.recipe_utils._full_precision import load_full_precision
from qalora_tune.recipe_utils._instantiate import instantiate_section
from qalora_tune.recipe_utils._lr_schedule import get_cosine_schedule_with_floor
from qalora_tune.recipe_utils._merge_report import (
    merge_weight_error,
    merge_with_report,
    summarize_report,
)
from qalora_tune.recipe_utils._output_dir import (
    LOCK_NAME,
    OutputDirLock,
    check_merge_target,
    check_run_dir,
    previous_run_outputs,
    remove_previous_run,
)
from qalora_tune.recipe_utils._preflight import (
    Problems,
    check_cuda_only_options,
    check_device,
    check_output_dir,
    check_tokenizer_fits,
    component_file_problems,
    resolve_dtype,
    tokenizer_vocab_size,
)
from qalora_tune.recipe_utils._provenance import (
    adapter_config_for,
    model_spec_without_adapters,
    package_versions,
)
from qalora_tune.recipe_utils._recipe_settings import (
    EVAL_KEYS,
    EVAL_SETTINGS,
    FINETUNE_KEYS,
    FINETUNE_SETTINGS,
    GENERATE_KEYS,
    GENERATE_SETTINGS,
    MERGE_KEYS,
    MERGE_SETTINGS,
)
from qalora_tune.recipe_utils._settings import check_settings, join_problems
from qalora_tune.recipe_utils._summary import (
    format_metrics,
    summary_json,
    summary_lines,
)
from qalora_tune.recipe_utils._train_step import check_finite_loss, loss_step, optimizer_step
from qalora_tune.recipe_utils._training_state import (
    apply_recipe_state,
    capture_rng,
    check_data_order,
    check_saved_adapter,
    recipe_state,
    restore_rng,
    unreadable_state,
)
from qalora_tune.recipe_utils._validation import check_config, config_problems

__all__ = [
    "CALIBRATION_CONFIG_KEYS",
    "CALIBRATION_DEFAULTS",
    "EVAL_KEYS",
    "EVAL_SETTINGS",
    "FINETUNE_KEYS",
    "FINETUNE_SETTINGS",
    "GENERATE_KEYS",
    "GENERATE_SETTINGS",
    "IGNORE_INDEX",
    "LOCK_NAME",
    "MERGE_KEYS",
    "MERGE_SETTINGS",
    "OutputDirLock",
    "Problems",
    "TrainingError",
    "adapter_config_for",
    "adapters_disabled",
    "all_reduce_gradients",
    "all_reduce_sum",
    "apply_recipe_state",
    "barrier",
    "broadcast_parameters",
    "build_dataset",
    "calibrate_base",
    "calibration_settings",
    "capture_rng",
    "check_config",
    "check_cuda_only_options",
    "check_data_order",
    "check_device",
    "check_finite_loss",
    "check_merge_target",
    "check_output_dir",
    "check_run_dir",
    "check_saved_adapter",
    "check_settings",
    "check_tokenizer_fits",
    "component_file_problems",
    "config_problems",
    "destroy_distributed",
    "evaluate_lm",
    "finetune_preflight",
    "format_metrics",
    "full_logits",
    "joined_logits",
    "gather_objects",
    "get_cosine_schedule_with_floor",
    "init_distributed",
    "instantiate_section",
    "interrupt_note",
    "is_rank_zero",
    "join_problems",
    "load_full_precision",
    "loss_step",
    "merge_weight_error",
    "merge_with_report",
    "model_spec_without_adapters",
    "next_token_loss",
    "optimizer_step",
    "package_versions",
    "packaged_config_names",
    "padded_collate",
    "parse_recipe_config",
    "previous_run_outputs",
    "probe_batch",
    "recipe_state",
    "remove_previous_run",
    "resolve_config",
    "resolve_config_argv",
    "resolve_dtype",
    "restore_rng",
    "resume_command",
    "run_on_rank_zero",
    "run_recipe",
    "set_interrupt_note",
    "shard_indices",
    "summarize_report",
    "summary_json",
    "summary_lines",
    "tokenizer_vocab_size",
    "training_loader",
    "unreadable_state",
    "validation_loader",
    "world_size_and_rank",
]
