"""Rebuilding a model from the description a checkpoint file carries, without running code
the file names.

``merged_int4/qalora_tune.json`` says which builder made the model and with which
arguments. A file is data: the builder must be one of this project's model builders
(:data:`~qalora_tune.models.ALLOWED_BUILDERS`), named by its dotted path, and the arguments
must be JSON values the builder's signature accepts. Anything else is refused in one line,
before anything is imported or called.
"""

import inspect
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from qalora_tune.errors import UserValueError
from qalora_tune.models import resolve_model_builder

__all__ = ["build_from_spec", "check_model_spec"]
_JSON_SCALARS = (str, int, float, bool, type(None))


def check_model_spec(spec: Any, source: Path) -> None:
    """Refuse a model description that names anything but a qalora-tune model builder,
    or arguments it does not take.

    Args:
        spec (Any): the ``"model"`` entry: ``{"_component_": path, **arguments}``.
        source (Path): the file it came from, named in the messages.

    Raises:
        UserValueError: naming the file and what is wrong.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("_component_"), str):
        raise UserValueError(
            f"{source} does not describe a model (no 'model' entry with a '_component_'); "
            "point to a merged_int4/ directory written by qalora-tune"
        )
    dotted = spec["_component_"]
    builder = resolve_model_builder(dotted, str(source))
    parameters = inspect.signature(builder).parameters
    for key, value in spec.items():
        if key == "_component_":
            continue
        if key not in parameters:
            raise UserValueError(
                f"{source}: {key!r} is not an argument of {dotted} (its arguments: "
                f"{', '.join(parameters)}); the file was edited or made by another version"
            )
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, _JSON_SCALARS) for v in values):
            raise UserValueError(f"{source}: {key}={value!r} is not a plain value")


def build_from_spec(spec: Mapping[str, Any], source: Path) -> nn.Module:
    """The model ``spec`` describes, after :func:`check_model_spec` (on the current default
    device and dtype)."""
    check_model_spec(spec, source)
    builder = resolve_model_builder(spec["_component_"], str(source))
    return builder(**{k: v for k, v in spec.items() if k != "_component_"})
