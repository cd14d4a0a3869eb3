"""One validated description of a QA-LoRA layer: how its base is quantized and its adapter.

:class:`QALoRAConfig` is built once (by a model builder from the ``model.*`` settings, or
by a layer from its keyword arguments), checked once in ``__post_init__``, and passed
down explicitly to every layer. A bad value raises a
:class:`~qalora_tune.errors.UserValueError` naming the config setting to change.
"""

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable

from qalora_tune.errors import UserValueError
from qalora_tune.quantization.base_weight import uses_int4_kernel
from qalora_tune.quantization.group_quant import (
    CALIBRATED_QUANTIZERS,
    QUANTIZERS,
    SUPPORTED_BITS,
)
from qalora_tune.quantization.int4_weight import INT4_KERNEL_GROUP_SIZES

__all__ = ["BASE_QUANTIZERS", "POOLINGS", "QALORA_BITS", "QALoRAConfig"]

QALORA_BITS = SUPPORTED_BITS
"""The base bit widths QA-LoRA defines (all implemented here)."""

BASE_QUANTIZERS = tuple(QUANTIZERS) + tuple(CALIBRATED_QUANTIZERS)
"""Every value ``model.quantizer`` accepts."""

POOLINGS = ("sum", "mean")
"""How the adapter pools each group of inputs: ``"sum"`` (what this version trains, the
paper's Algorithm 1; LoRA's learning rate transfers, ``docs/design.md`` section 2) or
``"mean"`` (adapters written by earlier qalora-tune, loaded as they were trained)."""


@dataclass(frozen=True)
class QALoRAConfig:
    """How a QA-LoRA layer's base is quantized and what its adapter is.

    Args:
        bits (int): bit width of the base's grid, 2, 3, 4 or 8. With an int4 kernel group
            size, 2- and 3-bit codes are stored in the int4 layout (same memory and speed,
            other accuracy); 8-bit codes use the dequantizing intx storage.
        group_size (int): quantization group size ``G``, shared by the base and the
            adapter's pooling: 32, 64, 128 or 256 run on the int4 kernels; any other
            positive size on the intx storage.
        quantizer (str): how full-precision weights are quantized: ``"rtn"``, ``"hqq"``,
            or ``"gptq"`` (calibrated: such a base takes only quantized weights).
        pad_in_dim (bool): zero-pad linears whose ``in_dim`` ``group_size`` does not
            divide (the merge stays exact).
        double_quant_scales (bool): keep an int4 kernel base's scales as 8-bit codes.
        rank (int): adapter rank ``r`` (useful up to ``in_dim / group_size``).
        alpha (float): adapter scaling numerator; the update is scaled by ``alpha / rank``.
        dropout (float): dropout on the adapter's input, in ``[0, 1)``.
        pooling (str): how the adapter pools each group, one of :data:`POOLINGS`. Not a
            ``model.*`` setting: new adapters sum, and loading an adapter takes the
            convention it records.

    Raises:
        UserValueError: for a value no layer can be built with, naming the ``model.*``
            setting and the values it takes.
    """

    bits: int = 4
    group_size: int = 64
    quantizer: str = "rtn"
    pad_in_dim: bool = False
    double_quant_scales: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    pooling: str = "sum"

    def __post_init__(self) -> None:
        _check(_is_int(self.bits) and self.bits in QALORA_BITS,
               f"model.bits={self.bits!r} is not a supported bit width; choose from {_join(QALORA_BITS)}")
        _check(_is_int(self.group_size) and self.group_size > 0,
               f"model.group_size={self.group_size!r} is not a positive integer; set "
               f"model.group_size to one of {_join(INT4_KERNEL_GROUP_SIZES)} (int4 kernels) or "
               "another divisor of every linear's in_dim (dequantizing intx base)")
        _check(self.quantizer in BASE_QUANTIZERS,
               f"model.quantizer={self.quantizer!r} is not a base quantizer; set model.quantizer "
               f"to one of {', '.join(BASE_QUANTIZERS)} (gptq also needs a calibration: section)")
        _check(isinstance(self.pad_in_dim, bool),
               f"model.pad_in_dim={self.pad_in_dim!r} is not a boolean; set it to True or False")
        _check(isinstance(self.double_quant_scales, bool),
               f"model.double_quant_scales={self.double_quant_scales!r} is not a boolean; set it "
               "to True (8-bit scales) or False")
        _check(not self.double_quant_scales or uses_int4_kernel(self.bits, self.group_size),
               f"model.double_quant_scales=True stores the scales of an int4 kernel base in 8 "
               f"bits, but bits={self.bits} with group_size={self.group_size} is stored as an intx "
               f"base; set model.double_quant_scales=False, or use bits <= 4 with a group_size "
               f"from {_join(INT4_KERNEL_GROUP_SIZES)}")
        _check(_is_int(self.rank) and self.rank > 0,
               f"model.lora_rank={self.rank!r}: the adapter rank must be a positive integer; set "
               "model.lora_rank to e.g. 8")
        _check(_is_number(self.alpha) and self.alpha > 0,
               f"model.lora_alpha={self.alpha!r}: the adapter scale numerator must be positive; "
               "set model.lora_alpha to e.g. twice model.lora_rank")
        _check(_is_number(self.dropout) and 0.0 <= self.dropout < 1.0,
               f"model.lora_dropout={self.dropout!r} is not a probability in [0, 1); set "
               "model.lora_dropout to e.g. 0.0 or 0.05")
        _check(self.pooling in POOLINGS,
               f"pooling={self.pooling!r} is not a pooling convention; use one of {_join(POOLINGS)} "
               "(an adapter's adapter_config.json records its own)")

    @property
    def scaling(self) -> float:
        """The adapter's output scale, ``alpha / rank``."""
        return self.alpha / self.rank

    @property
    def pooling_factor(self) -> int:
        """What the group mean is multiplied by to give the adapter's pooled input:
        ``group_size`` (sum pooling) or 1 (mean pooling)."""
        return self.group_size if self.pooling == "sum" else 1

    @property
    def uses_int4_kernel(self) -> bool:
        """Whether the base runs on the int4 kernels (else the dequantizing intx storage)."""
        return uses_int4_kernel(self.bits, self.group_size)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_builder_args(
        cls,
        *,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        **base: Any,
    ) -> "QALoRAConfig":
        """From the model builders' keyword names (``lora_rank``, ``lora_alpha``,
        ``lora_dropout`` and the base knobs)."""
        return cls(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, **base)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _join(values: Iterable[Any]) -> str:
    return ", ".join(map(str, values))
