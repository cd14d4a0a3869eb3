"""How a merged QA-LoRA model is stored: the one place that chooses the format.

Today a merged linear leaves as torchao's plain-layout ``Int4Tensor`` (2 to 4-bit bases on
the int4 kernels: codes two per byte, a scale and a merged zero point per group) or, for
bases the int4 kernels cannot hold (8-bit codes, other group sizes), as torchao's
``IntxUnpackedToInt8Tensor``; ``config.json`` carries the matching transformers
``TorchAoConfig``. Writing (:func:`portable_weight`, :func:`storage_format`) and
reading back into this device's kernel layout (:func:`kernel_weight`) both live here, so a
later change of format touches this module only.
"""

from typing import Any, Dict, Tuple

import torch

from qalora_tune._compat import (
    Int4OpaqueTensor,
    Int4WeightOnlyConfig,
    IntxWeightOnlyConfig,
    MappingType,
    PerGroup,
    config_to_dict,
)
from qalora_tune.modules import Int4Linear
from qalora_tune.quantization import (
    GroupQuantizedWeight,
    cpu_int4_to_plain_int4,
    from_plain_int4,
    from_torchao_base,
    is_intx_weight,
    is_plain_int4,
    plain_int4_bytes,
    plain_int4_to_cpu_int4,
    reorder_intx_rows,
    to_plain_int4,
    to_torchao_base,
    uses_int4_kernel,
    with_dense_scales,
)

__all__ = [
    "is_portable_weight",
    "kernel_weight",
    "portable_nbytes",
    "portable_weight",
    "storage_format",
    "torchao_quantization_config",
]


def torchao_quantization_config(group_size: int, bits: int = 4) -> Dict[str, Any]:
    """``config.json``'s ``quantization_config``: transformers' ``TorchAoConfig.to_dict()``
    for ``Int4WeightOnlyConfig(group_size)`` in torchao's plain int4 packing, or, for a
    base off the int4 kernels, ``IntxWeightOnlyConfig`` (asymmetric, per group)."""
    if uses_int4_kernel(bits, group_size):
        config = Int4WeightOnlyConfig(group_size=group_size)
    else:
        config = IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"),
            granularity=PerGroup(group_size),
            mapping_type=MappingType.ASYMMETRIC,
        )
    return {
        "quant_method": "torchao",
        "quant_type": {"default": config_to_dict(config)},
        "modules_to_not_convert": None,
        "include_input_output_embeddings": False,
        "untie_embedding_weights": False,
    }


def is_portable_weight(value: torch.Tensor) -> bool:
    """Whether ``value`` (written or read back) is a merged linear weight."""
    return is_plain_int4(value) or is_intx_weight(value)


def storage_format(value: torch.Tensor) -> Tuple[int, int]:
    """(group size, bits) that the file's ``quantization_config`` names for ``value``
    (pass it to :func:`torchao_quantization_config`)."""
    group_size = int(value.block_size[-1])
    if is_plain_int4(value):
        return group_size, 4
    return group_size, int(str(value.target_dtype).removeprefix("torch.int"))


def portable_nbytes(value: torch.Tensor) -> int:
    """Bytes a written weight takes: codes, scales and zero points."""
    if is_plain_int4(value):
        return plain_int4_bytes(value)
    return sum(t.numel() * t.element_size() for t in (value.qdata, value.scale, value.zero_point))


def _permute_rows(gq: GroupQuantizedWeight, rows: torch.Tensor) -> GroupQuantizedWeight:
    return GroupQuantizedWeight(
        qdata=gq.qdata[rows], scale=gq.scale[rows], zero=gq.zero[rows],
        group_size=gq.group_size, bits=gq.bits,
    )


def portable_weight(module: Int4Linear, rows: torch.Tensor) -> torch.Tensor:
    """The layer's weight as written, rows in Hugging Face order, on the CPU: a plain
    ``Int4Tensor`` for int4 bases, an ``IntxUnpackedToInt8Tensor`` (zero points copied bit
    for bit) for intx ones.

    Raises:
        ValueError: for a padded intx base, which has no transformers layout.
    """
    if not is_intx_weight(module.weight):
        weight = with_dense_scales(module.weight)
        if isinstance(weight, Int4OpaqueTensor):  # the same bits, a block of rows at a time
            return cpu_int4_to_plain_int4(weight, rows.cpu(), in_features=module.in_dim)
        gq = from_torchao_base(weight)
        gq = GroupQuantizedWeight(
            gq.qdata.cpu(), gq.scale.cpu(), gq.zero.cpu(), gq.group_size, gq.bits
        )
        return to_plain_int4(_permute_rows(gq, rows), in_features=module.in_dim)
    if module.padded_in_dim != module.in_dim:
        raise ValueError(
            f"a padded intx base ({module.in_dim} inputs in groups of {module.group_size}) "
            "has no transformers layout; set model.group_size to a divisor of every "
            "linear's in_dim instead of model.pad_in_dim=True"
        )
    return reorder_intx_rows(module.weight, rows, device="cpu")


def kernel_weight(
    value: torch.Tensor,
    module: Int4Linear,
    rows: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A written weight in ``module``'s layout on ``device``: rows in torchtune order
    (``rows``), the int4 kernel's packing or the intx base, scales in ``dtype``."""
    if is_intx_weight(value):
        return reorder_intx_rows(value, rows, device=device, dtype=dtype)
    if device.type == "cpu":  # the same bits, without whole-weight temporaries
        return plain_int4_to_cpu_int4(value, dtype, rows, module.padded_in_dim)
    gq = _permute_rows(from_plain_int4(value, module.padded_in_dim), rows)
    return to_torchao_base(gq, device=device, dtype=dtype)
