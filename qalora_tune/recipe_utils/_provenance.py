"""What outputs record about how they were made: the model without adapters, versions."""

from importlib.metadata import version
from typing import Any, Dict, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from qalora_tune.checkpointing import AdapterConfig

__all__ = ["adapter_config_for", "model_spec_without_adapters", "package_versions"]

_ADAPTER_KNOBS = ("lora_rank", "lora_alpha", "lora_dropout")


def model_spec_without_adapters(cfg_model: DictConfig) -> Dict[str, Any]:
    """The ``model`` section's builder and arguments, adapters removed: what rebuilds the
    same quantized model (``merged_int4/qalora_tune.json``, the adapter's config). Always
    taken from the run's own config, never from a file it read."""
    spec = dict(OmegaConf.to_container(cfg_model, resolve=True))
    spec.update(lora_attn_modules=[], apply_lora_to_mlp=False, apply_lora_to_output=False)
    for key in _ADAPTER_KNOBS:
        spec.pop(key, None)
    return spec


def package_versions() -> Dict[str, str]:
    """Versions of qalora-tune and the packages its numbers depend on."""
    import torch

    from qalora_tune._version import __version__

    return {
        "qalora_tune": __version__,
        "torch": torch.__version__,
        "torchao": version("torchao"),
        "torchtune": version("torchtune"),
    }


def adapter_config_for(
    layers: Mapping[str, Any],
    cfg_model: DictConfig,
    checkpointer: Any,
    dtype: torch.dtype,
    calibration: Optional[Dict[str, Any]],
) -> AdapterConfig:
    """What ``adapter_config.json`` records for a run's adapters: their knobs (one
    ``QALoRAConfig`` shared by every layer), targets, the model that rebuilds the base,
    the base's identity and the package versions.

    Args:
        layers (Mapping[str, Any]): the QA-LoRA layers by module name.
        cfg_model (DictConfig): the ``model`` section.
        checkpointer (Any): the run's checkpointer (model type, base directory, fingerprint).
        dtype (torch.dtype): the training dtype.
        calibration (Dict[str, Any], optional): the GPTQ calibration settings, if any.
    """
    knobs = next(iter(layers.values())).config
    return AdapterConfig(
        rank=knobs.rank,
        alpha=knobs.alpha,
        group_size=knobs.group_size,
        bits=knobs.bits,
        quantizer=knobs.quantizer,
        pad_in_dim=knobs.pad_in_dim,
        double_quant_scales=knobs.double_quant_scales,
        lora_dropout=knobs.dropout,
        pooling=knobs.pooling,
        target_modules=sorted(layers),
        model=model_spec_without_adapters(cfg_model),
        model_type=checkpointer.model_type,
        checkpoint_format=checkpointer.checkpoint_format,
        dtype=str(dtype).removeprefix("torch."),
        base_checkpoint_dir=str(checkpointer.checkpoint_dir),
        base_fingerprint=checkpointer.base_fingerprint(),
        calibration=calibration,
        versions=package_versions(),
    )
