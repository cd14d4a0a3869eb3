"""The model builders a checkpoint file may name, and how a name is resolved.

``merged_int4/qalora_tune.json`` records the builder that made a model by its dotted
path. Reading a file must never import or call anything else, so a path is resolved only
when it is on :data:`ALLOWED_BUILDERS` (this package's builders and the embedded tiny
default's, which lives in its own package above this one and is named here, not
imported). Paths of builders that moved are translated (:data:`MOVED_BUILDERS`), so files
written before the move still load.
"""

import importlib
from typing import Callable, Dict, FrozenSet

from torch import nn

from qalora_tune.errors import UserValueError
from qalora_tune.models._model_builders import MODEL_BUILDERS

__all__ = ["ALLOWED_BUILDERS", "MOVED_BUILDERS", "resolve_model_builder"]

TINY_BUILDER = "qalora_tune.tiny.qalora_tiny_llama"

ALLOWED_BUILDERS: FrozenSet[str] = frozenset(
    {f"qalora_tune.models.{name}" for name in MODEL_BUILDERS} | {TINY_BUILDER}
)
"""Dotted paths of every builder a file may name."""

MOVED_BUILDERS: Dict[str, str] = {"qalora_tune.models.qalora_tiny_llama": TINY_BUILDER}
"""Former paths of builders that moved, and where they are now."""


def resolve_model_builder(dotted: str, source: str) -> Callable[..., nn.Module]:
    """The builder at ``dotted`` (after :data:`MOVED_BUILDERS`), if it is allowed.

    Args:
        dotted (str): the path a file names.
        source (str): the file, for the message.

    Raises:
        UserValueError: if the path is not one of :data:`ALLOWED_BUILDERS`.
    """
    dotted = MOVED_BUILDERS.get(dotted, dotted)
    if dotted not in ALLOWED_BUILDERS:
        raise UserValueError(
            f"{source} names the model builder {dotted!r}, which is not one of qalora-tune's "
            f"({', '.join(sorted(ALLOWED_BUILDERS))}); files are never allowed to run other "
            "code: rewrite the entry or re-export the model"
        )
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)
