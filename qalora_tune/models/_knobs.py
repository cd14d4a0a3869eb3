"""Checks of the model builders' knobs, with messages naming the config setting to change.

The builders are config components (``model: {_component_: ..., lora_rank: ...}``), so a
bad value is reported as the ``model.*`` setting a user edits.
"""

from typing import Iterable, List, Tuple

from torch import nn

from qalora_tune.quantization import (
    CALIBRATED_QUANTIZERS,
    INT4_KERNEL_GROUP_SIZES,
    QUANTIZERS,
    check_double_quant,
)
from qalora_tune.quantization import SUPPORTED_BITS as IMPLEMENTED_BITS

__all__ = [
    "BASE_QUANTIZERS",
    "IMPLEMENTED_BITS",
    "QALORA_BITS",
    "check_group_size_fits",
    "check_model_knobs",
    "check_num_layers",
]

QALORA_BITS = (2, 3, 4, 8)
"""The base bit widths QA-LoRA defines (``IMPLEMENTED_BITS`` are those this version runs)."""

BASE_QUANTIZERS = tuple(QUANTIZERS) + CALIBRATED_QUANTIZERS
"""Every value ``model.quantizer`` accepts."""


def check_model_knobs(
    *,
    bits: int,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    group_size: int,
    quantizer: str = "rtn",
    double_quant_scales: bool = False,
) -> None:
    """Refuse a bit width, rank, alpha, dropout, group size, quantizer or scale storage no
    layer could be built with.

    Raises:
        ValueError: naming the ``model.*`` setting and the values it accepts.
    """
    if _not_int(bits) or bits not in QALORA_BITS:
        raise ValueError(
            f"model.bits={bits!r} is not a supported bit width; choose from "
            f"{_join(QALORA_BITS)}"
        )
    if bits not in IMPLEMENTED_BITS:
        raise ValueError(
            f"model.bits={bits} is not available in this version (only "
            f"{_join(IMPLEMENTED_BITS)}-bit bases are implemented); set "
            f"model.bits to one of {_join(IMPLEMENTED_BITS)}"
        )
    if _not_int(lora_rank) or lora_rank <= 0:
        raise ValueError(
            f"model.lora_rank={lora_rank!r}: the adapter rank must be a positive integer; "
            "set model.lora_rank to e.g. 8"
        )
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
        raise ValueError(
            f"model.lora_alpha={lora_alpha!r}: the adapter scale numerator must be positive; "
            "set model.lora_alpha to e.g. twice model.lora_rank"
        )
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not (
        0.0 <= lora_dropout < 1.0
    ):
        raise ValueError(
            f"model.lora_dropout={lora_dropout!r} is not a probability in [0, 1); set "
            "model.lora_dropout to e.g. 0.0 or 0.05"
        )
    if _not_int(group_size) or group_size <= 0:
        raise ValueError(
            f"model.group_size={group_size!r} is not a positive integer; set model.group_size "
            f"to one of {_join(INT4_KERNEL_GROUP_SIZES)} (int4 kernels) or another divisor "
            "of every linear's in_dim (dequantizing intx base)"
        )
    if quantizer not in BASE_QUANTIZERS:
        raise ValueError(
            f"model.quantizer={quantizer!r} is not a base quantizer; set model.quantizer to "
            f"one of {', '.join(BASE_QUANTIZERS)} (gptq also needs a calibration: section)"
        )
    if not isinstance(double_quant_scales, bool):
        raise ValueError(
            f"model.double_quant_scales={double_quant_scales!r} is not a boolean; set it to "
            "True (8-bit scales) or False"
        )
    check_double_quant(double_quant_scales, bits, group_size)


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
            raise ValueError(
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
        raise ValueError(
            f"model.num_layers={num_layers!r} must be an integer from 1 to {available} "
            "(this model's layers), or null for all of them"
        )
