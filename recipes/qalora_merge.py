"""Offline merge: base checkpoint + QA-LoRA adapter -> ``merged_int4/``.

    tune run qalora_merge --config tiny_qalora adapter_dir=/tmp/qalora-tune/tiny_qalora/epoch_0/adapter
    tune run qalora_merge --config my_run.yaml adapter_dir=... merged_dir=/models/my_int4
    tune run qalora_merge --config my_run.yaml adapter_dir=... merged_format=zero_table \
        merged_dir=/tasks/my_task base_dir=/models/base_int4     # a task package (zero points)

Use the config the adapter was trained with: its ``model`` and ``checkpointer`` sections
rebuild the same int4 base (quantized the same way), the adapter is loaded bit for bit and
folded into the int4 zero points, and the result is written atomically in transformers'
TorchAoConfig layout with a ``merge_report.json`` measured on a probe batch (the first
``merge_probe_size`` examples of ``validation.dataset``, else of ``dataset``; none when
``merge_probe_size=0``). An adapter whose group size, bits, rank, alpha, targets or base
checkpoint do not match is refused with a message naming the mismatch. A GPTQ base
(``model.quantizer=gptq``) is refused: it depends on its calibration run, so use the
``merged_int4/`` its training run wrote.
"""

import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import training, utils

from qalora_tune._compat import get_component_from_path
from qalora_tune.checkpointing import (
    choose_merged_format,
    atomic_directory,
    check_adapter_before_use,
    clean_module_name,
    load_adapter_into,
    read_adapter,
    recover_interrupted_writes,
)
from qalora_tune.errors import UserValueError
from qalora_tune.export import gguf_finisher
from qalora_tune.modules import QALoRALinear
from qalora_tune.quantization import CALIBRATED_QUANTIZERS
from qalora_tune.recipe_utils import (
    MERGE_KEYS,
    MERGE_SETTINGS,
    OutputDirLock,
    Problems,
    check_config,
    check_device,
    check_merge_target,
    check_output_dir,
    check_settings,
    instantiate_section,
    merge_weight_error,
    merge_with_report,
    model_spec_without_adapters,
    resolve_dtype,
    run_recipe,
    summarize_report,
)
from qalora_tune.tasks.merge_output import zero_table_output

log = utils.get_logger("INFO")

IGNORE_INDEX = -100

CONFIG_KEYS = MERGE_KEYS  # a training config plus the adapter to merge


class QALoRAMergeRecipe:
    """Merge a saved adapter into its int4 base and write ``merged_int4/``.

    Args:
        cfg (DictConfig): a training config plus ``adapter_dir`` (and optionally
            ``merged_dir``, default: ``merged_int4`` beside the adapter directory).

    Raises:
        ValueError: for a missing ``adapter_dir``, CUDA asked for without one, or an
            adapter that does not match.
        PermissionError: if the directory ``merged_dir`` goes into is not writable.
    """

    def __init__(self, cfg: DictConfig) -> None:
        problems = Problems()
        problems.extend(check_settings(cfg, MERGE_SETTINGS))
        problems.raise_if_any()
        self._adapter_dir = Path(cfg.adapter_dir).expanduser()
        # merged_format=zero_table: a task package (qalora_tune.tasks) instead of a model
        self._zero_table = problems.check(zero_table_output, cfg, self._adapter_dir)
        default_name = self._zero_table.default_dir_name if self._zero_table else "merged_int4"
        default_merged = self._adapter_dir.parent / default_name
        self._merged_dir = Path(cfg.get("merged_dir") or default_merged).expanduser()
        problems.check(check_device, cfg.device)
        problems.check(resolve_dtype, cfg.dtype, torch.device("cpu"))
        if not self._adapter_dir.is_dir():
            problems.add(
                f"adapter_dir={self._adapter_dir} does not exist; set it to the adapter/ "
                "directory of a training run, e.g. /tmp/qalora-tune/tiny_qalora/epoch_0/adapter"
            )
        problems.add(check_merge_target(self._merged_dir, {
            "adapter_dir": self._adapter_dir,
            "checkpointer.checkpoint_dir": cfg.checkpointer.checkpoint_dir,
        }))
        problems.check(check_output_dir, self._merged_dir.parent, "merged_dir")
        if self._zero_table is not None:
            problems.add(self._zero_table.base_dir_problem({
                "adapter_dir": self._adapter_dir,
                "checkpointer.checkpoint_dir": cfg.checkpointer.checkpoint_dir,
                "merged_dir": self._merged_dir,
            }))
        problems.raise_if_any()
        self._device = utils.get_device(device=cfg.device)
        self._dtype = resolve_dtype(cfg.dtype, self._device)
        self._probe_size = cfg.get("merge_probe_size", 8)
        self._merged_format = cfg.get("merged_format", "auto")
        self._finish_merged = gguf_finisher(self._merged_format, cfg.get("tokenizer"))
        # one merge into merged_dir at a time; the lock lives beside it
        self._lock = OutputDirLock(
            self._merged_dir.parent, "qalora_merge", "merged_dir",
            lock_name=f".{self._merged_dir.name}.lock",
        ).acquire()
        for line in recover_interrupted_writes(self._merged_dir.parent):
            if self._merged_dir.name in line:
                log.info(f"merged_dir: {line}")

    def setup(self, cfg: DictConfig) -> None:
        """Prepare the base (if the config does), check the adapter against it, build the
        model and load the adapter."""
        if cfg.get("prepare_base") is not None:
            instantiate_section(cfg.prepare_base, "prepare_base")
        self._checkpointer = instantiate_section(
            cfg.checkpointer, "checkpointer", output_dir=cfg.output_dir
        )
        self._checkpointer.check_base_available()
        adapter, self._metadata = read_adapter(self._adapter_dir, self._checkpointer.key_map)
        _refuse_calibrated_base(self._metadata.quantizer, cfg.model.get("quantizer"))
        # the adapter's own tensors and recorded base, before the slow part
        check_adapter_before_use(
            adapter, self._metadata, self._adapter_dir, self._checkpointer.base_fingerprint()
        )
        self._model_spec = model_spec_without_adapters(cfg.model)
        self._model = self._setup_model(cfg.model)
        file_format = self._zero_table.base_format if self._zero_table else self._merged_format
        choose_merged_format(file_format, self._model, self._device)  # refuse before merging
        self._check_and_load(adapter)
        self._probe = self._setup_probe(cfg) if self._probe_size > 0 else None

    def _setup_model(self, cfg_model: DictConfig) -> nn.Module:
        with training.set_default_dtype(self._dtype), self._device:
            model = instantiate_section(cfg_model, "model")
        self._checkpointer.load_base(model)
        self._pad_in_dim = bool(cfg_model.get("pad_in_dim", False))
        self._layers = {
            clean_module_name(n): m for n, m in model.named_modules() if isinstance(m, QALoRALinear)
        }
        return model.eval()

    def _check_and_load(self, adapter: Dict[str, torch.Tensor]) -> None:
        load_adapter_into(
            self._layers,
            adapter,
            self._metadata,
            self._adapter_dir,
            self._checkpointer.base_fingerprint(),
            self._pad_in_dim,
        )

    def _setup_probe(self, cfg: DictConfig) -> Optional[Dict[str, torch.Tensor]]:
        cfg_dataset = cfg.validation.dataset if cfg.get("validation") else cfg.get("dataset")
        if cfg_dataset is None:
            return None
        tokenizer = instantiate_section(cfg.tokenizer, "tokenizer")
        dataset = instantiate_section(cfg_dataset, "dataset", tokenizer)
        collate = partial(
            get_component_from_path("torchtune.data.padded_collate_sft"),
            padding_idx=tokenizer.pad_id,
            ignore_idx=IGNORE_INDEX,
        )
        return collate([dataset[i] for i in range(min(self._probe_size, len(dataset)))])

    def merge(self) -> Path:
        """Merge, measure and write ``merged_dir`` atomically; return its path."""
        start = time.perf_counter()
        metadata = replace(self._metadata, model=self._model_spec)  # the model as configured here
        if self._zero_table is not None:  # the task-free base, before the adapters go in
            done = self._zero_table.write_base(
                self._model, self._layers.values(), self._checkpointer, metadata
            )
            if done:
                log.info(done)
        if self._probe is not None:
            report = merge_with_report(self._model, self._layers.values(), self._probe, self._device)
        else:
            for layer in self._layers.values():
                layer.merge()
            report = {
                "merge_weight_error": merge_weight_error(self._layers.values(), list(self._layers)),
                "note": "merge_probe_size=0: no probe batch, logit deviation not measured",
            }
        report["adapter_dir"] = str(self._adapter_dir)
        if self._zero_table is not None:  # a task package instead of a model
            report = self._zero_table.write_task(
                self._model, self._merged_dir, self._checkpointer, report, self._adapter_dir
            )
        else:
            with atomic_directory(self._merged_dir, setting="merged_dir") as staging:
                report = self._checkpointer.write_merged(
                    staging, self._model, metadata, report, self._merged_format
                )
                if self._finish_merged is not None:
                    self._finish_merged(staging)
        size = report["size"]
        log.info(
            f"Merged {len(self._layers)} adapters into {self._merged_dir} in "
            f"{time.perf_counter() - start:.1f}s: {size['bits_per_quantized_parameter']:.2f} "
            f"bits per quantized weight, {size['shards']} file(s); {summarize_report(report)}"
        )
        print(json.dumps({k: v for k, v in report.items() if k != "definition"}, indent=2))
        return self._merged_dir


def _refuse_calibrated_base(*quantizers: Optional[str]) -> None:
    """A GPTQ base depends on its calibration run (data, order, floating-point sums), so
    this recipe does not rebuild it; the training run's own ``merged_int4/`` is the merge.

    Raises:
        ValueError: if the adapter or the config names a calibrated quantizer.
    """
    for quantizer in quantizers:
        if quantizer in CALIBRATED_QUANTIZERS:
            raise UserValueError(
                f"qalora_merge does not rebuild a model.quantizer={quantizer} base (its "
                "calibration is not reproduced bit for bit here); use the merged_int4/ that "
                "the training run wrote beside the adapter (save_merged_int4=True, the "
                "default), or train with model.quantizer=rtn or hqq to merge offline"
            )


def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run qalora_merge --config NAME_OR_PATH adapter_dir=... [key=value ...]``."""
    check_config(cfg, CONFIG_KEYS, "qalora_merge")
    recipe = QALoRAMergeRecipe(cfg)
    recipe.setup(cfg)
    recipe.merge()


def main(argv: Optional[List[str]] = None) -> None:
    """Parse the command line (a packaged config name or a path), then run the recipe."""
    run_recipe("qalora_merge", recipe_main, argv)


if __name__ == "__main__":
    main()
