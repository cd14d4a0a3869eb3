"""A calibrated (GPTQ) base in a recipe: the ``calibration:`` settings and the calibration run.

``qalora_finetune`` calibrates the base it trains on; ``qalora_eval`` calibrates it again,
from the settings the adapter recorded, to evaluate the int-b base or the unmerged adapter.
"""

import json
import time
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import utils

from qalora_tune.errors import UserValueError
from qalora_tune.modules import QuantizedLinear
from qalora_tune.quantization import CALIBRATED_QUANTIZERS, calibrate_gptq
from qalora_tune.quantization.gptq_calibration import (
    load_quantized_base,
    sample_calibration_sequences,
)
from qalora_tune.recipe_utils._full_precision import load_full_precision

__all__ = [
    "CALIBRATION_CONFIG_KEYS",
    "CALIBRATION_DEFAULTS",
    "calibrate_base",
    "calibration_settings",
]

# the recipes' logger; every rank runs the same steps, so log once
_info = partial(utils.log_rank_zero, utils.get_logger("INFO"))

CALIBRATION_DEFAULTS = {
    "num_samples": 128,
    "max_seq_len": None,
    "damp": 0.01,
    "block_size": 128,
    "batch_size": 8,
    "seed": 0,
}
"""Values of the ``calibration:`` keys a config leaves out."""

CALIBRATION_CONFIG_KEYS = ("calibration", "calibration.dataset") + tuple(
    f"calibration.{key}" for key in CALIBRATION_DEFAULTS
)
"""The ``calibration:`` keys a recipe reads (for its config key check)."""


def calibration_settings(
    cfg: DictConfig, default_dataset: Optional[Any] = None
) -> Optional[Dict[str, Any]]:
    """The ``calibration:`` settings, defaults filled in, when ``model.quantizer`` needs
    calibration; else None (a ``calibration:`` section is then ignored, so a config can
    keep one for switching quantizers).

    Args:
        cfg (DictConfig): the recipe config (``model.quantizer``, ``calibration``).
        default_dataset (Any, optional): the dataset config to calibrate on when
            ``calibration.dataset`` is unset (the finetune recipe's training data).

    Returns:
        Optional[Dict[str, Any]]: JSON-ready settings (they are recorded with the adapter).

    Raises:
        ValueError: for a missing section or dataset, or a bad ``damp`` / ``block_size``.
    """
    quantizer = cfg.model.get("quantizer", "rtn")
    if quantizer not in CALIBRATED_QUANTIZERS:
        if cfg.get("calibration") is not None:
            _info(f"model.quantizer={quantizer}: the calibration: section is not used")
        return None
    section = cfg.get("calibration")
    if section is None:
        raise UserValueError(
            f"model.quantizer={quantizer} needs a calibration: section (calibration.dataset, "
            "calibration.num_samples, ...) to calibrate the base on; add one as in the "
            "tinystories656K_qalora config, or set model.quantizer=rtn or hqq"
        )
    settings = dict(CALIBRATION_DEFAULTS, **OmegaConf.to_container(section, resolve=True))
    if settings.get("dataset") is None:
        if default_dataset is None:
            raise UserValueError(
                f"model.quantizer={quantizer}: set calibration.dataset to the data the base "
                "was calibrated on"
            )
        settings["dataset"] = (
            OmegaConf.to_container(default_dataset, resolve=True)
            if OmegaConf.is_config(default_dataset)
            else default_dataset
        )
    damp, block_size = settings["damp"], settings["block_size"]
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or damp < 0:
        raise UserValueError(f"calibration.damp must be a number >= 0, got {damp!r}; e.g. 0.01")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise UserValueError(f"calibration.block_size must be a positive integer, got {block_size!r}")
    return json.loads(json.dumps(settings, sort_keys=True))


def calibrate_base(
    model: nn.Module,
    component: str,
    checkpointer: Any,
    settings: Dict[str, Any],
    build_dataset: Callable[[Any], torch.utils.data.Dataset],
    device: torch.device,
    dtype: torch.dtype,
) -> Dict[str, Any]:
    """Quantize the full-precision base with sequential GPTQ and load it into ``model``.

    The full-precision twin of ``component`` is resident during calibration (see
    :mod:`qalora_tune.quantization.gptq_calibration`); adapters are left untouched.

    Args:
        model (nn.Module): the QA-LoRA model, its bits and group size read off its layers.
        component (str): ``model._component_`` (a builder with ``full_precision``).
        checkpointer (Any): the run's :class:`~qalora_tune.checkpointing.QALoRACheckpointer`.
        settings (Dict[str, Any]): from :func:`calibration_settings`.
        build_dataset (Callable[[Any], Dataset]): builds ``settings["dataset"]``.
        device (torch.device): where to calibrate.
        dtype (torch.dtype): the model's dtype.

    Returns:
        Dict[str, Any]: the base's Hugging Face config (what ``load_base`` returns).
    """
    start = time.perf_counter()
    dataset = build_dataset(OmegaConf.create(settings["dataset"]))
    sequences = sample_calibration_sequences(
        dataset, settings["num_samples"], settings["max_seq_len"], settings["seed"]
    )
    full_precision, hf_config = load_full_precision(
        component, checkpointer, device, dtype, otherwise="set model.quantizer=rtn or hqq"
    )
    base = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    state = calibrate_gptq(
        full_precision,
        sequences,
        group_size=base.group_size,
        bits=base.bits,
        damp=settings["damp"],
        block_size=settings["block_size"],
        batch_size=settings["batch_size"],
        dtype=dtype,
    )
    del full_precision
    load_quantized_base(model, state)
    tokens = sum(s.numel() for s in sequences)
    _info(
        f"GPTQ base calibrated on {len(sequences)} sequences ({tokens:,} tokens) in "
        f"{time.perf_counter() - start:.1f}s"
    )
    return hf_config
