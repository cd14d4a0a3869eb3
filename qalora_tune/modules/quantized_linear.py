"""QuantizedLinear: a frozen linear layer whose weight is a quantized base tensor."""

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from qalora_tune.errors import UserTypeError, UserValueError
from qalora_tune.modules.config import QALoRAConfig
from qalora_tune.quantization import get_quantizer, quantize_rtn
from qalora_tune.quantization.base_weight import (
    as_base,
    empty_base,
    from_torchao_base,
    is_quantized_base,
    to_base,
    uses_int4_kernel,
)
from qalora_tune.quantization.cpu_int4_blocks import quantize_rtn_to_cpu_int4
from qalora_tune.quantization.double_quant import is_double_quant
from qalora_tune.quantization.int4_weight import with_dense_scales
from qalora_tune.quantization.intx_weight import intx_bits, is_intx_weight

__all__ = ["Int4Linear", "QuantizedLinear"]


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is a quantized base (int4 kernels, or intx).

    The weight ``(out_dim, in_dim)`` is quantized asymmetrically per (output row, group of
    ``group_size`` consecutive inputs) with float zero points,
    ``W[n, k] = (q[n, k] - 8) * s[n, g] + z[n, g]``, and stored as one of this project's
    torchao tensor subclasses (:mod:`qalora_tune.quantization`): ``CpuInt4Tensor`` (CPU
    int4 kernel), ``TileInt4Tensor`` (CUDA tinygemm), ``DoubleQuantInt4Tensor`` (either,
    with 8-bit scales) or, for 8-bit codes and group sizes without an int4 kernel,
    ``IntxBaseTensor`` (dequantizing). The forward is ``F.linear(x, weight, bias)``: the
    weight routes it to its custom op, which carries the input gradient. Gradients flow to
    the input, never to the weight. Every linear of a QA-LoRA model that has no adapter is
    one of these; :class:`~qalora_tune.modules.QALoRALinear` adds the adapter.

    When ``group_size`` does not divide ``in_dim`` and ``pad_in_dim`` is set, the weight
    gets zero columns up to the next multiple of ``group_size`` and the input is padded
    with zeros to match, so the layer computes exactly ``x W^T`` while every group has
    ``group_size`` columns (``weight`` then has shape ``(out_dim, padded_in_dim)``).

    Args:
        in_dim (int): input features ``K``.
        out_dim (int): output features ``N``.
        config (QALoRAConfig, optional): bits, group size, quantizer, padding and scale
            storage of the base (the adapter fields are read by ``QALoRALinear``).
        use_bias (bool): whether the layer has a (frozen, full precision) bias.
        dtype (torch.dtype, optional): dtype of the scales, zeros and compute (fp32, bf16
            or fp16 on CPU, bf16 on CUDA). Defaults to the default dtype on CPU and bf16
            on CUDA.
        device (torch.device, optional): where to build the layer; ``meta`` builds the
            structure without memory.
        **knobs: instead of ``config``, its fields as keywords (``group_size=64,
            bits=4, ...``), for direct use of the layer.

    Raises:
        UserValueError: for a config no layer can hold, or a ``group_size`` that does not
            divide ``in_dim`` while ``pad_in_dim`` is off.
        UserTypeError: for both ``config`` and keywords, or an unknown keyword.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        config: Optional[QALoRAConfig] = None,
        *,
        use_bias: bool = False,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        **knobs: Any,
    ):
        super().__init__()
        config = _config(config, knobs)
        _validate_shape(in_dim, out_dim, config)
        self.config = config
        self._quantize = get_quantizer(config.quantizer)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.padded_in_dim = _round_up(in_dim, config.group_size)
        group_size, bits = config.group_size, config.bits
        double_quant_scales = config.double_quant_scales
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
            weight = to_base(
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
    def bits(self) -> int:
        return self.config.bits

    @property
    def group_size(self) -> int:
        return self.config.group_size

    @property
    def quantizer(self) -> str:
        return self.config.quantizer

    @property
    def double_quant_scales(self) -> bool:
        return self.config.double_quant_scales

    @property
    def n_groups(self) -> int:
        """Quantization groups per output row (and the pooled adapter's input width)."""
        return self.padded_in_dim // self.group_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> "QuantizedLinear":
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
    ) -> "QuantizedLinear":
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
            raise UserTypeError(
                "the QA-LoRA base must be a torchao Int4OpaqueTensor, "
                "Int4TilePackedTo4dTensor or IntxUnpackedToInt8Tensor (asymmetric, float "
                f"zero points), got {type(weight).__name__}"
            )
        if kwargs.get("config") is None:
            kwargs.setdefault("group_size", weight.block_size[-1])
            if is_intx_weight(weight):
                kwargs.setdefault("bits", intx_bits(weight))
            kwargs.setdefault("double_quant_scales", is_double_quant(weight))
        kwargs.setdefault("dtype", weight.dtype)
        kwargs.setdefault("device", weight.device)
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
            raise UserValueError(
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
            raise UserValueError(
                f"a {self.bits}-bit base with group_size={self.group_size} is stored as "
                f"{expected}, got {type(weight).__name__}; set model.bits and "
                "model.group_size to those the weights were quantized with"
            )
        if is_intx_weight(weight) and intx_bits(weight) != self.bits:
            raise UserValueError(
                f"the base has {intx_bits(weight)}-bit codes but the layer is built for "
                f"bits={self.bits}; set model.bits={intx_bits(weight)}"
            )
        if is_intx_weight(weight) and not weight.zero_point.is_floating_point():
            raise UserValueError(
                "the intx base has integer zero points, which cannot take a QA-LoRA merge; "
                "quantize it with float zero points"
            )
        if getattr(weight, "act_pre_scale", None) is not None:
            raise UserValueError(
                "the base scales its input (act_pre_scale), so its groups no longer see the "
                "input the adapter pools; quantize the base without activation pre-scaling"
            )
        if tuple(weight.shape) != (self.out_dim, self.padded_in_dim):
            raise UserValueError(
                f"expected a base of shape ({self.out_dim}, {self.padded_in_dim}), "
                f"got {tuple(weight.shape)}"
            )

    def _in_storage(self, weight: torch.Tensor) -> torch.Tensor:
        """A checked quantized base as this project's class for its layout, with its scales
        as this layer keeps them (8-bit codes with ``double_quant_scales``, else dense)."""
        weight = as_base(weight)
        if is_double_quant(weight) and not self.double_quant_scales:
            return with_dense_scales(weight)
        if self.double_quant_scales and not is_double_quant(weight):
            return to_base(
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
            raise UserValueError("unmerge() the adapter before replacing the base weight")
        if tuple(weight.shape) != (self.out_dim, self.in_dim):
            raise UserValueError(
                f"expected a base weight of shape ({self.out_dim}, {self.in_dim}), "
                f"got {tuple(weight.shape)}"
            )
        if self.weight.device.type == "meta":
            raise UserValueError(
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
            packed = to_base(
                quantized, device=target, dtype=dtype, double_quant=self.double_quant_scales
            )
        self.weight = nn.Parameter(packed, requires_grad=False)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + bias`` for an input already padded to ``(..., padded_in_dim)``: plain
        ``F.linear``, which the base tensor routes to its op (:mod:`qalora_tune.ops`)."""
        return F.linear(x, self.weight, self.bias)

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
    module: QuantizedLinear, state_dict: Dict[str, Any], prefix: str, *args: Any
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


def _config(config: Optional[QALoRAConfig], knobs: Dict[str, Any]) -> QALoRAConfig:
    """``config``, or one made from a layer's keyword arguments (not both)."""
    if config is not None:
        if knobs:
            raise UserTypeError(
                f"pass either config= or the keyword arguments {sorted(knobs)}, not both"
            )
        if not isinstance(config, QALoRAConfig):
            raise UserTypeError(f"config must be a QALoRAConfig, got {type(config).__name__}")
        return config
    unknown = sorted(set(knobs) - set(QALoRAConfig.__dataclass_fields__))
    if unknown:
        raise UserTypeError(
            f"unknown layer arguments {unknown}; the quantization and adapter knobs are "
            f"{sorted(QALoRAConfig.__dataclass_fields__)}"
        )
    return QALoRAConfig(**knobs)


def _validate_shape(in_dim: int, out_dim: int, config: QALoRAConfig) -> None:
    if in_dim <= 0 or out_dim <= 0:
        raise UserValueError(f"in_dim and out_dim must be positive, got {in_dim} and {out_dim}")
    if in_dim % config.group_size and not config.pad_in_dim:
        raise UserValueError(
            f"group_size={config.group_size} does not divide in_dim={in_dim}; choose a "
            f"group_size that divides {in_dim}, or set pad_in_dim=True to pad the input with "
            "zeros (the merge stays exact)"
        )


Int4Linear = QuantizedLinear
"""The former name of :class:`QuantizedLinear` (it also holds 8-bit bases), kept so code
written against it still runs."""
