"""The fine-tuning recipe's preflight: every problem found before any weight is loaded."""

import torch
from omegaconf import DictConfig, OmegaConf

from qalora_tune.recipe_utils._calibration import calibration_settings
from qalora_tune.recipe_utils._instantiate import instantiate_section
from qalora_tune.recipe_utils._output_dir import check_run_dir
from qalora_tune.recipe_utils._preflight import (
    Problems,
    check_cuda_only_options,
    check_device,
    check_output_dir,
    component_file_problems,
    resolve_dtype,
)
from qalora_tune.recipe_utils._recipe_settings import FINETUNE_SETTINGS
from qalora_tune.recipe_utils._settings import check_settings

__all__ = ["finetune_preflight"]


def finetune_preflight(cfg: DictConfig) -> None:
    """Every problem that can be found without loading weights, reported together:
    settings of the wrong type or range, the device, dtype and CUDA-only options, the
    output directory (writable, not another run's unless resuming or overwriting),
    the base weights, the tokenizer and the data files."""
    problems = Problems()
    problems.extend(check_settings(cfg, FINETUNE_SETTINGS))
    if problems.messages:  # the checks below read these settings
        problems.raise_if_any()
    for section in ("model", "tokenizer", "checkpointer", "dataset", "optimizer", "loss"):
        if cfg.get(section) is None:
            problems.add(
                f"the config has no {section} section; add one (qalora-tune cp tiny_qalora "
                "my.yaml gives a complete config to start from)"
            )
    if cfg.get("model") is not None:
        problems.check(calibration_settings, cfg, cfg.get("dataset"))
    problems.raise_if_any()
    problems.check(check_device, cfg.device)
    device = torch.device("cpu" if not str(cfg.device).startswith("cuda") else "cuda")
    problems.check(resolve_dtype, cfg.dtype, torch.device("cpu"), ("fp32", "bf16"))
    problems.check(check_cuda_only_options, cfg, device)
    output_dir = problems.check(check_output_dir, cfg.output_dir)
    if output_dir is not None:
        problems.add(check_run_dir(
            output_dir, cfg.get("resume_from_checkpoint", False), cfg.get("overwrite", False)
        ))
    if cfg.get("resume_from_checkpoint", False) and cfg.get("overwrite", False):
        problems.add(
            "resume_from_checkpoint=True and overwrite=True contradict each other; set one "
            "of them to False"
        )
    if cfg.get("prepare_base") is None:  # a prepared base does not exist yet
        checkpointer = problems.check(
            instantiate_section, cfg.checkpointer, "checkpointer", output_dir=str(cfg.output_dir)
        )
        if checkpointer is not None:
            problems.check(checkpointer.check_base_available)
        problems.extend(component_file_problems(cfg.get("tokenizer"), "tokenizer"))
    datasets = cfg.get("dataset")
    entries = list(datasets) if OmegaConf.is_list(datasets) else [datasets]
    for index, entry in enumerate(entries):
        setting = "dataset" if len(entries) == 1 else f"dataset[{index}]"
        problems.extend(component_file_problems(entry, setting))
    validation = cfg.get("validation")
    if validation is not None:
        problems.extend(component_file_problems(validation.get("dataset"), "validation.dataset"))
    problems.raise_if_any()
