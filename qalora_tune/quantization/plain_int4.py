"""torchao's plain-layout ``Int4Tensor``: the serialized form of a merged QA-LoRA model.

The merged model leaves as :class:`torchao.quantization.Int4Tensor`, the int4 subclass that
``torchao.prototype.safetensors`` (and so transformers' ``TorchAoConfig`` loading)
serializes, in its device-independent "plain" layout:

- ``qdata`` ``(N, K / 2)`` int8: two codes per byte, column ``2j`` in the low nibble and
  ``2j + 1`` in the high nibble, each stored as the signed 4-bit value ``q - 8``;
- ``scale`` and ``zero_point`` ``(ceil(K / G), N)``: the same float-zero convention as the
  training kernels, ``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero_point[g, n]``.

So the conversion from the training layouts is a repacking of the same codes, scales and
zeros: nothing is re-quantized. torchao 0.15 computes ``Int4Tensor`` only through
fbgemm-gpu-genai CUDA kernels, and this package does not patch torchao's classes:
:func:`~qalora_tune.load_merged` repacks the weight into the device's int4 kernel layout
(``merged_format=int4_plain``; the other formats run in stock torchao, see
:mod:`qalora_tune.checkpointing._merged_formats`).
"""

from typing import Optional

import torch

from qalora_tune._compat import Int4Tensor
from qalora_tune.errors import UserTypeError, UserValueError
from qalora_tune.quantization.group_quant import GroupQuantizedWeight

__all__ = [
    "from_plain_int4",
    "is_plain_int4",
    "plain_int4_bytes",
    "to_plain_int4",
]

_MID = 8
_CACHE_ATTRIBUTE = "_qalora_kernel_weight"


def is_plain_int4(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a torchao plain-layout ``Int4Tensor``."""
    return isinstance(tensor, Int4Tensor)


def to_plain_int4(
    gq: GroupQuantizedWeight,
    in_features: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> Int4Tensor:
    """Repack group-quantized codes, scales and zeros as a torchao ``Int4Tensor``.

    Args:
        gq (GroupQuantizedWeight): codes ``(N, K_pad)`` of 2 to 4 bits with float zero
            points (narrower codes are stored as int4 codes with the same values).
        in_features (int, optional): keep only the first ``in_features`` columns (a layer
            trained with ``pad_in_dim``: the padded columns only ever met zero inputs, so
            dropping them is exact; the last group is then partial). Must be even.
            Defaults to all columns.
        dtype (torch.dtype, optional): dtype of ``scale`` and ``zero_point`` (and of the
            tensor). Defaults to ``gq.scale.dtype``.

    Returns:
        Int4Tensor: shape ``(N, in_features)``, ``block_size`` ``[1, G]``, on ``gq``'s device.

    Raises:
        ValueError: for codes wider than 4 bits, or an odd or too large ``in_features``.
    """
    gq = gq.as_int4()  # 2- and 3-bit codes are stored as int4 codes, same values
    n, k_pad = gq.shape
    k = k_pad if in_features is None else in_features
    if k % 2 or not 0 < k <= k_pad:
        raise UserValueError(
            f"in_features={k} must be even and at most the {k_pad} quantized columns"
        )
    dtype = dtype or gq.scale.dtype
    groups = -(-k // gq.group_size)
    nibbles = (gq.qdata[:, :k].to(torch.int16) - _MID) & 0xF  # two's complement of q - 8
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    qdata = packed.to(torch.uint8).view(torch.int8).contiguous()
    return Int4Tensor(
        qdata=qdata,
        scale=gq.scale[:, :groups].t().to(dtype).contiguous(),
        zero_point=gq.zero[:, :groups].t().to(dtype).contiguous(),
        block_size=[1, gq.group_size],
        shape=torch.Size([n, k]),
    )


def from_plain_int4(weight: Int4Tensor, padded_in_features: Optional[int] = None) -> GroupQuantizedWeight:
    """Codes, scales and zeros of a torchao ``Int4Tensor`` (the inverse of :func:`to_plain_int4`).

    Args:
        weight (Int4Tensor): 2D plain-layout int4 weight with ``block_size`` ``[1, G]``.
        padded_in_features (int, optional): pad the columns to this width with the code
            for ``q = 8`` (a zero offset), e.g. to restore a ``pad_in_dim`` layer or to reach
            a whole number of groups. Defaults to ``ceil(K / G) * G``.

    Returns:
        GroupQuantizedWeight: codes ``(N, K_pad)`` uint8 and ``(N, K_pad / G)`` scales and
        zeros in the weight's dtype.

    Raises:
        TypeError: if ``weight`` is not a 2D ``Int4Tensor``.
        ValueError: if its groups are not contiguous input groups, or the padding is too
            small.
    """
    if not is_plain_int4(weight) or weight.qdata.dim() != 2:
        raise UserTypeError(f"expected a 2D torchao Int4Tensor, got {type(weight).__name__}")
    block_size = list(weight.block_size)
    if len(block_size) != 2 or block_size[0] != 1:
        raise UserValueError(
            f"expected contiguous input groups block_size=[1, G], got {block_size}"
        )
    group_size = block_size[1]
    n, k = weight.shape
    groups = -(-k // group_size)
    k_pad = padded_in_features or groups * group_size
    if k_pad < k or k_pad % group_size:
        raise UserValueError(
            f"padded_in_features={k_pad} must be a multiple of {group_size} and at least {k}"
        )
    raw = weight.qdata.view(torch.uint8).to(torch.int16)
    codes = torch.stack(((raw & 0xF) ^ _MID, (raw >> 4) ^ _MID), dim=-1).flatten(-2)
    q = torch.full((n, k_pad), _MID, dtype=torch.uint8, device=codes.device)
    q[:, :k] = codes[:, :k]
    scale = weight.scale.t().new_zeros(n, k_pad // group_size)
    zero = torch.zeros_like(scale)
    scale[:, :groups] = weight.scale.t()
    zero[:, :groups] = weight.zero_point.t()
    return GroupQuantizedWeight(qdata=q, scale=scale, zero=zero, group_size=group_size, bits=4)


def plain_int4_bytes(weight: Int4Tensor) -> int:
    """Bytes an ``Int4Tensor`` serializes to: codes plus scales and zeros."""
    return sum(t.numel() * t.element_size() for t in (weight.qdata, weight.scale, weight.zero_point))
