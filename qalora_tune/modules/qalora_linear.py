"""QALoRALinear: a frozen quantized base plus a group-pooled low-rank adapter."""

import math
from dataclasses import replace
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from qalora_tune._compat import AdapterModule
from qalora_tune.errors import UserValueError
from qalora_tune.modules.config import QALoRAConfig
from qalora_tune.modules.quantized_linear import QuantizedLinear
from qalora_tune.ops import pooled_lora
from qalora_tune.quantization.base_weight import shift_zero_points_, stored_zero_points
from qalora_tune.quantization.intx_weight import is_intx_weight

__all__ = ["QALoRALinear"]


class QALoRALinear(QuantizedLinear, AdapterModule):
    """QA-LoRA linear layer (Xu et al., 2023, arXiv 2309.14717).

    The frozen base ``W`` (``out_dim x in_dim``) is a :class:`QuantizedLinear`'s: quantized
    asymmetrically per (output row, group of ``group_size`` consecutive inputs) with float
    zero points, ``W[n, k] = (q[n, k] - 8) * s[n, g] + z[n, g]``. The adapter sees the input
    summed over the same groups::

        y = x W^T + (alpha / rank) * B A pool(dropout(x)),    pool(x)[g] = sum_{k in g} x[k]

    with ``A`` of shape ``(rank, n_groups)`` and ``B`` of shape ``(out_dim, rank)``, ``B``
    starting at zero and ``A`` drawn as torchtune's LoRA draws a ``(rank, in_dim)`` A
    (uniform, bound ``1 / sqrt(in_dim)``). The adapter is then exactly a LoRA whose ``A``
    is constant on each group, so Adam moves it as it moves LoRA and LoRA's learning rate
    carries over, whatever the group size (``docs/design.md`` section 2). As the update is
    constant inside a group, :meth:`merge` folds it into the zero points,
    ``z += (alpha / rank) (B A)``, and the layer stays the same int4 tensor. With
    ``pad_in_dim`` the padded input columns are zeros and the merge stays exact.

    ``pooling="mean"`` is the convention of adapters written by earlier qalora-tune: the
    group average, ``A`` initialised with fan-in ``n_groups`` and ``z += (alpha / rank)
    (B A) / group_size``; such adapters load into it unchanged (the checkpoint loaders set
    it from the adapter's metadata, see :data:`~qalora_tune.modules.config.POOLINGS`).

    Args:
        in_dim (int): input features ``K``.
        out_dim (int): output features ``N``.
        config (QALoRAConfig, optional): the base's quantization (bits, group size,
            quantizer, padding, 8-bit scales) and the adapter (rank, alpha, dropout).
        use_bias (bool): whether the base has a (frozen, full precision) bias.
        dtype (torch.dtype, optional): dtype of the base's scales, zeros and compute
            (fp32/bf16/fp16 on CPU, bf16 on CUDA), and of the adapter. Defaults to the
            default dtype on CPU and bf16 on CUDA.
        device (torch.device, optional): where to build the layer.
        **knobs: instead of ``config``, its fields as keywords, e.g.
            ``QALoRALinear(4096, 4096, rank=16, alpha=32, group_size=64)``;
            ``pooling="mean"`` builds the convention of earlier adapters (see above).

    Raises:
        UserValueError: for a config no layer can hold (see :class:`QALoRAConfig`), or a
            ``group_size`` that does not divide ``in_dim`` without ``pad_in_dim``.
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
        super().__init__(in_dim, out_dim, config, use_bias=use_bias, dtype=dtype, device=device, **knobs)
        rank, dropout = self.config.rank, self.config.dropout
        self.merged = False
        # 'disabled' turns the adapter off (torchtune uses it for DPO reference passes)
        self.disabled = False
        # zeros before merge(), so unmerge() restores them exactly; a buffer so it follows
        # device moves, non-persistent so checkpoints hold only the int4 weight
        self.register_buffer("_premerge_zeros", None, persistent=False)
        device = self.weight.device
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.Linear(self.n_groups, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, out_dim, bias=False, device=device, dtype=dtype)
        if device.type != "meta":
            self.initialize_parameters()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: Optional[int] = None, alpha: Optional[float] = None,
        **kwargs: Any,
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
        return super().from_linear(linear, **_adapter_kwargs(rank, alpha), **kwargs)

    @classmethod
    def from_int4(
        cls,
        weight: torch.Tensor,
        rank: Optional[int] = None,
        alpha: Optional[float] = None,
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
        return super().from_int4(weight, bias=bias, **_adapter_kwargs(rank, alpha), **kwargs)

    def initialize_parameters(self) -> None:
        """Zero ``B``, so the layer starts as the base, and ``A`` uniform with bound
        ``1 / sqrt(in_dim)``, as torchtune's LoRA draws its ``A`` (``pooling="mean"``:
        ``1 / sqrt(n_groups)``, ``nn.Linear``'s default on ``A``'s own shape)."""
        if self.pooling == "sum":
            bound = 1.0 / math.sqrt(self.n_groups * self.group_size)
            nn.init.uniform_(self.lora_a.weight, -bound, bound)
        else:
            nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def adapter_params(self) -> List[str]:
        """Names of the trainable adapter parameters (torchtune's AdapterModule protocol)."""
        return ["lora_a.weight", "lora_b.weight"]

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def scaling(self) -> float:
        """The factor on ``B A`` applied to the group *mean* of the input (what the op
        ``qalora_tune::pooled_lora`` takes): ``alpha / rank`` times ``group_size`` for sum
        pooling, ``alpha / rank`` for mean pooling."""
        return self.config.scaling * self.config.pooling_factor

    @property
    def pooling(self) -> str:
        """The pooling convention, ``"sum"`` or ``"mean"`` (:data:`POOLINGS`). Setting it
        (as the adapter loaders do, from an adapter's metadata) changes the function the
        current ``A`` and ``B`` compute; it does not redraw them."""
        return self.config.pooling

    @pooling.setter
    def pooling(self, value: str) -> None:
        self.config = replace(self.config, pooling=value)

    @property
    def pooling_factor(self) -> int:
        """What the group mean is multiplied by to give the adapter's pooled input:
        ``group_size`` (sum pooling) or 1 (mean pooling)."""
        return self.config.pooling_factor

    # ------------------------------------------------------------------ compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): input of shape ``(..., in_dim)``.

        Returns:
            torch.Tensor: output of shape ``(..., out_dim)`` in ``x.dtype``.
        """
        if self.merged and self.disabled:
            raise UserValueError(
                "the adapter is merged into the base; unmerge() before disabling it"
            )
        x = self.pad_input(x)
        out = self.base_forward(x)
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
        """The adapter as a zero-point shift in float64: ``(alpha / r) (B A)`` (sum pooling;
        ``(alpha / r) (B A) / G`` for mean pooling).

        Returns:
            torch.Tensor: ``(out_dim, n_groups)``.
        """
        product = self.lora_b.weight.double() @ self.lora_a.weight.double()
        return product * (self.scaling / self.group_size)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base's zero points; codes and scales stay untouched.

        The new zeros are computed in float64 and rounded once to the storage dtype (the
        only deviation from the unmerged layer). The previous zeros are kept, so
        :meth:`unmerge` restores them bit for bit.

        The merged flag is not part of the state dict: a merged layer's ``weight`` already
        holds the adapter, so export it without ``lora_*`` (or load it with ``B = 0``).
        """
        if self.merged:
            raise UserValueError("the adapter is already merged")
        delta = self.zero_point_delta()
        if not bool(torch.isfinite(delta).all()):
            raise UserValueError(
                "the adapter holds NaN or infinite values and cannot be merged into the int4 "
                "zero points; train again (lower optimizer.lr or set clip_grad_norm) or use an "
                "earlier checkpoint's adapter"
            )
        self._premerge_zeros = stored_zero_points(self.weight).clone()
        shift_zero_points_(self.weight, delta)
        self.merged = True

    @torch.no_grad()
    def merge_rounding(
        self,
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]]:
        """What the merge changed beyond the adapter: the error of the merged weight, per
        (row, group), in weight units.

        Codes and scales are untouched, so every weight of group ``g`` in row ``n`` is off
        from the dequantized base plus the scaled adapter ``(alpha/r)(B A)/G`` by the same
        amount: the rounding of the new zero point to its storage dtype (for an intx base,
        of its integer-domain zero point, times the scale).

        Returns:
            Tuple, or None for a layer not merged in this process (no previous zero
            points): ``error`` (merged minus exact dequantized value), ``exact`` (the exact
            new zero point ``z + delta``), ``delta`` (the adapter's shift), all
            ``(out_dim, n_groups)`` float64, and the zero points' storage dtype.
        """
        if not self.merged or self._premerge_zeros is None:
            return None
        delta = self.zero_point_delta()
        stored = stored_zero_points(self.weight)
        before = self._premerge_zeros.double()
        if is_intx_weight(self.weight):  # w = (c - zp) s, so z = -zp s
            scale = self.weight.scale.double()
            exact_zp = before - delta / scale
            error = (exact_zp - stored.double()) * scale
            exact = -exact_zp * scale
        else:
            exact = before + delta
            error = stored.double() - exact
        return error, exact, delta, stored.dtype

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the zero points.

        Restores the zeros saved by :meth:`merge` exactly; a layer loaded already merged
        has none saved, and gets ``z - delta`` rounded once to the storage dtype.
        """
        if not self.merged:
            raise UserValueError("the adapter is not merged")
        if self._premerge_zeros is not None:
            stored_zero_points(self.weight).copy_(self._premerge_zeros)
        else:
            shift_zero_points_(self.weight, -self.zero_point_delta())
        self._premerge_zeros = None
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, "
            f"pooling={self.pooling}, merged={self.merged}"
        )


def _adapter_kwargs(rank: Optional[int], alpha: Optional[float]):
    """The adapter keywords given (a ``config=`` carries them otherwise)."""
    return {k: v for k, v in (("rank", rank), ("alpha", alpha)) if v is not None}
