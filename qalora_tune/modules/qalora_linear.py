"""QALoRALinear: a frozen torchao int4 base plus a group-pooled low-rank adapter."""

import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from qalora_tune._compat import AdapterModule
from qalora_tune.ops import int4_linear, pooled_lora
from qalora_tune.quantization import (
    INT4_KERNEL_GROUP_SIZES,
    get_quantizer,
    is_int4_weight,
    quantize_rtn,
    to_torchao_int4,
    validate_group_size,
    zero_points,
)

__all__ = ["QALoRALinear"]


class QALoRALinear(nn.Module, AdapterModule):
    """QA-LoRA linear layer (Xu et al., 2023, arXiv 2309.14717).

    The frozen base ``W`` (``out_dim x in_dim``) is stored as a torchao int4 tensor,
    quantized asymmetrically per (output row, group of ``group_size`` consecutive inputs)
    with float zero points: ``W[n, k] = (q[n, k] - 8) * s[n, g] + z[n, g]``. The adapter
    sees the input averaged over the same groups::

        y = x W^T + (alpha / rank) * B A pool(dropout(x))

    with ``A`` of shape ``(rank, in_dim // group_size)`` and ``B`` of shape
    ``(out_dim, rank)``, ``B`` starting at zero. As the update is constant inside a group,
    :meth:`merge` folds it into the zero points, ``z += (alpha / rank) (B A) / group_size``,
    and the layer stays the same int4 tensor.

    Args:
        in_dim (int): input features ``K``; a multiple of ``group_size``.
        out_dim (int): output features ``N``.
        rank (int): adapter rank ``r`` (useful up to ``in_dim // group_size``).
        alpha (float): adapter scaling numerator; the update is scaled by ``alpha / rank``.
        group_size (int): quantization group size ``G`` shared by base and adapter:
            one of 32, 64, 128, 256 (the int4 kernels' group sizes).
        dropout (float): dropout on the adapter's input.
        use_bias (bool): whether the base has a (frozen, full precision) bias.
        quantizer (str): how a full-precision weight is quantized: ``"rtn"`` (min-max
            round to nearest) or ``"hqq"`` (half-quadratic).
        dtype (torch.dtype, optional): dtype of the int4 kernel's scales, zeros and compute
            (fp32/bf16/fp16 on CPU, bf16 on CUDA). Defaults to the default dtype on CPU
            and bf16 on CUDA.
        device (torch.device, optional): where to build the layer.

    Raises:
        ValueError: if ``group_size`` does not divide ``in_dim`` or has no kernel, if
            ``rank`` or ``alpha`` is not positive, or ``dropout`` is outside ``[0, 1)``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        group_size: int = 64,
        dropout: float = 0.0,
        use_bias: bool = False,
        quantizer: str = "rtn",
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        _validate_hparams(in_dim, out_dim, rank, alpha, group_size, dropout)
        self._quantize = get_quantizer(quantizer)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.rank = rank
        self.alpha = alpha
        self.group_size = group_size
        self.quantizer = quantizer
        self.merged = False
        # 'disabled' turns the adapter off (torchtune uses it for DPO reference passes)
        self.disabled = False
        # zeros before merge(), so unmerge() restores them exactly; a buffer so it follows
        # device moves, non-persistent so checkpoints hold only the int4 weight
        self.register_buffer("_premerge_zeros", None, persistent=False)

        # A placeholder base like nn.Linear's init, quantized with fast RTN whatever the
        # quantizer: real weights arrive through from_linear / load_state_dict.
        init_weight = torch.empty(out_dim, in_dim, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(init_weight, a=math.sqrt(5))
        placeholder = quantize_rtn(init_weight, group_size)
        self.weight = nn.Parameter(
            to_torchao_int4(placeholder, device=init_weight.device, dtype=dtype),
            requires_grad=False,
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_dim, device=device, dtype=dtype), requires_grad=False)
            if use_bias
            else None
        )
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim // group_size, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, out_dim, bias=False, device=device, dtype=dtype)
        self.initialize_parameters()
        self.register_load_state_dict_pre_hook(_quantize_incoming_weight)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, alpha: float, **kwargs: Any
    ) -> "QALoRALinear":
        """Build from a full-precision ``nn.Linear``, quantizing its weight.

        Args:
            linear (nn.Linear): layer whose weight (and bias) become the frozen base.
            rank (int): adapter rank.
            alpha (float): adapter scaling numerator.
            **kwargs: any other :class:`QALoRALinear` argument.

        Returns:
            QALoRALinear: with ``B = 0``, equal to the quantized base.
        """
        kwargs.setdefault("dtype", linear.weight.dtype)
        kwargs.setdefault("device", linear.weight.device)
        module = cls(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            use_bias=linear.bias is not None,
            **kwargs,
        )
        module.quantize_base_(linear.weight)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    @classmethod
    def from_int4(
        cls,
        weight: torch.Tensor,
        rank: int,
        alpha: float,
        bias: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> "QALoRALinear":
        """Wrap an already quantized torchao int4 weight as the frozen base.

        Args:
            weight (torch.Tensor): ``Int4OpaqueTensor`` or ``Int4TilePackedTo4dTensor`` of
                shape ``(out_dim, in_dim)``, asymmetric with contiguous input groups.
            rank (int): adapter rank.
            alpha (float): adapter scaling numerator.
            bias (torch.Tensor, optional): frozen bias of shape ``(out_dim,)``.
            **kwargs: other :class:`QALoRALinear` arguments; ``group_size`` defaults to
                the weight's.

        Raises:
            TypeError: if ``weight`` is not one of those int4 subclasses.
            ValueError: if its groups are not contiguous input groups of ``group_size``.
        """
        if not is_int4_weight(weight):
            raise TypeError(
                "the QA-LoRA base must be a torchao Int4OpaqueTensor or "
                "Int4TilePackedTo4dTensor (asymmetric, float zero points), "
                f"got {type(weight).__name__}"
            )
        kwargs.setdefault("group_size", weight.block_size[-1])
        kwargs.setdefault("dtype", weight.dtype)
        kwargs.setdefault("device", weight.device)
        out_dim, in_dim = weight.shape
        module = cls(in_dim, out_dim, rank, alpha, use_bias=bias is not None, **kwargs)
        module._check_mergeable(weight)
        module.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def _check_mergeable(self, weight: torch.Tensor) -> None:
        # The merge is exact only for asymmetric float-zero quantization whose groups are
        # the adapter's pooling groups: contiguous runs of group_size inputs of one row.
        block_size = tuple(weight.block_size)
        if block_size != (1, self.group_size):
            raise ValueError(
                f"the base is quantized with block_size={block_size}, but QA-LoRA needs "
                f"contiguous input groups (1, {self.group_size}) matching group_size; "
                "set group_size to the base's group size"
            )
        if getattr(weight, "act_pre_scale", None) is not None:
            raise ValueError(
                "the base scales its input (act_pre_scale), so its groups no longer see the "
                "input the adapter pools; quantize the base without activation pre-scaling"
            )
        if tuple(weight.shape) != (self.out_dim, self.in_dim):
            raise ValueError(
                f"expected a base of shape ({self.out_dim}, {self.in_dim}), "
                f"got {tuple(weight.shape)}"
            )

    @torch.no_grad()
    def quantize_base_(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision ``(out_dim, in_dim)`` weight into the frozen base.

        Scales and zeros keep the current base's dtype and device.
        """
        if self.merged:
            raise ValueError("unmerge() the adapter before replacing the base weight")
        if tuple(weight.shape) != (self.out_dim, self.in_dim):
            raise ValueError(
                f"expected a base weight of shape ({self.out_dim}, {self.in_dim}), "
                f"got {tuple(weight.shape)}"
            )
        quantized = self._quantize(weight.to(self.weight.device), self.group_size, 4)
        packed = to_torchao_int4(quantized, device=self.weight.device, dtype=self.weight.dtype)
        self.weight = nn.Parameter(packed, requires_grad=False)

    def initialize_parameters(self) -> None:
        """Kaiming-uniform ``A`` (as ``nn.Linear``) and zero ``B``: the layer starts as the base."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def adapter_params(self) -> List[str]:
        """Names of the trainable adapter parameters (torchtune's AdapterModule protocol)."""
        return ["lora_a.weight", "lora_b.weight"]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    # ------------------------------------------------------------------ compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): input of shape ``(..., in_dim)``.

        Returns:
            torch.Tensor: output of shape ``(..., out_dim)`` in ``x.dtype``.
        """
        out = int4_linear(
            x, self.weight.qdata, self.weight.scale_and_zero, self.group_size, self.out_dim
        )
        if self.bias is not None:
            out = out + self.bias
        if self.merged and self.disabled:
            raise ValueError(
                "the adapter is merged into the base; unmerge() before disabling it"
            )
        if self.merged or self.disabled:
            return out
        return out + pooled_lora(
            self.dropout(x),
            self.lora_a.weight,
            self.lora_b.weight,
            self.group_size,
            self.scaling,
        )

    # ------------------------------------------------------------------ merge

    @torch.no_grad()
    def zero_point_delta(self) -> torch.Tensor:
        """The adapter as a zero-point shift, ``(alpha / r) (B A) / G``, in float64.

        Returns:
            torch.Tensor: ``(out_dim, in_dim // group_size)``.
        """
        product = self.lora_b.weight.double() @ self.lora_a.weight.double()
        return product * (self.scaling / self.group_size)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the int4 zero points; codes and scales stay untouched.

        The new zeros are computed in float64 and rounded once to the storage dtype (the
        only deviation from the unmerged layer). The previous zeros are kept, so
        :meth:`unmerge` restores them bit for bit.

        The merged flag is not part of the state dict: a merged layer's ``weight`` already
        holds the adapter, so export it without ``lora_*`` (or load it with ``B = 0``).
        """
        if self.merged:
            raise ValueError("the adapter is already merged")
        zeros = zero_points(self.weight)
        self._premerge_zeros = zeros.clone()
        zeros.copy_(zeros.double() + self.zero_point_delta())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the zero points.

        Restores the zeros saved by :meth:`merge` exactly; a layer loaded already merged
        has none saved, and gets ``z - delta`` rounded once to the storage dtype.
        """
        if not self.merged:
            raise ValueError("the adapter is not merged")
        zeros = zero_points(self.weight)
        if self._premerge_zeros is not None:
            zeros.copy_(self._premerge_zeros)
        else:
            zeros.copy_(zeros.double() - self.zero_point_delta())
        self._premerge_zeros = None
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, "
            f"alpha={self.alpha}, group_size={self.group_size}, quantizer={self.quantizer}, "
            f"merged={self.merged}"
        )


def _quantize_incoming_weight(
    module: QALoRALinear, state_dict: Dict[str, Any], prefix: str, *args: Any
) -> None:
    """load_state_dict pre-hook: quantize a full-precision base weight on arrival.

    One layer at a time, so a model loads from bf16/fp32 checkpoints without ever holding
    them whole; an int4 weight is checked to be mergeable and moved to the layer's layout.
    """
    key = prefix + "weight"
    incoming = state_dict.get(key)
    if incoming is None:
        return
    if is_int4_weight(incoming):
        module._check_mergeable(incoming)
        if type(incoming) is not type(module.weight):
            state_dict[key] = incoming.to(module.weight.device)
        return
    module.quantize_base_(incoming)
    state_dict[key] = module.weight


def _validate_hparams(
    in_dim: int, out_dim: int, rank: int, alpha: float, group_size: int, dropout: float
) -> None:
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"in_dim and out_dim must be positive, got {in_dim} and {out_dim}")
    validate_group_size(in_dim, group_size)
    if group_size not in INT4_KERNEL_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size} has no int4 kernel; use one of {INT4_KERNEL_GROUP_SIZES}"
        )
    if rank <= 0:
        raise ValueError(f"rank must be a positive integer, got rank={rank}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got alpha={alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout}")
