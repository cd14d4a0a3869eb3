"""Double quantization: the int4 base's per-group scales stored as 8-bit codes.

An int4 base keeps a float scale and a float zero point per (row, group of ``G`` inputs):
in bf16 that is 32 bits per group, 0.5 bit per weight at ``G = 64`` on top of the 4-bit
codes (fp32: 1.0 bit). Double quantization stores each scale as an 8-bit code on a grid
of its output row::

    s'[n, g] = scale_min[n] + c[n, g] * scale_step[n],    c in {0, ..., 255},

with ``scale_min`` (the row's smallest scale) and ``scale_step`` (its range / 255) in
float32. The zero points stay in the compute dtype, because a QA-LoRA merge adds to them
and must stay exact. The 4-bit codes are unchanged; each scale moves by at most half a
step of its row's grid, and the zero point absorbs the mean of that change over the group,
``z' = z - mean_g(q - mid) * (s' - s)``, so the group's dequantized values keep their mean.

Bits per weight at group size ``G`` and ``in_dim = K``: ``4 + (8 + b_z) / G + 64 / K``,
with ``b_z`` the zero points' bits (16 in bf16): 4.39 at ``G = 64``, ``K = 4096`` in bf16,
against 4.5 without (fp32 zeros: 4.64 against 5.0).

The int4 kernels read dense scales, so :class:`DoubleQuantInt4Tensor` rebuilds the
kernel's ``scale_and_zero`` (one pair per group, ``1/G`` of the weight) inside the ops
that compute with it, for the current layer only.
"""

from typing import List, Optional, Tuple

import torch

from qalora_tune._compat import TorchAOBaseTensor
from qalora_tune.quantization.group_quant import GroupQuantizedWeight

__all__ = [
    "SCALE_CODE_LEVELS",
    "DoubleQuantInt4Tensor",
    "dequantize_scales",
    "double_quantize_scales",
    "is_double_quant",
    "quantize_scales",
    "rebuild_scale_and_zero",
]

SCALE_CODE_LEVELS = 256
"""Levels of a scale code (8 bits)."""


def quantize_scales(scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit codes of positive per-group scales on a min-max grid per row.

    Args:
        scale (torch.Tensor): ``(out_dim, n_groups)`` float scales.

    Returns:
        Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: codes ``(out_dim, n_groups)``
        uint8, and ``scale_min``, ``scale_step`` of shape ``(out_dim,)`` in float32. A row
        whose scales are all equal gets step 0 and codes 0.
    """
    s = scale.float()
    low = s.amin(dim=1)
    step = (s.amax(dim=1) - low) / (SCALE_CODE_LEVELS - 1)
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((s - low[:, None]) / safe_step[:, None])
    codes = codes.clamp(0, SCALE_CODE_LEVELS - 1).masked_fill(step[:, None] == 0, 0)
    return codes.to(torch.uint8), low, step


def dequantize_scales(
    codes: torch.Tensor, scale_min: torch.Tensor, scale_step: torch.Tensor
) -> torch.Tensor:
    """Float32 scales from their codes: ``scale_min + codes * scale_step``.

    Args:
        codes (torch.Tensor): ``(..., out_dim)`` uint8, the row being the last dimension.
        scale_min (torch.Tensor): ``(out_dim,)`` float32.
        scale_step (torch.Tensor): ``(out_dim,)`` float32.

    Returns:
        torch.Tensor: float32 scales of ``codes``' shape. The one formula both the
        quantizer and every kernel call use, so the scales they see are the same bits.
    """
    return scale_min + codes.to(torch.float32) * scale_step


def double_quantize_scales(
    gq: GroupQuantizedWeight,
) -> Tuple[GroupQuantizedWeight, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round ``gq``'s scales to 8-bit codes and move its zero points to keep each group's mean.

    Args:
        gq (GroupQuantizedWeight): codes, float scales and zeros of ``(out_dim, in_dim)``.

    Returns:
        Tuple: the weight with scales ``s'`` (float32, exactly what the codes decode to) and
        zeros ``z' = z - mean_g(q - mid) * (s' - s)`` (float32), then the scale codes
        ``(out_dim, n_groups)`` uint8, ``scale_min`` and ``scale_step`` ``(out_dim,)``.
    """
    codes, scale_min, scale_step = quantize_scales(gq.scale)
    new_scale = dequantize_scales(codes.t(), scale_min, scale_step).t()
    centred = _mean_centred_code(gq.qdata, gq.group_size, gq.mid)
    new_zero = gq.zero.double() - centred * (new_scale.double() - gq.scale.double())
    rounded = GroupQuantizedWeight(
        qdata=gq.qdata,
        scale=new_scale.contiguous(),
        zero=new_zero.float(),
        group_size=gq.group_size,
        bits=gq.bits,
    )
    return rounded, codes, scale_min, scale_step


def _mean_centred_code(codes: torch.Tensor, group_size: int, mid: int) -> torch.Tensor:
    """``mean_g(q - mid)`` per (row, group) in float64, a block of rows at a time, so no
    widened copy of a whole weight's codes is ever made."""
    means = torch.empty(codes.shape[0], codes.shape[1] // group_size, dtype=torch.float64,
                        device=codes.device)
    rows = max(1, 2**20 // codes.shape[1])
    for start in range(0, codes.shape[0], rows):
        block = codes[start : start + rows].to(torch.int32).unflatten(-1, (-1, group_size))
        means[start : start + rows] = block.sum(-1).double() / group_size - mid
    return means


def rebuild_scale_and_zero(
    scale_codes: torch.Tensor,
    scale_min: torch.Tensor,
    scale_step: torch.Tensor,
    zero: torch.Tensor,
) -> torch.Tensor:
    """The int4 kernels' dense ``scale_and_zero`` of a double-quantized base.

    Args:
        scale_codes (torch.Tensor): ``(n_groups_pad, N_pad)`` uint8.
        scale_min (torch.Tensor): ``(N_pad,)`` float32.
        scale_step (torch.Tensor): ``(N_pad,)`` float32.
        zero (torch.Tensor): ``(n_groups_pad, N_pad)`` in the compute dtype.

    Returns:
        torch.Tensor: ``(n_groups_pad, N_pad, 2)`` in ``zero.dtype``.
    """
    scale = dequantize_scales(scale_codes, scale_min, scale_step).to(zero.dtype)
    return torch.stack([scale, zero], dim=-1)


class DoubleQuantInt4Tensor(TorchAOBaseTensor):
    """An int4 base in a torchao int4 kernel layout whose scales are 8-bit codes.

    Tensor attributes:
        qdata: the packed 4-bit codes, exactly as in ``Int4OpaqueTensor`` (CPU, 2D) or
            ``Int4TilePackedTo4dTensor`` (CUDA, tinygemm's 4D layout).
        scale_codes: ``(n_groups_pad, N_pad)`` uint8 codes of the scales.
        scale_min: ``(N_pad,)`` float32, each row's smallest scale.
        scale_step: ``(N_pad,)`` float32, each row's scale grid step.
        zero: ``(n_groups_pad, N_pad)`` float zero points in the compute dtype (the
            tensor's dtype); a QA-LoRA merge writes here.

    Non-tensor attributes:
        block_size: ``[1, group_size]``.
        shape: ``(out_dim, in_dim)``.

    Padding rows and groups follow the wrapped layout (see
    :mod:`qalora_tune.quantization.int4_weight`); ``rebuild_scale_and_zero`` of the inner
    tensors is what that layout's ``scale_and_zero`` would be.
    """

    tensor_data_names = ["qdata", "scale_codes", "scale_min", "scale_step", "zero"]
    tensor_attribute_names = ["block_size", "shape"]

    def __new__(
        cls,
        qdata: torch.Tensor,
        scale_codes: torch.Tensor,
        scale_min: torch.Tensor,
        scale_step: torch.Tensor,
        zero: torch.Tensor,
        block_size: List[int],
        shape: torch.Size,
    ):
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, shape, device=qdata.device, dtype=zero.dtype, requires_grad=False
        )

    def __init__(
        self,
        qdata: torch.Tensor,
        scale_codes: torch.Tensor,
        scale_min: torch.Tensor,
        scale_step: torch.Tensor,
        zero: torch.Tensor,
        block_size: List[int],
        shape: torch.Size,
    ):
        super().__init__()
        self.qdata = qdata
        self.scale_codes = scale_codes
        self.scale_min = scale_min
        self.scale_step = scale_step
        self.zero = zero
        self.block_size = block_size

    def _quantization_type(self) -> str:
        return f"shape={self.shape}, block_size={self.block_size}, device={self.device}, 8-bit scales"

    def dense_scale_and_zero(self) -> torch.Tensor:
        """The dense ``(n_groups_pad, N_pad, 2)`` scales and zeros the int4 kernels read."""
        return rebuild_scale_and_zero(self.scale_codes, self.scale_min, self.scale_step, self.zero)

    @classmethod
    def from_hp(
        cls,
        weight: torch.Tensor,
        group_size: int,
        bits: int = 4,
        quantizer: str = "rtn",
        dtype: Optional[torch.dtype] = None,
    ) -> "DoubleQuantInt4Tensor":
        """Quantize a full-precision weight into an int4 kernel layout (the weight's
        device: CPU, or tinygemm's on CUDA) with 8-bit scales."""
        from qalora_tune.quantization.group_quant import get_quantizer
        from qalora_tune.quantization.int4_weight import to_torchao_int4

        gq = get_quantizer(quantizer)(weight, group_size, bits)
        return to_torchao_int4(gq, device=weight.device, dtype=dtype or weight.dtype, double_quant=True)

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``(out_dim, in_dim)`` weight (scales decoded) in ``output_dtype``."""
        from qalora_tune.quantization.int4_weight import dequantize_int4

        return dequantize_int4(self, output_dtype)

    def to_quantized(self) -> GroupQuantizedWeight:
        """Plain 4-bit codes, the decoded scales, and the zeros."""
        from qalora_tune.quantization.int4_weight import from_torchao_int4

        return from_torchao_int4(self)

    def zero_points(self) -> torch.Tensor:
        """A writable ``(out_dim, n_groups)`` view of the float zero points."""
        n, k = self.shape
        return self.zero[: k // self.block_size[1], :n].t()


def is_double_quant(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an int4 base with 8-bit scales."""
    return isinstance(tensor, DoubleQuantInt4Tensor)


# state dicts holding it load with torch.load(..., weights_only=True), as torchao's own
torch.serialization.add_safe_globals([DoubleQuantInt4Tensor])
