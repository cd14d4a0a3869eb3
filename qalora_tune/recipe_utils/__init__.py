"""Pieces the recipes share: config resolution, evaluation, data parallelism."""

from qalora_tune.recipe_utils._calibration import (
    CALIBRATION_CONFIG_KEYS,
    CALIBRATION_DEFAULTS,
    calibrate_base,
    calibration_settings,
)
from qalora_tune.recipe_utils._configs import (
    packaged_config_names,
    resolve_config,
    resolve_config_argv,
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
from qalora_tune.recipe_utils._entry import run_recipe
from qalora_tune.recipe_utils._errors import TrainingError
from qalora_tune.recipe_utils._preflight import (
    check_cuda_only_options,
    check_device,
    check_output_dir,
    check_tokenizer_fits,
    resolve_dtype,
    tokenizer_vocab_size,
)
from qalora_tune.recipe_utils._evaluation import evaluate_lm, full_logits, next_token_loss
from qalora_tune.recipe_utils._full_precision import load_full_precision
from qalora_tune.recipe_utils._merge_report import (
    merge_weight_error,
    merge_with_report,
    summarize_report,
)
from qalora_tune.recipe_utils._validation import check_config

__all__ = [
    "CALIBRATION_CONFIG_KEYS",
    "CALIBRATION_DEFAULTS",
    "TrainingError",
    "all_reduce_gradients",
    "all_reduce_sum",
    "barrier",
    "broadcast_parameters",
    "calibrate_base",
    "calibration_settings",
    "check_config",
    "check_cuda_only_options",
    "check_device",
    "check_output_dir",
    "check_tokenizer_fits",
    "destroy_distributed",
    "evaluate_lm",
    "full_logits",
    "gather_objects",
    "init_distributed",
    "is_rank_zero",
    "load_full_precision",
    "merge_weight_error",
    "merge_with_report",
    "next_token_loss",
    "packaged_config_names",
    "resolve_config",
    "resolve_config_argv",
    "resolve_dtype",
    "run_on_rank_zero",
    "run_recipe",
    "shard_indices",
    "summarize_report",
    "tokenizer_vocab_size",
    "world_size_and_rank",
]
