"""Pieces the recipes share: config resolution and evaluation."""

from qalora_tune.recipe_utils._configs import (
    packaged_config_names,
    resolve_config,
    resolve_config_argv,
)
from qalora_tune.recipe_utils._evaluation import evaluate_lm

__all__ = [
    "evaluate_lm",
    "packaged_config_names",
    "resolve_config",
    "resolve_config_argv",
]
