"""Pieces the recipes share: config resolution and evaluation."""

from qalora_tune.recipe_utils._configs import (
    packaged_config_names,
    resolve_config,
    resolve_config_argv,
)
from qalora_tune.recipe_utils._entry import run_recipe
from qalora_tune.recipe_utils._evaluation import evaluate_lm, full_logits, next_token_loss
from qalora_tune.recipe_utils._merge_report import merge_with_report

__all__ = [
    "evaluate_lm",
    "full_logits",
    "merge_with_report",
    "next_token_loss",
    "packaged_config_names",
    "resolve_config",
    "resolve_config_argv",
    "run_recipe",
]
