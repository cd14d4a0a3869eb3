"""Component builder: turn a torchtune decoder into a QA-LoRA decoder with an int4 base."""

import warnings
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn
from torchtune.modules import TiedLinear

from qalora_tune._memory import lazy_zeros
from qalora_tune.errors import UserValueError
from qalora_tune.models._knobs import check_group_size_fits, check_num_layers
from qalora_tune.modules import FoldedTiedLinear, QALoRAConfig, QALoRALinear, QuantizedLinear
from qalora_tune.quantization.base_weight import zero_base

__all__ = [
    "ATTENTION_PROJECTIONS",
    "MLP_PROJECTIONS",
    "base_bits_per_weight",
    "count_parameters",
    "materialize",
    "qalora_transformer",
    "swap_linears",
    "tensor_nbytes",
]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "output_proj")
MLP_PROJECTIONS = ("w1", "w2", "w3")


def qalora_transformer(
    base_decoder: Callable[[], nn.Module],
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    group_size: int = 64,
    quantizer: str = "rtn",
    pad_in_dim: bool = False,
    bits: int = 4,
    double_quant_scales: bool = False,
    num_layers: Optional[int] = None,
) -> nn.Module:
    """Build a torchtune decoder whose linears are int4, with QA-LoRA adapters on some.

    ``base_decoder`` (any torchtune model builder, e.g. ``torchtune.models.llama2.llama2_7b``)
    is built on the ``meta`` device, so its full-precision weights are never allocated.
    Every ``nn.Linear`` is then replaced by a :class:`QALoRALinear` when it is a target,
    else by a frozen :class:`QuantizedLinear`, created on the current default device (the
    recipe sets it) with an all-zero base: the model is built to be loaded, so no
    placeholder is drawn or quantized. The adapters are initialised (``A`` random, ``B``
    zero); the remaining parameters and buffers are created on the device in the default
    dtype: embeddings zero (placeholders too), norms and RoPE caches initialised. Weights
    loaded afterwards through ``load_state_dict`` are quantized one layer at a time.

    Args:
        base_decoder (Callable[[], nn.Module]): builds the full-precision decoder.
        lora_attn_modules (List[str]): attention projections that get an adapter, from
            ``q_proj``, ``k_proj``, ``v_proj`` and ``output_proj``.
        apply_lora_to_mlp (bool): adapters on the feed-forward ``w1``, ``w2``, ``w3``.
        apply_lora_to_output (bool): an adapter on the final projection (not possible when
            it is tied to the token embeddings).
        lora_rank (int): adapter rank; useful up to ``in_dim // group_size``.
        lora_alpha (float): adapter scaling numerator (the update is scaled by alpha/rank).
        lora_dropout (float): dropout on the adapters' input.
        group_size (int): quantization group size, shared by the base and the adapters'
            pooling: 32, 64, 128 or 256.
        quantizer (str): base quantizer, ``"rtn"``, ``"hqq"`` or ``"gptq"``. RTN and HQQ
            quantize full-precision weights as they load; a ``"gptq"`` base needs
            calibration data, so its layers accept only int4 weights (from
            :func:`~qalora_tune.quantization.calibrate_gptq`, or a merged checkpoint) and
            refuse full-precision ones with a message saying so.
        pad_in_dim (bool): zero-pad linears whose ``in_dim`` ``group_size`` does not
            divide (the merge stays exact); off, such a linear is an error.
        bits (int): bit width of the base's quantization grid: QA-LoRA defines 2, 3, 4
            and 8; this version implements 2, 3 and 4 (stored and computed in the int4
            layout, see :class:`QuantizedLinear`).
        double_quant_scales (bool): store the int4 base's per-group scales as 8-bit codes
            with a float32 grid per row (double quantization): ``(b_s - 8) / group_size``
            fewer bits per weight for ``b_s``-bit scales (16 in bf16), zero points kept in
            full precision so the merge stays exact. Int4 kernel bases only.
        num_layers (int, optional): keep only the first ``num_layers`` decoder layers (the
            real widths at a smaller depth, e.g. to check a config's shapes quickly); the
            checkpoint must then hold that many layers. Default: all of them.

    Returns:
        nn.Module: the decoder, on the default device, with only adapters trainable.

    Raises:
        ValueError: for an unknown attention module name, an adapter on a tied output,
            a bit width other than 2, 3 or 4, a rank or alpha that is not positive, a dropout
            outside ``[0, 1)``, or a group size that has no int4 kernel or does not fit a
            linear; each message names the ``model.*`` setting to change.
    """
    config = QALoRAConfig.from_builder_args(
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bits=bits,
        group_size=group_size,
        quantizer=quantizer,
        pad_in_dim=pad_in_dim,
        double_quant_scales=double_quant_scales,
    )
    unknown = sorted(set(lora_attn_modules) - set(ATTENTION_PROJECTIONS))
    if unknown:
        raise UserValueError(
            f"unknown lora_attn_modules {unknown}; set model.lora_attn_modules to a list from "
            f"{list(ATTENTION_PROJECTIONS)}"
        )
    device = torch.get_default_device()
    dtype = torch.get_default_dtype()
    with torch.device("meta"):
        model = base_decoder()
    if num_layers is not None:
        check_num_layers(num_layers, len(model.layers))
        model.layers = nn.ModuleList(list(model.layers)[:num_layers])
    check_group_size_fits(model, group_size, pad_in_dim)
    if isinstance(model.output, TiedLinear) and not isinstance(model.output, FoldedTiedLinear):
        model.output = FoldedTiedLinear(model.output.tied_module)  # see its docstring
    if apply_lora_to_output and not isinstance(getattr(model, "output", None), nn.Linear):
        raise UserValueError(
            "model.apply_lora_to_output=True, but this model's output projection is tied to "
            "its token embeddings (not a linear layer); set model.apply_lora_to_output=False"
        )
    targets = set(lora_attn_modules) | (set(MLP_PROJECTIONS) if apply_lora_to_mlp else set())
    if apply_lora_to_output:
        targets.add("output")
    # on meta first, then all-zero placeholders that cost no memory until loaded
    swap_linears(model, targets, config, torch.device("meta"), dtype)
    if double_quant_scales:
        _warn_where_eight_bit_scales_cost_bits(model, dtype)
    materialize(model, device, dtype)
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, QALoRALinear):
            module.lora_a.weight.requires_grad_(True)
            module.lora_b.weight.requires_grad_(True)
    return model


def swap_linears(
    model: nn.Module,
    targets: Iterable[str],
    config: QALoRAConfig,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model``: a :class:`QALoRALinear` where its name is
    in ``targets``, else a frozen :class:`QuantizedLinear`, all built from ``config``.

    A linear on the ``meta`` device is replaced by an empty layer on ``device`` (weights
    arrive later through ``load_state_dict``, quantized one layer at a time); a linear with
    weights is quantized from them (``from_linear``), keeping its device and dtype.

    Args:
        model (nn.Module): changed in place.
        targets (Iterable[str]): child names that get an adapter (``q_proj``, ``w1``, ...).
        config (QALoRAConfig): the base's quantization and the adapters.
        device (torch.device, optional): for meta linears; defaults to the default device.
        dtype (torch.dtype, optional): for meta linears; defaults to the default dtype.

    Returns:
        nn.Module: ``model``.

    Raises:
        UserValueError: naming the linear that cannot take ``config``.
    """
    targets = set(targets)
    device = device or torch.get_default_device()
    dtype = dtype or torch.get_default_dtype()
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            path = f"{parent_name}.{name}" if parent_name else name
            cls = QALoRALinear if name in targets else QuantizedLinear
            try:
                if child.weight.is_meta:
                    replacement = cls(
                        child.in_features, child.out_features, config,
                        use_bias=child.bias is not None, dtype=dtype, device=device,
                    )
                else:
                    replacement = cls.from_linear(child, config=config)
            except UserValueError as error:
                raise UserValueError(f"{path}: {error}") from None
            setattr(parent, name, replacement)
    return model


def _warn_where_eight_bit_scales_cost_bits(model: nn.Module, dtype: torch.dtype) -> None:
    """8-bit scales save ``(b_s - 8)`` bits per group and spend 64 per row (a float32 grid):
    a loss for rows of at most ``64 / (b_s - 8)`` groups. Say so once per model."""
    limit = 64 / (torch.finfo(dtype).bits - 8)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    losing = [m for m in layers if m.n_groups <= limit]
    if losing:
        warnings.warn(
            f"model.double_quant_scales=True makes {len(losing)} of {len(layers)} linears "
            f"larger, not smaller: with {dtype} scales, 8-bit codes pay off only above "
            f"{limit:.3g} groups per row (in_dim / group_size), and these have "
            f"{min(m.n_groups for m in losing)}; set model.double_quant_scales=False for "
            "this model or a smaller model.group_size",
            stacklevel=3,
        )


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Create on ``device`` what is still on ``meta`` in a model of these builders: int4
    layers get an all-zero base and initialised adapters, embeddings zeros, norms ones,
    RoPE caches are built. A loader that assigned its tensors to a model built on ``meta``
    calls it for what no file holds (the RoPE caches).

    Args:
        model (nn.Module): the model.
        device (torch.device): where to create the tensors.
        dtype (torch.dtype): dtype of the int4 bases' scales and of new parameters.
    """
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            _materialize_int4(module, device, dtype)
            continue
        tensors = list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        )
        if hasattr(module, "rope_init"):
            # a RoPE cache that waited for real memory: torchtune's Llama3ScaledRoPE on meta
            # registers no buffer at all (it returns before scaling), so it is built here
            # when it has no cache yet, or a cache on meta
            if getattr(module, "is_cache_built", True) and not any(t.is_meta for _, t in tensors):
                continue
            if tensors:
                module.to_empty(device=device, recurse=False)
            with torch.device(device):
                module.rope_init()
            continue
        if not any(t.is_meta for _, t in tensors):
            continue
        module.to_empty(device=device, recurse=False)
        if isinstance(module, nn.Embedding):
            # a placeholder like the linears': zeros that take memory only when written
            # (drawing 131M-545M normal values for a table the checkpoint replaces took
            # seconds, and held a second copy of it while it loaded)
            module.weight = nn.Parameter(
                lazy_zeros(module.weight.shape, module.weight.dtype, device),
                requires_grad=module.weight.requires_grad,
            )
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            for name, param in module.named_parameters(recurse=False):
                # norms scale by ones; anything else starts small until weights load
                if name == "scale" or name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02)


def _materialize_int4(module: QuantizedLinear, device: torch.device, dtype: torch.dtype) -> None:
    if not module.weight.is_meta:
        return
    base = zero_base(
        module.out_dim, module.padded_in_dim, module.group_size, module.bits, device, dtype,
        module.double_quant_scales,
    )
    module.weight = nn.Parameter(base, requires_grad=False)
    if module.bias is not None:
        module.bias = nn.Parameter(
            torch.zeros(module.out_dim, device=device, dtype=dtype), requires_grad=False
        )
    if isinstance(module, QALoRALinear):
        module.lora_a.to_empty(device=device)
        module.lora_b.to_empty(device=device)
        module.initialize_parameters()


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """Trainable (adapter) and frozen (base) parameter counts; an int4 weight counts its
    logical ``out_dim * in_dim`` elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}


def base_bits_per_weight(model: nn.Module) -> float:
    """Bits the quantized base stores per weight of its linears: codes, scales, zero points
    and padding, over the logical ``out_dim * in_dim`` weights (0.0 without any).

    For example 4.5 for int4 codes with bf16 scales and zeros at group size 64, about
    4.39 with 8-bit scales (``double_quant_scales``) when ``in_dim`` is 4096.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    weights = sum(m.out_dim * m.in_dim for m in layers)
    return 8 * sum(tensor_nbytes(m.weight) for m in layers) / weights if weights else 0.0


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass (torchao int4, NF4), those of its inner
    tensors (``__tensor_flatten__``), so packed codes and scales count, not logical size."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return sum(
            tensor_nbytes(inner)
            for inner in (getattr(data, name) for name in names)
            if inner is not None
        )
    return data.numel() * data.element_size()
