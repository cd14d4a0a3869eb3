"""The entry point every recipe shares: packaged config names, one-line user errors."""

import sys
from typing import Callable, List, Optional

from qalora_tune.recipe_utils._configs import resolve_config_argv

__all__ = ["run_recipe"]


def run_recipe(name: str, recipe_main: Callable[[], None], argv: Optional[List[str]] = None) -> None:
    """Resolve ``--config NAME`` to a packaged YAML, then run ``recipe_main``.

    A setting to change (``ValueError``, ``TypeError``, ``FileNotFoundError``,
    ``PermissionError``) prints ``{name}: error: ...`` on one line and exits with status 1;
    anything else is a bug and keeps its traceback.

    Args:
        name (str): the recipe's name, used in error messages.
        recipe_main (Callable[[], None]): the ``@config.parse``-decorated main.
        argv (List[str], optional): defaults to ``sys.argv``.
    """
    try:
        sys.argv = resolve_config_argv(sys.argv if argv is None else argv)
        recipe_main()
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(1)
