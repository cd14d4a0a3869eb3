"""The frozen base in whichever torchao subclass fits its bit width and group size.

- Codes of 2 to 4 bits with a group size of 32, 64, 128 or 256: the int4 kernel
  subclasses (:mod:`qalora_tune.quantization.int4_weight`).
- Anything else (8-bit codes, or group sizes such as 8 or 16): the dequantizing
  ``IntxUnpackedToInt8Tensor`` (:mod:`qalora_tune.quantization.intx_weight`).

Both keep float zero points per (row, input group), so a QA-LoRA merge is a zero-point
update in either; :func:`shift_zero_points_` applies one. An int4 kernel base can keep its
scales as 8-bit codes (``double_quant``, :mod:`qalora_tune.quantization.double_quant`).
"""

from typing import Optional, Union

import torch

from qalora_tune.errors import UserValueError
from qalora_tune.quantization.group_quant import GroupQuantizedWeight
from qalora_tune.quantization.int4_weight import (
    INT4_KERNEL_GROUP_SIZES,
    as_int4_base,
    dequantize_int4,
    empty_int4,
    from_torchao_int4,
    is_int4_weight,
    to_torchao_int4,
)
from qalora_tune.quantization.intx_weight import (
    as_intx_base,
    dequantize_intx,
    empty_intx,
    from_torchao_intx,
    is_intx_weight,
    to_torchao_intx,
)

__all__ = [
    "as_base",
    "check_double_quant",
    "dequantize_base",
    "empty_base",
    "from_torchao_base",
    "is_quantized_base",
    "shift_zero_points_",
    "stored_zero_points",
    "to_base",
    "uses_int4_kernel",
    "zero_base",
]


def uses_int4_kernel(bits: int, group_size: int) -> bool:
    """Whether a ``bits``-bit base with ``group_size`` runs on the int4 kernels (else the
    dequantizing intx path)."""
    return bits <= 4 and group_size in INT4_KERNEL_GROUP_SIZES


def is_quantized_base(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an int4 or intx base weight this project computes with."""
    return is_int4_weight(tensor) or is_intx_weight(tensor)


def to_base(
    gq: GroupQuantizedWeight,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    double_quant: bool = False,
) -> torch.Tensor:
    """Store ``gq`` in the subclass :func:`uses_int4_kernel` picks for its bits and groups.

    Args:
        gq (GroupQuantizedWeight): codes, scales and zeros of shape ``(out_dim, in_dim)``.
        device (str or torch.device, optional): target device; defaults to ``gq``'s.
        dtype (torch.dtype, optional): dtype of scales, zeros and compute.
        double_quant (bool): keep the scales as 8-bit codes (int4 kernel bases only).

    Returns:
        torch.Tensor: an int4 subclass or an ``IntxUnpackedToInt8Tensor``.

    Raises:
        ValueError: if ``double_quant`` is asked of a base off the int4 kernels.
    """
    if uses_int4_kernel(gq.bits, gq.group_size):
        return to_torchao_int4(gq, device=device, dtype=dtype, double_quant=double_quant)
    check_double_quant(double_quant, gq.bits, gq.group_size)
    return to_torchao_intx(gq, device=device, dtype=dtype)


def check_double_quant(double_quant: bool, bits: int, group_size: int) -> None:
    """Refuse 8-bit scales for a base the int4 kernels cannot hold.

    Raises:
        ValueError: naming ``model.double_quant_scales`` and what would allow it.
    """
    if double_quant and not uses_int4_kernel(bits, group_size):
        raise UserValueError(
            f"model.double_quant_scales=True stores the scales of an int4 kernel base in 8 "
            f"bits, but bits={bits} with group_size={group_size} is stored as an intx base; "
            f"set model.double_quant_scales=False, or use bits <= 4 with a group_size from "
            f"{', '.join(map(str, INT4_KERNEL_GROUP_SIZES))}"
        )


def as_base(tensor: torch.Tensor) -> torch.Tensor:
    """A torchao base tensor as this project's class for its layout (same inner tensors):
    ``Int4OpaqueTensor`` -> ``CpuInt4Tensor``, ``Int4TilePackedTo4dTensor`` ->
    ``TileInt4Tensor``, ``IntxUnpackedToInt8Tensor`` -> ``IntxBaseTensor``; ours unchanged."""
    if is_intx_weight(tensor):
        return as_intx_base(tensor)
    return as_int4_base(tensor)


def from_torchao_base(weight: torch.Tensor) -> GroupQuantizedWeight:
    """Plain codes, scales and zeros of an int4 or intx base (int4 ones as 4-bit codes)."""
    if is_intx_weight(weight):
        return from_torchao_intx(weight)
    return from_torchao_int4(weight)


def dequantize_base(weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense ``(out_dim, in_dim)`` weight of an int4 or intx base, in ``dtype``
    (the weight's own by default)."""
    if is_intx_weight(weight):
        return dequantize_intx(
            weight.qdata, weight.scale, weight.zero_point, dtype or weight.dtype
        )
    return dequantize_int4(weight, dtype)


def empty_base(
    out_dim: int,
    in_dim: int,
    group_size: int,
    bits: int,
    device: Union[str, torch.device],
    dtype: Optional[torch.dtype] = None,
    double_quant: bool = False,
) -> torch.Tensor:
    """An uninitialised base of the subclass ``bits``, ``group_size`` and ``double_quant``
    select (for ``meta``-device construction)."""
    if uses_int4_kernel(bits, group_size):
        return empty_int4(out_dim, in_dim, group_size, device, dtype, double_quant)
    check_double_quant(double_quant, bits, group_size)
    return empty_intx(out_dim, in_dim, group_size, bits, device, dtype)


def stored_zero_points(weight: torch.Tensor) -> torch.Tensor:
    """A writable view of the zero points as stored, ``(out_dim, n_groups)``.

    For int4 bases these are ``z`` of ``(q - mid) * s + z``; for intx bases torchao's
    integer-domain ``zp = -z / s``. Save and restore it to undo a merge bit for bit.
    """
    return as_base(weight).zero_points()


@torch.no_grad()
def shift_zero_points_(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """Add ``delta`` to every dequantized value of each (row, group): ``z += delta``.

    Computed in float64 and rounded once to the stored dtype; codes and scales are
    untouched.

    Args:
        weight (torch.Tensor): an int4 or intx base.
        delta (torch.Tensor): ``(out_dim, n_groups)`` shift per group.
    """
    stored = stored_zero_points(weight)
    delta = delta.to(device=stored.device, dtype=torch.float64)
    if is_intx_weight(weight):
        stored.copy_(stored.double() - delta / weight.scale.double())
    else:
        stored.copy_(stored.double() + delta)


@torch.no_grad()
def zero_base(
    out_dim: int,
    in_dim: int,
    group_size: int,
    bits: int,
    device: Union[str, torch.device],
    dtype: Optional[torch.dtype] = None,
    double_quant: bool = False,
) -> torch.Tensor:
    """A base whose weights are all zero (codes, scales and zero points all 0: with a zero
    scale any code dequantizes to the zero point), made without quantizing anything: the
    placeholder of a layer whose weight is loaded next. On the CPU its inner tensors are
    lazily allocated zeros (:func:`~qalora_tune._memory.lazy_zeros`), which cost no
    memory until written; elsewhere it is packed from zero codes.

    Args:
        out_dim (int): ``N``.
        in_dim (int): ``K``, a multiple of ``group_size``.
        group_size (int): quantization group size.
        bits (int): code width.
        device (str or torch.device): where to build it.
        dtype (torch.dtype, optional): dtype of scales, zeros and compute.
        double_quant (bool): 8-bit scales (int4 kernel bases only).
    """
    from qalora_tune._memory import lazy_zeros  # the quantization package is imported first

    device = torch.device(device)
    if device.type not in ("cpu", "meta") and uses_int4_kernel(bits, group_size):
        gq = GroupQuantizedWeight(
            qdata=torch.zeros((out_dim, in_dim), dtype=torch.uint8),
            scale=torch.zeros(out_dim, in_dim // group_size),
            zero=torch.zeros(out_dim, in_dim // group_size),
            group_size=group_size,
            bits=bits,
        )
        return to_base(gq, device=device, dtype=dtype, double_quant=double_quant)
    weight = empty_base(out_dim, in_dim, group_size, bits, device, dtype, double_quant)
    if device.type == "meta":
        return weight
    names, context = weight.__tensor_flatten__()
    zeros = {name: lazy_zeros(getattr(weight, name).shape, getattr(weight, name).dtype, device)
             for name in names}
    return type(weight).__tensor_unflatten__(zeros, context, weight.shape, weight.stride())
