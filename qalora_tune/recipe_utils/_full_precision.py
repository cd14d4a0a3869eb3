"""The unquantized twin of a QA-LoRA model config, with the base checkpoint loaded."""

from typing import Any, Dict, Tuple

import torch
from torch import nn
from torchtune import training

from qalora_tune._compat import get_component_from_path
from qalora_tune.errors import UserValueError

__all__ = ["load_full_precision"]


def load_full_precision(
    component: str,
    checkpointer: Any,
    device: torch.device,
    dtype: torch.dtype,
    otherwise: str,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the ``full_precision`` counterpart of a model builder and load the base into it.

    Args:
        component (str): the ``model._component_`` dotted path (a ``qalora_tune.models``
            builder, which carries ``full_precision``).
        checkpointer (Any): a :class:`~qalora_tune.checkpointing.QALoRACheckpointer`.
        device (torch.device): where to build the model.
        dtype (torch.dtype): its parameters' dtype.
        otherwise (str): what the user can set instead, named in the error.

    Returns:
        Tuple[nn.Module, Dict[str, Any]]: the model and the base's config (what
        ``checkpointer.load_base`` returns).

    Raises:
        ValueError: if the builder has no full-precision counterpart.
    """
    builder = get_component_from_path(component)
    if not hasattr(builder, "full_precision"):
        raise UserValueError(
            f"model._component_={component} has no full-precision counterpart (a "
            f"`full_precision` attribute); use a qalora_tune.models builder, or {otherwise}"
        )
    with training.set_default_dtype(dtype), device:
        model = builder.full_precision()
    return model, checkpointer.load_base(model)
