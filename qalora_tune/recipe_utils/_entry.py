"""The entry point every recipe shares: packaged config names, one-line user errors."""

import sys
from typing import Callable, List, Optional

from qalora_tune.checkpointing._atomic import CheckpointWriteError
from qalora_tune.recipe_utils._configs import resolve_config_argv
from qalora_tune.recipe_utils._errors import TrainingError

__all__ = ["run_recipe"]

_USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    PermissionError,
    CheckpointWriteError,
    TrainingError,
)


def run_recipe(name: str, recipe_main: Callable[[], None], argv: Optional[List[str]] = None) -> None:
    """Resolve ``--config NAME`` to a packaged YAML, then run ``recipe_main``.

    A setting to change (``ValueError``, ``TypeError``, ``FileNotFoundError``,
    ``PermissionError``), a checkpoint the disk refused (``CheckpointWriteError``) or a
    run that cannot go on (``TrainingError``, e.g. a non-finite loss) prints
    ``{name}: error: ...`` on one line and exits with status 1; anything else is a bug
    and keeps its traceback.

    Args:
        name (str): the recipe's name, used in error messages.
        recipe_main (Callable[[], None]): the ``@config.parse``-decorated main.
        argv (List[str], optional): defaults to ``sys.argv``.
    """
    try:
        sys.argv = resolve_config_argv(sys.argv if argv is None else argv)
        recipe_main()
    except _USER_ERRORS as error:
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"{name}: error: {message}", file=sys.stderr)
        sys.exit(1)
