"""Int4Linear: a frozen linear layer whose weight is a torchao int4 (or intx) tensor."""

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from qalora_tune.ops import int4_dq_linear, int4_linear, intx_linear
from qalora_tune.quantization import (
    INT4_KERNEL_GROUP_SIZES,
    SUPPORTED_BITS,
    check_double_quant,
    empty_base,
    from_torchao_base,
    get_quantizer,
    intx_bits,
    is_double_quant,
    is_intx_weight,
    is_quantized_base,
    quantize_rtn,
    quantize_rtn_to_cpu_int4,
    to_torchao_base,
    uses_int4_kernel,
    with_dense_scales,
)

__all__ = ["Int4Linear"]


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class Int4Linear(nn.Module):
    """A frozen linear layer computed through torchao's int4 kernels.

    The weight ``(out_dim, in_dim)`` is quantized asymmetrically per (output row, group of
    ``group_size`` consecutive inputs) with float zero points,
    ``W[n, k] = (q[n, k] - 8) * s[n, g] + z[n, g]``, and stored as a torchao
    ``Int4OpaqueTensor`` (CPU) or ``Int4TilePackedTo4dTensor`` (CUDA). Gradients flow to
    the input, never to the weight.

    A base the int4 kernels cannot hold (8-bit codes, or a group size other than 32, 64,
    128, 256) is stored as torchao's ``IntxUnpackedToInt8Tensor`` instead (one int8 per
    code, float scale and zero point per group) and computed by dequantizing it for a
    dense matmul in every call (``qalora_tune::intx_linear``): less memory than a
    full-precision base, no int4 speed-up; see
    :mod:`qalora_tune.quantization.base_weight`. With ``double_quant_scales`` an int4 base
    keeps its scales as 8-bit codes (``DoubleQuantInt4Tensor``, computed by
    ``qalora_tune::int4_dq_linear``). Every linear of a QA-LoRA model that has no adapter
    is one of these; :class:`~qalora_tune.modules.QALoRALinear` adds the adapter.

    When ``group_size`` does not divide ``in_dim`` and ``pad_in_dim`` is set, the weight
    gets zero columns up to the next multiple of ``group_size`` and the input is padded
    with zeros to match, so the layer computes exactly ``x W^T`` while every group has
    ``group_size`` columns (``weight`` then has shape ``(out_dim, padded_in_dim)``).

    Args:
        in_dim (int): input features ``K``.
        out_dim (int): output features ``N``.
        group_size (int): quantization group size ``G``: 32, 64, 128 or 256 run on the
            int4 kernels; any other positive size on the dequantizing intx path.
        use_bias (bool): whether the layer has a (frozen, full precision) bias.
        quantizer (str): how full-precision weights are quantized on load: ``"rtn"``
            (min-max round to nearest) or ``"hqq"`` (half-quadratic); ``"gptq"`` needs
            calibration data, so such a layer takes only int4 weights (see
            :func:`~qalora_tune.quantization.calibrate_gptq`).
        pad_in_dim (bool): allow ``in_dim`` that ``group_size`` does not divide by padding
            it with zero columns.
        dtype (torch.dtype, optional): dtype of the scales, zeros and compute (fp32, bf16
            or fp16 on CPU, bf16 on CUDA). Defaults to the default dtype on CPU and bf16
            on CUDA.
        device (torch.device, optional): where to build the layer; ``meta`` builds the
            structure without memory.
        bits (int): bit width of the quantization grid: 2, 3, 4 or 8. With an int4 group
            size, 2- and 3-bit codes are stored in the int4 layout (``q + 8 - 2**(bits -
            1)``) and computed by the same kernels, so they change accuracy, not memory or
            speed; 8-bit codes take the intx path.
        double_quant_scales (bool): keep the int4 base's per-group scales as 8-bit codes
            on a per-row grid (double quantization, see
            :mod:`qalora_tune.quantization.double_quant`): ``(16 - 8) / group_size`` fewer
            bits per weight in bf16, the zero points (which the merge updates) unchanged.
            Only for bases on the int4 kernels.

    Raises:
        ValueError: if ``group_size`` is not positive, or does not divide ``in_dim``
            while ``pad_in_dim`` is off, or ``double_quant_scales`` is set for a base off
            the int4 kernels.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        group_size: int = 64,
        use_bias: bool = False,
        quantizer: str = "rtn",
        pad_in_dim: bool = False,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        bits: int = 4,
        double_quant_scales: bool = False,
    ):
        super().__init__()
        _validate_base_hparams(in_dim, out_dim, group_size, pad_in_dim, bits)
        check_double_quant(double_quant_scales, bits, group_size)
        self.bits = bits
        self.double_quant_scales = double_quant_scales
        self._quantize = get_quantizer(quantizer)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.group_size = group_size
        self.quantizer = quantizer
        self.padded_in_dim = _round_up(in_dim, group_size)
        device = torch.device(device) if device is not None else torch.get_default_device()
        if device.type == "meta":
            weight = empty_base(
                out_dim, self.padded_in_dim, group_size, bits, device, dtype, double_quant_scales
            )
        else:
            # a placeholder like nn.Linear's init, quantized with fast RTN whatever the
            # quantizer: real weights arrive through from_linear / load_state_dict
            init_weight = torch.empty(out_dim, in_dim, device=device, dtype=torch.float32)
            nn.init.kaiming_uniform_(init_weight, a=math.sqrt(5))
            placeholder = quantize_rtn(self._pad_columns(init_weight), group_size, bits)
            weight = to_torchao_base(
                placeholder, device=device, dtype=dtype, double_quant=double_quant_scales
            )
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_dim, device=device, dtype=dtype), requires_grad=False)
            if use_bias
            else None
        )
        self.register_load_state_dict_pre_hook(_quantize_incoming_weight)

    @property
    def n_groups(self) -> int:
        """Quantization groups per output row (and the pooled adapter's input width)."""
        return self.padded_in_dim // self.group_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> "Int4Linear":
        """Build from a full-precision ``nn.Linear``, quantizing its weight.

        Args:
            linear (nn.Linear): layer whose weight (and bias) become the frozen base.
            **kwargs: the other constructor arguments of this class.
        """
        kwargs.setdefault("dtype", linear.weight.dtype)
        kwargs.setdefault("device", linear.weight.device)
        module = cls(
            linear.in_features,
            linear.out_features,
            use_bias=linear.bias is not None,
            **kwargs,
        )
        module.quantize_base_(linear.weight)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    @classmethod
    def from_int4(
        cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, **kwargs: Any
    ) -> "Int4Linear":
        """Wrap an already quantized torchao int4 (or intx) weight.

        Args:
            weight (torch.Tensor): ``Int4OpaqueTensor`` or ``Int4TilePackedTo4dTensor`` of
                shape ``(out_dim, in_dim)``, asymmetric with contiguous input groups, or an
                ``IntxUnpackedToInt8Tensor`` with float zero points (8-bit codes or other
                group sizes).
            bias (torch.Tensor, optional): frozen bias of shape ``(out_dim,)``.
            **kwargs: the other constructor arguments; ``group_size`` (and, for intx,
                ``bits``) default to the weight's. With ``double_quant_scales`` (default:
                whether ``weight`` has 8-bit scales) an int4 weight's scales are stored
                in 8 bits, without it 8-bit scales are decoded.

        Raises:
            TypeError: if ``weight`` is not one of those subclasses.
            ValueError: if its groups are not contiguous input groups of ``group_size``,
                or its subclass is not the one ``bits`` and ``group_size`` select.
        """
        if not is_quantized_base(weight):
            raise TypeError(
                "the QA-LoRA base must be a torchao Int4OpaqueTensor, "
                "Int4TilePackedTo4dTensor or IntxUnpackedToInt8Tensor (asymmetric, float "
                f"zero points), got {type(weight).__name__}"
            )
        kwargs.setdefault("group_size", weight.block_size[-1])
        if is_intx_weight(weight):
            kwargs.setdefault("bits", intx_bits(weight))
        kwargs.setdefault("dtype", weight.dtype)
        kwargs.setdefault("device", weight.device)
        kwargs.setdefault("double_quant_scales", is_double_quant(weight))
        out_dim, in_dim = weight.shape
        module = cls(in_dim, out_dim, use_bias=bias is not None, **kwargs)
        module._check_base(weight)
        module.weight = nn.Parameter(module._in_storage(weight), requires_grad=False)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def _check_base(self, weight: torch.Tensor) -> None:
        # QA-LoRA's merge is exact only for asymmetric float-zero quantization whose groups
        # are the adapter's pooling groups: contiguous runs of group_size inputs of one row.
        block_size = tuple(weight.block_size)
        if block_size != (1, self.group_size):
            raise ValueError(
                f"the base is quantized with block_size={block_size}, but QA-LoRA needs "
                f"contiguous input groups (1, {self.group_size}) matching group_size; "
                "set group_size to the base's group size"
            )
        if is_intx_weight(weight) == uses_int4_kernel(self.bits, self.group_size):
            expected = (
                "an int4 kernel tensor"
                if uses_int4_kernel(self.bits, self.group_size)
                else "an IntxUnpackedToInt8Tensor"
            )
            raise ValueError(
                f"a {self.bits}-bit base with group_size={self.group_size} is stored as "
                f"{expected}, got {type(weight).__name__}; set model.bits and "
                "model.group_size to those the weights were quantized with"
            )
        if is_intx_weight(weight) and intx_bits(weight) != self.bits:
            raise ValueError(
                f"the base has {intx_bits(weight)}-bit codes but the layer is built for "
                f"bits={self.bits}; set model.bits={intx_bits(weight)}"
            )
        if is_intx_weight(weight) and not weight.zero_point.is_floating_point():
            raise ValueError(
                "the intx base has integer zero points, which cannot take a QA-LoRA merge; "
                "quantize it with float zero points"
            )
        if getattr(weight, "act_pre_scale", None) is not None:
            raise ValueError(
                "the base scales its input (act_pre_scale), so its groups no longer see the "
                "input the adapter pools; quantize the base without activation pre-scaling"
            )
        if tuple(weight.shape) != (self.out_dim, self.padded_in_dim):
            raise ValueError(
                f"expected a base of shape ({self.out_dim}, {self.padded_in_dim}), "
                f"got {tuple(weight.shape)}"
            )

    def _in_storage(self, weight: torch.Tensor) -> torch.Tensor:
        """A checked quantized base with its scales as this layer keeps them (8-bit codes
        with ``double_quant_scales``, else dense)."""
        if is_double_quant(weight) and not self.double_quant_scales:
            return with_dense_scales(weight)
        if self.double_quant_scales and not is_double_quant(weight):
            return to_torchao_base(
                from_torchao_base(weight),
                device=weight.device,
                dtype=weight.dtype,
                double_quant=True,
            )
        return weight

    def _pad_columns(self, tensor: torch.Tensor) -> torch.Tensor:
        extra = self.padded_in_dim - self.in_dim
        return F.pad(tensor, (0, extra)) if extra else tensor

    @torch.no_grad()
    def quantize_base_(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision ``(out_dim, in_dim)`` weight into the frozen base.

        Scales and zeros keep the current base's dtype and device.
        """
        if getattr(self, "merged", False):
            raise ValueError("unmerge() the adapter before replacing the base weight")
        if tuple(weight.shape) != (self.out_dim, self.in_dim):
            raise ValueError(
                f"expected a base weight of shape ({self.out_dim}, {self.in_dim}), "
                f"got {tuple(weight.shape)}"
            )
        if self.weight.device.type == "meta":
            raise ValueError(
                "cannot load weights into a layer on the meta device; build the model on "
                "cpu or cuda"
            )
        target, dtype = self.weight.device, self.weight.dtype
        if (
            self.quantizer == "rtn" and target.type == "cpu" and not self.double_quant_scales
            and uses_int4_kernel(self.bits, self.group_size)
        ):
            # the current base (a placeholder, typically) goes first, as nothing below can
            # fail (a 128k-vocabulary output layer's base is 0.3 GB); then the same bits as
            # the general path, a block of rows at a time
            self.weight = nn.Parameter(
                empty_base(self.out_dim, self.padded_in_dim, self.group_size, self.bits, "meta",
                           dtype),
                requires_grad=False,
            )
            packed = quantize_rtn_to_cpu_int4(
                weight.to(target), self.group_size, self.bits, dtype, self.padded_in_dim
            )
        else:
            quantized = self._quantize(
                self._pad_columns(weight.to(target)), self.group_size, self.bits
            )
            packed = to_torchao_base(
                quantized, device=target, dtype=dtype, double_quant=self.double_quant_scales
            )
        self.weight = nn.Parameter(packed, requires_grad=False)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + bias`` for an input already padded to ``(..., padded_in_dim)``."""
        weight = self.weight
        if is_intx_weight(weight):
            out = intx_linear(x, weight.qdata, weight.scale, weight.zero_point)
        elif is_double_quant(weight):
            out = int4_dq_linear(
                x,
                weight.qdata,
                weight.scale_codes,
                weight.scale_min,
                weight.scale_step,
                weight.zero,
                self.group_size,
                self.out_dim,
            )
        else:
            out = int4_linear(
                x, weight.qdata, weight.scale_and_zero, self.group_size, self.out_dim
            )
        return out if self.bias is None else out + self.bias

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``(..., in_dim)`` to ``(..., padded_in_dim)`` (a no-op without padding)."""
        return self._pad_columns(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): input of shape ``(..., in_dim)``.

        Returns:
            torch.Tensor: output of shape ``(..., out_dim)`` in ``x.dtype``.
        """
        return self.base_forward(self.pad_input(x))

    def extra_repr(self) -> str:
        padded = f", padded_in_dim={self.padded_in_dim}" if self.padded_in_dim != self.in_dim else ""
        scales = ", double_quant_scales=True" if self.double_quant_scales else ""
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, group_size={self.group_size}, "
            f"bits={self.bits}, quantizer={self.quantizer}{padded}{scales}"
        )


def _quantize_incoming_weight(
    module: Int4Linear, state_dict: Dict[str, Any], prefix: str, *args: Any
) -> None:
    """load_state_dict pre-hook: quantize a full-precision base weight on arrival.

    One layer at a time, so a model loads from bf16/fp32 checkpoints without ever holding
    them whole in full precision; a quantized weight is checked and moved to the layer's
    layout.
    """
    key = prefix + "weight"
    incoming = state_dict.get(key)
    if incoming is None:
        return
    if is_quantized_base(incoming):
        module._check_base(incoming)
        if incoming.device.type != module.weight.device.type:
            incoming = incoming.to(module.weight.device)
        state_dict[key] = module._in_storage(incoming)
        return
    module.quantize_base_(incoming)
    state_dict[key] = module.weight


def _validate_base_hparams(
    in_dim: int, out_dim: int, group_size: int, pad_in_dim: bool, bits: int
) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"in_dim and out_dim must be positive, got {in_dim} and {out_dim}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(
            f"group_size={group_size!r} must be a positive integer (the int4 kernels have "
            f"{INT4_KERNEL_GROUP_SIZES}; others run on the dequantizing intx path)"
        )
    if in_dim % group_size and not pad_in_dim:
        raise ValueError(
            f"group_size={group_size} does not divide in_dim={in_dim}; choose a group_size "
            f"that divides {in_dim}, or set pad_in_dim=True to pad the input with zeros "
            "(the merge stays exact)"
        )
