"""The model-level check of the builders' knobs: does the group size fit every linear?

The knobs themselves are checked once, by :class:`~qalora_tune.modules.QALoRAConfig`;
whether ``model.group_size`` divides every linear's ``in_dim`` depends on the model.
"""

from typing import Iterable, List, Tuple

from torch import nn

from qalora_tune.errors import UserValueError
from qalora_tune.quantization.int4_weight import INT4_KERNEL_GROUP_SIZES

__all__ = ["check_group_size_fits", "check_num_layers"]

def check_group_size_fits(model: nn.Module, group_size: int, pad_in_dim: bool) -> None:
    """Refuse, without padding, a linear whose ``in_dim`` ``group_size`` does not divide.

    Args:
        model (nn.Module): the decoder, with its ``nn.Linear`` layers not yet replaced.
        group_size (int): ``model.group_size``.
        pad_in_dim (bool): ``model.pad_in_dim``; when set, every ``in_dim`` fits.

    Raises:
        ValueError: naming the first such linear, the group sizes that would fit every
            linear, and ``model.pad_in_dim``.
    """
    if pad_in_dim:
        return
    linears = _linears(model)
    for path, in_dim in linears:
        if in_dim % group_size:
            fitting = [g for g in INT4_KERNEL_GROUP_SIZES if all(k % g == 0 for _, k in linears)]
            choice = (
                f"set model.group_size to {' or '.join(map(str, fitting))}"
                if fitting
                else "no int4 kernel group size divides every linear's in_dim; set "
                "model.group_size to a common divisor of them (dequantizing intx base)"
            )
            raise UserValueError(
                f"{path}: model.group_size={group_size} does not divide in_dim={in_dim}; "
                f"{choice}, or set model.pad_in_dim=True to pad the input with zeros (the "
                "merge stays exact)"
            )


def _linears(model: nn.Module) -> List[Tuple[str, int]]:
    return [(p, m.in_features) for p, m in model.named_modules() if isinstance(m, nn.Linear)]


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _join(values: Iterable[int]) -> str:
    return ", ".join(map(str, values))


def check_num_layers(num_layers: int, available: int) -> None:
    """Refuse a ``model.num_layers`` that is not between 1 and the model's layer count.

    Raises:
        ValueError: naming ``model.num_layers`` and the range it takes.
    """
    if _not_int(num_layers) or not 1 <= num_layers <= available:
        raise UserValueError(
            f"model.num_layers={num_layers!r} must be an integer from 1 to {available} "
            "(this model's layers), or null for all of them"
        )
