"""The frozen QA-LoRA base as torchao int4 tensor subclasses, and what training needs of them.

- CPU: :class:`torchao.prototype.int4_opaque_tensor.Int4OpaqueTensor` (kernel
  ``aten._weight_int4pack_mm_for_cpu``; bf16, fp16 or fp32 scales and zeros).
- CUDA sm80+: :class:`torchao.quantization.Int4TilePackedTo4dTensor` (tinygemm kernel
  ``aten._weight_int4pack_mm``; bf16 only, ``in_dim`` padded to a multiple of 1024).

Both store ``scale_and_zero`` of shape ``(n_groups, out_dim_padded, 2)`` with float zero
points, which is what makes the QA-LoRA merge a pure zero-point update. With
``double_quant=True`` the same packed codes are kept with 8-bit scales instead
(:class:`~qalora_tune.quantization.double_quant.DoubleQuantInt4Tensor`); every function
here takes that storage too. torchao 0.15 gives
neither class a way back to plain codes, nor a device move that changes the packing; this
module adds both (registered on the classes when ``qalora_tune`` is imported).
"""

from typing import Optional, Union

import torch

from qalora_tune._compat import (
    Int4OpaqueTensor,
    Int4TilePackedTo4dTensor,
    pack_tinygemm_scales_and_zeros,
    tinygemm_int4pack,
    unpack_tinygemm_scales_and_zeros,
)
from qalora_tune.errors import UserTypeError, UserValueError
from qalora_tune.quantization.cpu_int4_layout import (
    PACK_ROW_MULTIPLE,
    pack_cpu_int4,
    unpack_cpu_int4,
)
from qalora_tune.quantization.double_quant import (
    DoubleQuantInt4Tensor,
    double_quantize_scales,
    is_double_quant,
)
from qalora_tune.quantization.group_quant import GroupQuantizedWeight, get_quantizer
from qalora_tune.quantization.tinygemm_layout import (
    TINYGEMM_K_TILE,
    TINYGEMM_N_TILE,
    pack_tinygemm_int4,
    unpack_tinygemm_int4,
)

__all__ = [
    "INT4_KERNEL_GROUP_SIZES",
    "CpuInt4Tensor",
    "Int4Weight",
    "TileInt4Tensor",
    "as_int4_base",
    "dequantize_int4",
    "dequantize_packed",
    "empty_int4",
    "from_torchao_int4",
    "is_int4_weight",
    "tinygemm_int4",
    "tinygemm_padded_in_features",
    "to_torchao_int4",
    "with_dense_scales",
    "zero_points",
]


class CpuInt4Tensor(Int4OpaqueTensor):
    """The frozen QA-LoRA base on CPU: torchao's ``Int4OpaqueTensor`` layout (the CPU int4
    kernel ``aten._weight_int4pack_mm_for_cpu``), with what training and merging need.

    Inner tensors as the parent's: ``qdata`` (the kernel's packed codes, rows padded to a
    multiple of 16) and ``scale_and_zero`` ``(n_groups, N_pad, 2)`` with float zero points,
    ``W = (q - 8) * scale + zero``. Added here:

    - :meth:`dequantize`, :meth:`to_quantized` (plain codes), :meth:`zero_points` (a
      writable view: the one thing a QA-LoRA merge changes);
    - ``F.linear`` with an input gradient (``qalora_tune::int4_linear``, registered by
      :mod:`qalora_tune.ops`), and device/dtype moves that repack (``Tensor.to``).

    Build it with :meth:`from_hp` (a full-precision weight), or :func:`to_torchao_int4`
    (plain codes; :func:`~qalora_tune.quantization.to_base` picks the class).
    """

    @classmethod
    def from_hp(
        cls,
        weight: torch.Tensor,
        group_size: int,
        bits: int = 4,
        quantizer: str = "rtn",
        dtype: Optional[torch.dtype] = None,
    ) -> "CpuInt4Tensor":
        """Quantize a full-precision ``(out_dim, in_dim)`` weight into this class.

        Args:
            weight (torch.Tensor): the weight.
            group_size (int): 32, 64, 128 or 256.
            bits (int): 2, 3 or 4 (narrower grids are stored as int4 codes).
            quantizer (str): ``"rtn"`` or ``"hqq"``.
            dtype (torch.dtype, optional): of the scales, zeros and compute; defaults to
                the weight's.
        """
        gq = get_quantizer(quantizer)(weight, group_size, bits)
        device = "cpu" if cls is CpuInt4Tensor else "cuda"
        return to_torchao_int4(gq, device=device, dtype=dtype or weight.dtype)

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``(out_dim, in_dim)`` weight in ``output_dtype`` (default: its own)."""
        return dequantize_int4(self, output_dtype)

    def to_quantized(self) -> GroupQuantizedWeight:
        """Plain 4-bit codes, scales and zeros (on this tensor's device)."""
        return from_torchao_int4(self)

    def zero_points(self) -> torch.Tensor:
        """A writable ``(out_dim, n_groups)`` view of the float zero points."""
        return zero_points(self)


class TileInt4Tensor(Int4TilePackedTo4dTensor):
    """The frozen QA-LoRA base in tinygemm's tile-packed layout (CUDA sm80+, bf16): torchao's
    ``Int4TilePackedTo4dTensor`` with the methods of :class:`CpuInt4Tensor` (dequantize,
    plain codes, a zero-point view, ``F.linear`` with an input gradient, repacking moves).
    Everything but the CUDA kernel itself also runs (and is tested) on CPU."""

    from_hp = classmethod(CpuInt4Tensor.from_hp.__func__)
    dequantize = CpuInt4Tensor.dequantize
    to_quantized = CpuInt4Tensor.to_quantized
    zero_points = CpuInt4Tensor.zero_points


Int4Weight = Union[CpuInt4Tensor, TileInt4Tensor, DoubleQuantInt4Tensor]

# state dicts holding them load with torch.load(..., weights_only=True), as torchao's own
torch.serialization.add_safe_globals([CpuInt4Tensor, TileInt4Tensor])
_STOCK_INT4 = (Int4OpaqueTensor, Int4TilePackedTo4dTensor)

INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
_CUDA_K_MULTIPLE = 1024
_CUDA_INNER_K_TILES = 8


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def is_int4_weight(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an int4 kernel base (this project's classes, torchao's two
    layouts they extend, or either layout with 8-bit scales)."""
    return isinstance(tensor, (*_STOCK_INT4, DoubleQuantInt4Tensor))


def as_int4_base(tensor: torch.Tensor) -> Int4Weight:
    """``tensor`` as this project's class for its layout, sharing its inner tensors (a
    torchao ``Int4OpaqueTensor`` becomes a :class:`CpuInt4Tensor`, an
    ``Int4TilePackedTo4dTensor`` a :class:`TileInt4Tensor`; ours are returned as they are)."""
    if isinstance(tensor, (CpuInt4Tensor, TileInt4Tensor, DoubleQuantInt4Tensor)):
        return tensor
    cls = CpuInt4Tensor if isinstance(tensor, Int4OpaqueTensor) else TileInt4Tensor
    return cls(
        tensor.qdata, tensor.scale_and_zero, list(tensor.block_size), tensor.shape,
        act_pre_scale=tensor.act_pre_scale,
    )


def _pad_codes(gq: GroupQuantizedWeight, n_pad: int, k_pad: int):
    n, k = gq.shape
    g_pad = k_pad // gq.group_size
    q = torch.full((n_pad, k_pad), gq.mid, dtype=torch.uint8, device=gq.qdata.device)
    q[:n, :k] = gq.qdata
    scale = gq.scale.new_zeros(n_pad, g_pad)
    zero = gq.zero.new_zeros(n_pad, g_pad)
    scale[:n, : k // gq.group_size] = gq.scale
    zero[:n, : k // gq.group_size] = gq.zero
    return q, scale, zero


def to_torchao_int4(
    gq: GroupQuantizedWeight,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    double_quant: bool = False,
) -> Int4Weight:
    """Pack a plain group-quantized weight into the torchao int4 subclass for ``device``.

    Args:
        gq (GroupQuantizedWeight): codes of 2 to 4 bits, scales and zeros, shape
            ``(out_dim, in_dim)``; narrower codes are stored as int4 codes with the same
            dequantized values (see :meth:`GroupQuantizedWeight.as_int4`).
        device (str or torch.device, optional): target device; defaults to ``gq``'s.
        dtype (torch.dtype, optional): dtype of ``scale_and_zero`` and of the kernel's
            compute. Defaults to ``torch.get_default_dtype()`` on CPU; CUDA needs bfloat16.
        double_quant (bool): store the scales as 8-bit codes (see
            :mod:`qalora_tune.quantization.double_quant`); the scales are rounded and the
            zeros moved to keep each group's mean.

    Returns:
        Int4OpaqueTensor on CPU, Int4TilePackedTo4dTensor on CUDA; a
        DoubleQuantInt4Tensor in that layout with ``double_quant``.

    Raises:
        ValueError: for bit widths or group sizes the int4 kernels do not support.
    """
    if double_quant:
        rounded, codes, scale_min, scale_step = double_quantize_scales(gq)
        return _with_scale_codes(
            to_torchao_int4(rounded, device=device, dtype=dtype), codes, scale_min, scale_step
        )
    device = torch.device(device) if device is not None else gq.qdata.device
    gq = gq.as_int4()
    if gq.group_size not in INT4_KERNEL_GROUP_SIZES:
        raise UserValueError(
            f"group_size={gq.group_size} has no int4 kernel; "
            f"use one of {INT4_KERNEL_GROUP_SIZES}"
        )
    n, k = gq.shape
    if device.type == "cpu":
        dtype = dtype or torch.get_default_dtype()
        q, scale, zero = _pad_codes(gq, _round_up(n, PACK_ROW_MULTIPLE), k)
        return CpuInt4Tensor(
            qdata=pack_cpu_int4(q.cpu()),
            scale_and_zero=pack_tinygemm_scales_and_zeros(
                scale.to("cpu", dtype), zero.to("cpu", dtype), dtype
            ),
            block_size=[1, gq.group_size],
            shape=torch.Size([n, k]),
        )
    if device.type == "cuda":
        dtype = dtype or torch.bfloat16
        if dtype != torch.bfloat16:
            raise UserValueError(
                f"the CUDA int4 kernel (tinygemm) computes in bfloat16, got dtype={dtype}; "
                "train with dtype=bf16 on CUDA"
            )
        if torch.cuda.get_device_capability(device)[0] < 8:
            raise UserValueError(
                "the CUDA int4 kernel (tinygemm) needs compute capability 8.0 or newer"
            )
        return tinygemm_int4(gq, device, dtype)
    raise UserValueError(
        f"no int4 kernel for device {device}; use a CPU or a CUDA (sm80+) device"
    )


def tinygemm_int4(
    gq: GroupQuantizedWeight, device: Union[str, torch.device], dtype: torch.dtype
) -> Int4TilePackedTo4dTensor:
    """``gq`` (4-bit codes) in tinygemm's layout on ``device``, without the checks of
    :func:`to_torchao_int4`: on CUDA packed by PyTorch's own op, elsewhere by
    :func:`~qalora_tune.quantization.tinygemm_layout.pack_tinygemm_int4` (the same words),
    so that everything but the CUDA kernel itself can run and be tested on CPU."""
    n, k = gq.shape
    q, scale, zero = _pad_codes(
        gq, _round_up(n, TINYGEMM_N_TILE), _round_up(k, _CUDA_K_MULTIPLE)
    )
    q = q.to(device)
    if q.is_cuda:
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()
        qdata = tinygemm_int4pack(pairs, _CUDA_INNER_K_TILES)
    else:
        qdata = pack_tinygemm_int4(q, _CUDA_INNER_K_TILES)
    return TileInt4Tensor(
        qdata=qdata,
        scale_and_zero=pack_tinygemm_scales_and_zeros(
            scale.to(device, dtype), zero.to(device, dtype), dtype
        ),
        block_size=[1, gq.group_size],
        shape=torch.Size([n, k]),
    )


def _with_scale_codes(
    weight: Union[Int4OpaqueTensor, Int4TilePackedTo4dTensor],
    codes: torch.Tensor,
    scale_min: torch.Tensor,
    scale_step: torch.Tensor,
) -> DoubleQuantInt4Tensor:
    """``weight``'s packed codes and zeros with ``(out_dim, n_groups)`` scale ``codes``
    (padded to its layout), whose decoded scales ``weight`` already holds."""
    n, k = weight.shape
    n_groups = k // weight.block_size[1]
    groups_pad, n_pad = weight.scale_and_zero.shape[:2]
    device = weight.qdata.device
    padded_codes = torch.zeros(groups_pad, n_pad, dtype=torch.uint8, device=device)
    padded_codes[:n_groups, :n] = codes.t().to(device)
    padded_min = torch.zeros(n_pad, dtype=torch.float32, device=device)
    padded_step = torch.zeros_like(padded_min)
    padded_min[:n] = scale_min.to(device)
    padded_step[:n] = scale_step.to(device)
    return DoubleQuantInt4Tensor(
        weight.qdata,
        padded_codes,
        padded_min,
        padded_step,
        weight.scale_and_zero[..., 1].contiguous(),
        weight.block_size,
        weight.shape,
    )


def with_dense_scales(weight: Int4Weight) -> Union[CpuInt4Tensor, TileInt4Tensor]:
    """``weight`` with dense ``scale_and_zero`` (8-bit scales decoded to the weight's dtype;
    any other int4 weight is returned as this project's class for its layout)."""
    if not is_double_quant(weight):
        return as_int4_base(weight)
    cls = CpuInt4Tensor if weight.qdata.dim() == 2 else TileInt4Tensor
    return cls(
        qdata=weight.qdata,
        scale_and_zero=weight.dense_scale_and_zero(),
        block_size=weight.block_size,
        shape=weight.shape,
    )


def tinygemm_padded_in_features(qdata: torch.Tensor) -> int:
    """``in_dim`` after tinygemm's padding, read off its 4D packed codes."""
    return qdata.shape[1] * (2 * qdata.shape[3]) * TINYGEMM_K_TILE


def dequantize_packed(
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    out_features: int,
    in_features: int,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Dense ``(out_features, in_features)`` weight from an int4 subclass's inner tensors.

    Args:
        qdata (torch.Tensor): CPU layout ``(N_pad, K / 2)`` uint8, or tinygemm's 4D layout.
        scale_and_zero (torch.Tensor): ``(n_groups_pad, N_pad, 2)``.
        group_size (int): quantization group size.
        out_features (int): ``N`` (rows beyond it are padding).
        in_features (int): ``K``.
        dtype (torch.dtype, optional): dtype to return; defaults to
            ``scale_and_zero.dtype``. fp32 and fp64 compute in it; bf16 and fp16 form
            ``(q - 8) * scale + zero`` as one multiply-add in fp32 and round once, the value
            the int4 kernels compute in registers.

    Returns:
        torch.Tensor: ``(q - 8) * scale + zero``.
    """
    dtype = dtype or scale_and_zero.dtype
    if qdata.dim() == 2:
        q = unpack_cpu_int4(qdata, qdata.shape[0], in_features)[:out_features]
    else:
        q = unpack_tinygemm_int4(qdata)[:out_features, :in_features]
    n_groups = in_features // group_size
    scale = scale_and_zero[:n_groups, :out_features, 0].t().to(dtype).unsqueeze(-1)
    zero = scale_and_zero[:n_groups, :out_features, 1].t().to(dtype).unsqueeze(-1)
    shifted = q.to(dtype).sub_(8).unflatten(-1, (n_groups, group_size))  # exact
    if dtype.itemsize < 4:  # addcmul computes 16-bit floats in fp32: one rounding
        return torch.addcmul(zero, shifted, scale).flatten(-2)
    return (shifted * scale + zero).flatten(-2)


def from_torchao_int4(weight: Int4Weight) -> GroupQuantizedWeight:
    """Unpack a torchao int4 weight into plain codes, scales and zeros (on its device).

    Args:
        weight (Int4OpaqueTensor or Int4TilePackedTo4dTensor): packed weight.

    Returns:
        GroupQuantizedWeight: codes ``(out_dim, in_dim)`` and scales/zeros
        ``(out_dim, in_dim // group_size)`` in the weight's dtype.
    """
    if not is_int4_weight(weight):
        raise UserTypeError(
            f"expected Int4OpaqueTensor or Int4TilePackedTo4dTensor, got {type(weight).__name__}"
        )
    weight = with_dense_scales(weight)
    n, k = weight.shape
    group_size = weight.block_size[1]
    if weight.qdata.dim() == 2:  # the CPU kernel's layout
        q = unpack_cpu_int4(weight.qdata, weight.qdata.shape[0], k)[:n]
    else:
        q = unpack_tinygemm_int4(weight.qdata)[:n, :k]
    scale, zero = unpack_tinygemm_scales_and_zeros(weight.scale_and_zero)
    n_groups = k // group_size
    return GroupQuantizedWeight(
        qdata=q.contiguous(),
        scale=scale.squeeze(-1)[:n, :n_groups].contiguous(),
        zero=zero.squeeze(-1)[:n, :n_groups].contiguous(),
        group_size=group_size,
        bits=4,
    )


def dequantize_int4(
    weight: Int4Weight, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Dequantize a torchao int4 weight to a dense ``(out_dim, in_dim)`` tensor.

    Args:
        weight (Int4OpaqueTensor or Int4TilePackedTo4dTensor): packed weight.
        dtype (torch.dtype, optional): output dtype; defaults to the weight's dtype.

    Returns:
        torch.Tensor: ``(q - 8) * scale + zero`` of shape ``(out_dim, in_dim)``.
    """
    n, k = weight.shape
    weight = with_dense_scales(weight)
    return dequantize_packed(
        weight.qdata, weight.scale_and_zero, weight.block_size[1], n, k, dtype
    )


def zero_points(weight: Int4Weight) -> torch.Tensor:
    """A writable view of the float zero points, shape ``(out_dim, in_dim // group_size)``.

    Writing into it changes the weight in place; this is all a QA-LoRA merge touches.
    """
    n, k = weight.shape
    n_groups = k // weight.block_size[1]
    if is_double_quant(weight):
        return weight.zero_points()
    return weight.scale_and_zero[:n_groups, :n, 1].t()


def _int4_to_copy(func, types, args, kwargs):
    """``Tensor.to`` for int4 weights: repack when the device type changes, cast scales
    and zeros when the dtype changes (torchao 0.15 keeps the layout and ignores dtype).
    A move to CUDA without a dtype gives bf16, the only dtype tinygemm computes in."""
    weight = args[0]
    device = torch.device(kwargs.get("device") or weight.device)
    dtype = kwargs.get("dtype")
    if dtype is None:
        # a plain device move keeps the dtype, except that tinygemm (CUDA) is bf16 only
        dtype = torch.bfloat16 if device.type == "cuda" else weight.dtype
    if device.type == weight.device.type and dtype == weight.dtype:
        return as_int4_base(weight).__class__(
            weight.qdata.to(device),
            weight.scale_and_zero.to(device),
            weight.block_size,
            weight.shape,
            act_pre_scale=None
            if weight.act_pre_scale is None
            else weight.act_pre_scale.to(device),
        )
    if weight.act_pre_scale is not None:
        raise UserValueError("moving an int4 weight with act_pre_scale is not supported")
    return to_torchao_int4(from_torchao_int4(weight), device=device, dtype=dtype)


for _cls in (CpuInt4Tensor, TileInt4Tensor):
    _cls.implements(torch.ops.aten._to_copy.default)(_int4_to_copy)


@DoubleQuantInt4Tensor.implements(torch.ops.aten._to_copy.default)
def _double_quant_to_copy(func, types, args, kwargs):
    """``Tensor.to`` for int4 weights with 8-bit scales: as for the others, and the scale
    codes and their per-row grid are kept bit for bit."""
    weight = args[0]
    n, k = weight.shape
    n_groups = k // weight.block_size[1]
    moved = _int4_to_copy(func, types, (with_dense_scales(weight),), kwargs)
    return _with_scale_codes(
        moved,
        weight.scale_codes[:n_groups, :n].t(),
        weight.scale_min[:n],
        weight.scale_step[:n],
    )


def empty_int4(
    out_dim: int,
    in_dim: int,
    group_size: int,
    device: Union[str, torch.device],
    dtype: Optional[torch.dtype] = None,
    double_quant: bool = False,
) -> Int4Weight:
    """An uninitialised CPU-layout int4 weight, for building models on the meta device.

    Shapes and dtypes match what :func:`to_torchao_int4` gives on CPU, so a model built
    on ``meta`` has the parameter structure of the real one without allocating it.

    Args:
        out_dim (int): ``N``.
        in_dim (int): ``K``, a multiple of ``group_size``.
        group_size (int): quantization group size.
        device (str or torch.device): usually ``"meta"``.
        dtype (torch.dtype, optional): dtype of the scales and zeros; defaults to the
            default dtype.
        double_quant (bool): a ``DoubleQuantInt4Tensor`` (8-bit scales) instead.

    Returns:
        Int4OpaqueTensor: of shape ``(out_dim, in_dim)`` with empty inner tensors.
    """
    dtype = dtype or torch.get_default_dtype()
    n_pad = _round_up(out_dim, PACK_ROW_MULTIPLE)
    if double_quant:
        groups = in_dim // group_size
        return DoubleQuantInt4Tensor(
            qdata=torch.empty(n_pad, in_dim // 2, dtype=torch.uint8, device=device),
            scale_codes=torch.empty(groups, n_pad, dtype=torch.uint8, device=device),
            scale_min=torch.empty(n_pad, dtype=torch.float32, device=device),
            scale_step=torch.empty(n_pad, dtype=torch.float32, device=device),
            zero=torch.empty(groups, n_pad, dtype=dtype, device=device),
            block_size=[1, group_size],
            shape=torch.Size([out_dim, in_dim]),
        )
    return CpuInt4Tensor(
        qdata=torch.empty(n_pad, in_dim // 2, dtype=torch.uint8, device=device),
        scale_and_zero=torch.empty(
            in_dim // group_size, n_pad, 2, dtype=dtype, device=device
        ),
        block_size=[1, group_size],
        shape=torch.Size([out_dim, in_dim]),
    )
