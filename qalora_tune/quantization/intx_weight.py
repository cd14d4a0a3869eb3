"""The dequantizing base: torchao ``IntxUnpackedToInt8Tensor`` for what int4 kernels cannot hold.

The int4 kernels take 4-bit codes and group sizes 32, 64, 128 and 256 only. An 8-bit base,
or a group size outside that list (e.g. 8 or 16, which give a pooled adapter 16x more
input groups), is stored in torchao's ``IntxUnpackedToInt8Tensor``: one signed int8 per
code (``target_dtype`` ``torch.int2`` ... ``torch.int8``), a float scale and a float zero
point per (row, contiguous input group). It has no fused kernel: a linear dequantizes the
weight and runs a dense matmul (``qalora_tune::intx_linear``), so it saves memory over a
full-precision base (8 bits per code instead of 16/32) but not time.

torchao's convention for this class is ``W = (c - zp) * s`` with ``c = q - mid`` signed;
this project's is ``W = (q - mid) * s + z``. They agree for ``zp = -z / s``, and a QA-LoRA
merge ``z' = z + delta`` is ``zp' = zp - delta / s``: still a zero-point update, with the
codes and scales untouched.
"""

from typing import Optional, Union

import torch

from qalora_tune._compat import IntxUnpackedToInt8Tensor
from qalora_tune.errors import UserValueError
from qalora_tune.quantization.group_quant import GroupQuantizedWeight

__all__ = [
    "IntxBaseTensor",
    "IntxWeight",
    "as_intx_base",
    "as_stock_intx",
    "dequantize_intx",
    "empty_intx",
    "from_torchao_intx",
    "intx_bits",
    "is_intx_weight",
    "reorder_intx_rows",
    "to_torchao_intx",
]

class IntxBaseTensor(IntxUnpackedToInt8Tensor):
    """The frozen QA-LoRA base off the int4 kernels (8-bit codes, or a group size they
    lack): torchao's ``IntxUnpackedToInt8Tensor`` (one int8 per code, float scale and
    zero point per (row, group), ``W = (c - zp) * s``), with what training and merging
    need: :meth:`dequantize` in any dtype, :meth:`to_quantized` (this project's
    convention, ``z = -zp * s``), :meth:`zero_points` (a writable view of the stored
    ``zp``), and ``F.linear`` with an input gradient (``qalora_tune::intx_linear``,
    registered by :mod:`qalora_tune.ops`). Files keep torchao's own class
    (:func:`as_stock_intx`)."""

    @classmethod
    def from_hp(
        cls,
        weight: torch.Tensor,
        group_size: int,
        bits: int = 8,
        quantizer: str = "rtn",
        dtype: Optional[torch.dtype] = None,
    ) -> "IntxBaseTensor":
        """Quantize a full-precision ``(out_dim, in_dim)`` weight into this class (any
        group size dividing ``in_dim``, 2 to 8 bits; ``quantizer`` ``"rtn"`` or ``"hqq"``)."""
        from qalora_tune.quantization.group_quant import get_quantizer

        gq = get_quantizer(quantizer)(weight, group_size, bits)
        return to_torchao_intx(gq, device=weight.device, dtype=dtype or weight.dtype)

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``(out_dim, in_dim)`` weight in ``output_dtype`` (default: its own)."""
        return dequantize_intx(self.qdata, self.scale, self.zero_point, output_dtype or self.dtype)

    def to_quantized(self) -> GroupQuantizedWeight:
        """Plain codes in ``[0, 2**bits - 1]``, scales and float zeros."""
        return from_torchao_intx(self)

    def zero_points(self) -> torch.Tensor:
        """The stored zero points ``zp`` (torchao's integer-domain convention), writable."""
        return self.zero_point


IntxWeight = IntxUnpackedToInt8Tensor

# state dicts holding it load with torch.load(..., weights_only=True), as torchao's own
torch.serialization.add_safe_globals([IntxBaseTensor])


def as_intx_base(tensor: IntxUnpackedToInt8Tensor) -> IntxBaseTensor:
    """``tensor`` as :class:`IntxBaseTensor`, sharing its inner tensors."""
    if isinstance(tensor, IntxBaseTensor):
        return tensor
    return _rewrap(tensor, IntxBaseTensor)


def as_stock_intx(tensor: IntxUnpackedToInt8Tensor) -> IntxUnpackedToInt8Tensor:
    """``tensor`` as torchao's own ``IntxUnpackedToInt8Tensor`` (what files and stock
    torchao read), sharing its inner tensors."""
    if type(tensor) is IntxUnpackedToInt8Tensor:
        return tensor
    return _rewrap(tensor, IntxUnpackedToInt8Tensor)


def _rewrap(tensor: IntxUnpackedToInt8Tensor, cls: type) -> IntxUnpackedToInt8Tensor:
    return cls(
        qdata=tensor.qdata,
        scale=tensor.scale,
        zero_point=tensor.zero_point,
        target_dtype=tensor.target_dtype,
        block_size=tuple(tensor.block_size),
        dtype=tensor.dtype,
        activation_quantization=tensor.activation_quantization,
    )


def is_intx_weight(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a torchao ``IntxUnpackedToInt8Tensor``."""
    return isinstance(tensor, IntxUnpackedToInt8Tensor)


def intx_bits(weight: IntxWeight) -> int:
    """The bit width of an intx weight's codes (from its ``target_dtype``, e.g. 8 for int8)."""
    return int(str(weight.target_dtype).removeprefix("torch.int"))


def dequantize_intx(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(qdata - zero_point) * scale`` per (row, group), torchao's intx convention.

    Args:
        qdata (torch.Tensor): int8 codes ``(out_dim, in_dim)``.
        scale (torch.Tensor): ``(out_dim, n_groups)``.
        zero_point (torch.Tensor): float zero points ``(out_dim, n_groups)``.
        dtype (torch.dtype): dtype of the computation and the result.

    Returns:
        torch.Tensor: the dense weight ``(out_dim, in_dim)`` in ``dtype``.
    """
    out_dim, in_dim = qdata.shape
    n_groups = scale.shape[-1]
    codes = qdata.reshape(out_dim, n_groups, in_dim // n_groups).to(dtype)
    weight = (codes - zero_point.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)
    return weight.reshape(out_dim, in_dim)


def to_torchao_intx(
    gq: GroupQuantizedWeight,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> IntxWeight:
    """Store a plain group-quantized weight as a torchao ``IntxUnpackedToInt8Tensor``.

    Args:
        gq (GroupQuantizedWeight): codes of 1 to 8 bits, scales and zeros, shape
            ``(out_dim, in_dim)``, any group size dividing ``in_dim``.
        device (str or torch.device, optional): target device; defaults to ``gq``'s.
        dtype (torch.dtype, optional): dtype of the scales, zero points and compute;
            defaults to the default dtype.

    Returns:
        IntxUnpackedToInt8Tensor: dequantizing to ``(q - mid) * scale + zero``.

    Raises:
        ValueError: if a scale is zero (its zero point has no integer-domain form).
    """
    device = torch.device(device) if device is not None else gq.qdata.device
    dtype = dtype or torch.get_default_dtype()
    scale = gq.scale.double()
    if bool((scale == 0).any()):
        raise UserValueError(
            "a quantization group has scale 0, which the intx layout cannot hold; "
            "quantize with a minimum scale (the rtn, hqq and gptq quantizers do)"
        )
    codes = (gq.qdata.to(torch.int16) - gq.mid).to(torch.int8)
    return IntxBaseTensor(
        qdata=codes.to(device),
        scale=gq.scale.to(device, dtype),
        zero_point=(-gq.zero.double() / scale).to(device, dtype),
        target_dtype=getattr(torch, f"int{gq.bits}"),
        block_size=(1, gq.group_size),
        dtype=dtype,
        activation_quantization=None,
    )


def from_torchao_intx(weight: IntxWeight) -> GroupQuantizedWeight:
    """Back to plain codes ``[0, 2**bits - 1]``, float32 scales and float zeros.

    Args:
        weight (IntxUnpackedToInt8Tensor): with ``block_size`` ``(1, group_size)``.

    Returns:
        GroupQuantizedWeight: on the weight's device.
    """
    bits = intx_bits(weight)
    mid = 2 ** (bits - 1)
    scale = weight.scale.double()
    return GroupQuantizedWeight(
        qdata=(weight.qdata.to(torch.int16) + mid).to(torch.uint8),
        scale=weight.scale.float(),
        zero=(-weight.zero_point.double() * scale).float(),
        group_size=weight.block_size[-1],
        bits=bits,
    )


def reorder_intx_rows(
    weight: IntxWeight,
    rows: torch.Tensor,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> IntxWeight:
    """The same intx weight with its rows in the order ``rows``, moved to ``device`` and
    ``dtype``, its stored zero points copied as they are (a trip through
    :func:`from_torchao_intx` would round ``-zp * s`` and back).

    Args:
        weight (IntxUnpackedToInt8Tensor): the weight.
        rows (torch.Tensor): a permutation of ``range(out_dim)``.
        device (str or torch.device, optional): defaults to the weight's.
        dtype (torch.dtype, optional): of the scales and zero points; defaults to the weight's.
    """
    device = torch.device(device) if device is not None else weight.qdata.device
    dtype = dtype or weight.dtype
    rows = rows.to(weight.qdata.device)
    return type(weight)(
        qdata=weight.qdata[rows].to(device),
        scale=weight.scale[rows].to(device, dtype),
        zero_point=weight.zero_point[rows].to(device, dtype),
        target_dtype=weight.target_dtype,
        block_size=tuple(weight.block_size),
        dtype=dtype,
        activation_quantization=None,
    )


def empty_intx(
    out_dim: int,
    in_dim: int,
    group_size: int,
    bits: int,
    device: Union[str, torch.device],
    dtype: Optional[torch.dtype] = None,
) -> IntxWeight:
    """An uninitialised intx weight, for building models on the ``meta`` device.

    Args:
        out_dim (int): ``N``.
        in_dim (int): ``K``, a multiple of ``group_size``.
        group_size (int): quantization group size.
        bits (int): code width, 1 to 8.
        device (str or torch.device): usually ``"meta"``.
        dtype (torch.dtype, optional): dtype of scales and zeros; the default dtype if unset.
    """
    dtype = dtype or torch.get_default_dtype()
    n_groups = in_dim // group_size
    return IntxBaseTensor(
        qdata=torch.empty(out_dim, in_dim, dtype=torch.int8, device=device),
        scale=torch.empty(out_dim, n_groups, dtype=dtype, device=device),
        zero_point=torch.empty(out_dim, n_groups, dtype=dtype, device=device),
        target_dtype=getattr(torch, f"int{bits}"),
        block_size=(1, group_size),
        dtype=dtype,
        activation_quantization=None,
    )
