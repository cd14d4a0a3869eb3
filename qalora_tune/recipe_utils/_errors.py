"""Errors a recipe reports in one line (see :func:`~qalora_tune.recipe_utils.run_recipe`)."""

from qalora_tune.errors import UserError

__all__ = ["TrainingError"]


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite).

    The message says what happened, what to change, and which checkpoint is the last good
    one; the recipe exits with status 1 instead of printing a traceback.
    """
