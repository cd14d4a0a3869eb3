"""What outputs record about how they were made: the model without adapters, versions."""

from importlib.metadata import version
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

__all__ = ["model_spec_without_adapters", "package_versions"]

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
