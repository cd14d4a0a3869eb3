"""Asymmetric group-wise quantization with zero points in the float domain.

Convention (torchao's tinygemm, and the one QA-LoRA's exact merge needs)::

    w[n, g * G + i] = (q[n, g * G + i] - mid) * scale[n, g] + zero[n, g]
    q in [0, 2**bits - 1],  mid = 2**(bits - 1)

Groups run along the input dimension and are contiguous (no act-order permutation).
"""

from dataclasses import dataclass
from typing import Callable, Dict

import torch

from qalora_tune._compat import (
    MappingType,
    choose_qparams_and_quantize_hqq,
    choose_qparams_tinygemm,
    quantize_tinygemm,
)
from qalora_tune.errors import UserTypeError, UserValueError

__all__ = [
    "CALIBRATED_QUANTIZERS",
    "GroupQuantizedWeight",
    "QUANTIZERS",
    "get_quantizer",
    "quantize_hqq",
    "quantize_rtn",
    "validate_group_size",
]

SUPPORTED_BITS = (2, 3, 4, 8)
"""Bit widths the quantizers produce (QA-LoRA's). 2 to 4 bits run on the int4 kernels when
the group size has one; 8 bits, and other group sizes, on the dequantizing intx layout
(see :mod:`qalora_tune.quantization.base_weight`)."""


@dataclass
class GroupQuantizedWeight:
    """A weight quantized per (output row, contiguous input group), in a plain layout.

    Attributes:
        qdata (torch.Tensor): integer codes of shape ``(out_dim, in_dim)``, dtype uint8,
            values in ``[0, 2**bits - 1]``.
        scale (torch.Tensor): per-group scales of shape ``(out_dim, in_dim // group_size)``.
        zero (torch.Tensor): per-group float zero points, same shape as ``scale``.
        group_size (int): number of consecutive input columns sharing one scale/zero.
        bits (int): bit width of the codes.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    bits: int = 4

    @property
    def shape(self) -> torch.Size:
        return self.qdata.shape

    @property
    def mid(self) -> int:
        return 2 ** (self.bits - 1)

    def as_int4(self) -> "GroupQuantizedWeight":
        """The same weight with 4-bit codes, for the int4 layouts and kernels.

        A ``b``-bit code ``q`` (``b <= 4``) becomes ``q + 8 - 2**(b - 1)``: with the int4
        midpoint 8 the dequantized value ``(q4 - 8) * scale + zero`` is unchanged, and the
        scales and zero points are shared, so the QA-LoRA merge stays a zero-point update.

        Raises:
            ValueError: for codes wider than 4 bits.
        """
        if self.bits == 4:
            return self
        if self.bits > 4:
            raise UserValueError(
                f"{self.bits}-bit codes do not fit the int4 layout; store them with "
                "to_torchao_intx (or to_base, which picks the layout)"
            )
        shift = 8 - self.mid
        return GroupQuantizedWeight(
            qdata=self.qdata + shift,
            scale=self.scale,
            zero=self.zero,
            group_size=self.group_size,
            bits=4,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the dequantized weight of shape ``(out_dim, in_dim)`` in ``dtype``."""
        q = self.qdata.to(dtype) - self.mid
        scale = self.scale.to(dtype).repeat_interleave(self.group_size, dim=1)
        zero = self.zero.to(dtype).repeat_interleave(self.group_size, dim=1)
        return q * scale + zero


def validate_group_size(in_dim: int, group_size: int) -> None:
    """Raise ``ValueError`` unless ``group_size`` is a positive divisor of ``in_dim``."""
    if group_size <= 0 or in_dim % group_size != 0:
        raise UserValueError(
            f"group_size={group_size} must be a positive divisor of in_dim={in_dim}; "
            f"choose a group_size that divides {in_dim}"
        )


def _checked_float32(weight: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    if weight.ndim != 2 or not weight.is_floating_point():
        raise UserTypeError(
            f"expected a 2D floating-point weight (out_dim, in_dim), got {tuple(weight.shape)} "
            f"of dtype {weight.dtype}"
        )
    validate_group_size(weight.shape[1], group_size)
    if bits not in SUPPORTED_BITS:
        raise UserValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    return weight.detach().float()


def _assemble(
    shape: torch.Size,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bits: int,
) -> GroupQuantizedWeight:
    n_groups = shape[1] // group_size
    return GroupQuantizedWeight(
        qdata=q.reshape(shape).to(torch.uint8),
        scale=scale.reshape(shape[0], n_groups).float(),
        zero=zero.reshape(shape[0], n_groups).float(),
        group_size=group_size,
        bits=bits,
    )


def quantize_rtn(
    weight: torch.Tensor, group_size: int, bits: int = 4
) -> GroupQuantizedWeight:
    """Round-to-nearest min-max quantization with torchao's tinygemm qparams.

    Args:
        weight (torch.Tensor): full-precision weight of shape ``(out_dim, in_dim)``.
        group_size (int): input columns per quantization group.
        bits (int): bit width of the codes.

    Returns:
        GroupQuantizedWeight: codes, float32 scales and zero points.
    """
    w = _checked_float32(weight, group_size, bits)
    block_size = (1, group_size)
    qmax = 2**bits - 1
    scale, zero = choose_qparams_tinygemm(
        w,
        MappingType.ASYMMETRIC,
        block_size,
        torch.int32,
        0,
        qmax,
        1e-6,
        torch.float32,
        torch.float32,
    )
    q = quantize_tinygemm(w, block_size, scale, zero, torch.int32, 0, qmax)
    return _assemble(w.shape, q, scale, zero, group_size, bits)


def quantize_hqq(
    weight: torch.Tensor, group_size: int, bits: int = 4
) -> GroupQuantizedWeight:
    """Half-quadratic quantization (torchao's HQQ solver), float zero points.

    Args:
        weight (torch.Tensor): full-precision weight of shape ``(out_dim, in_dim)``.
        group_size (int): input columns per quantization group.
        bits (int): bit width of the codes.

    Returns:
        GroupQuantizedWeight: codes, float32 scales and zero points.
    """
    w = _checked_float32(weight, group_size, bits)
    q, scale, zero, _ = choose_qparams_and_quantize_hqq(
        w,
        nbits=bits,
        group_size=group_size,
        axis=1,
        compute_dtype=torch.float32,
        device=w.device,
    )
    return _assemble(w.shape, q, scale, zero, group_size, bits)


Quantizer = Callable[[torch.Tensor, int, int], GroupQuantizedWeight]

QUANTIZERS: Dict[str, Quantizer] = {"rtn": quantize_rtn, "hqq": quantize_hqq}


CALIBRATED_QUANTIZERS = ("gptq",)
"""Base quantizers that need calibration data, so they cannot quantize a weight on arrival:
the whole model is quantized first (``calibrate_gptq``; the recipe's ``calibration:``
section) and loaded as int4."""


def _calibration_required(name: str) -> Quantizer:
    def quantize(weight: torch.Tensor, group_size: int, bits: int = 4) -> GroupQuantizedWeight:
        raise UserValueError(
            f"model.quantizer={name} needs calibration data and cannot quantize a "
            "full-precision weight as it loads; quantize the model with "
            "qalora_tune.quantization.calibrate_gptq and load its int4 state dict (the "
            "qalora_finetune recipe does this when the config has a calibration: section), "
            "or set model.quantizer=rtn or hqq"
        )

    return quantize


def get_quantizer(name: str) -> Quantizer:
    """Return the base quantizer registered under ``name`` (``"rtn"`` or ``"hqq"``); a
    calibrated one (``"gptq"``) gives a quantizer that refuses, with a message saying how
    to calibrate, since a single weight cannot be."""
    if name in CALIBRATED_QUANTIZERS:
        return _calibration_required(name)
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise UserValueError(
            f"unknown base quantizer {name!r}; choose one of "
            f"{sorted(QUANTIZERS) + list(CALIBRATED_QUANTIZERS)}"
        ) from None
