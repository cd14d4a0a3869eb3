"""QA-LoRA fine-tuning recipe for torchtune.

    tune run qalora_finetune --config tiny_qalora
    tune run qalora_finetune --config llama2_7B_qalora batch_size=8 model.lora_rank=16
    tune run --nproc_per_node 4 qalora_finetune --config llama2_70B_qalora

``--config`` takes a config shipped with qalora-tune (``qalora-tune configs``
lists them) or a path to a YAML file; ``key=value`` arguments override any entry.

The model is a torchtune decoder whose linears hold a torchao int4 base; the targeted ones
carry a group-pooled adapter (QALoRALinear). Only the adapters train. Every epoch writes
``{output_dir}/epoch_{k}/`` atomically: the adapter (PEFT layout), ``merged_int4/`` (the
adapters folded into the int4 zero points, in transformers' TorchAoConfig layout, with a
measured merge report) and the recipe state; the run ends with a summary of the
full-precision base, int4 base, QA-LoRA and the merged int4 model on the validation data.

Features, as in torchtune's LoRA recipe: gradient accumulation, activation checkpointing
and offloading, ``compile``, chunked cross-entropy, LR schedulers, any optimizer by
``_component_``, metric loggers and a progress bar, ``seed``, ``max_steps_per_epoch``,
fp32/bf16 on CPU or CUDA, data parallel over ``N`` processes, and an exact
``resume_from_checkpoint`` from the newest epoch or mid-epoch ``step_{n}/`` checkpoint
(``save_every_n_steps``).
"""

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtune import modules, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

from qalora_tune._memory import format_memory, memory_stats, peak_rss_bytes, reset_peak_rss
from qalora_tune.checkpointing import (
    RECIPE_STATE_NAME,
    AdapterConfig,
    adopt_pooling,
    atomic_write_text,
    check_resume_matches,
    choose_merged_format,
    recover_interrupted_writes,
)
from qalora_tune.errors import UserValueError
from qalora_tune.export import gguf_finisher
from qalora_tune.models import base_bits_per_weight, count_parameters
from qalora_tune.modules import QALoRALinear
from qalora_tune import recipe_utils

log = utils.get_logger("INFO")
_info = partial(utils.log_rank_zero, log)  # every rank runs the same steps: log once

CONFIG_KEYS = recipe_utils.FINETUNE_KEYS  # every top-level key the recipe reads


class QALoRAFinetuneRecipe(FTRecipeInterface):
    """Fine-tune QA-LoRA adapters on a frozen int4 base, on one device or data parallel.

    Under ``tune run --nproc_per_node N`` every rank holds the whole int4 base and its own
    copy of the adapters; each takes a ``1/N`` share of every global batch
    (``batch_size`` is per rank) and the adapter gradients and token counts are summed
    across ranks before each optimizer step, so the run follows the single-process run
    with ``N`` times the batch size (see ``docs/design.md`` for why not FSDP). Rank 0
    writes the outputs.

    Args:
        cfg (DictConfig): the parsed config (see ``configs/``).

    Raises:
        ValueError: for settings that cannot work together (named in the message).
    """

    def __init__(self, cfg: DictConfig) -> None:
        recipe_utils.finetune_preflight(cfg)
        self._device = utils.get_device(device=cfg.device)
        recipe_utils.init_distributed(cfg.device)
        self._world_size, self._rank = recipe_utils.world_size_and_rank()
        self._dtype = recipe_utils.resolve_dtype(cfg.dtype, self._device, allowed=("fp32", "bf16"))
        self._output_dir = Path(cfg.output_dir).expanduser()
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False)
        self._gradient_accumulation_steps = cfg.get("gradient_accumulation_steps", 1)
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._compile = cfg.get("compile", False)
        self._enable_activation_checkpointing = cfg.get("enable_activation_checkpointing", False)
        self._enable_activation_offloading = cfg.get("enable_activation_offloading", False)
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._overwrite = cfg.get("overwrite", False)
        self._save_merged_int4 = cfg.get("save_merged_int4", True)
        self._merged_format = cfg.get("merged_format", "auto")
        self._finish_merged = gguf_finisher(self._merged_format, cfg.get("tokenizer"))
        self._merge_probe_size = cfg.get("merge_probe_size", 8)
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        self._batch_size = cfg.batch_size
        self._shuffle = cfg.get("shuffle", True)
        self._calibration = recipe_utils.calibration_settings(
            cfg, default_dataset=cfg.get("dataset")
        )
        self._lock = recipe_utils.OutputDirLock(self._output_dir, "qalora_finetune")
        if recipe_utils.is_rank_zero():  # one writer: rank 0 holds the output directory
            self._lock.acquire()
            for line in recover_interrupted_writes(self._output_dir):
                log.info(f"output_dir: {line}")
        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.epochs_run = 0
        self.global_step = 0
        self._steps_done_in_epoch = 0  # > 0 after resuming from a step checkpoint
        self._resumed_dataloader_state: Optional[Dict[str, Any]] = None
        self._metrics: Dict[str, Dict[str, float]] = {}
        self._checkpointer = None
        recipe_utils.set_interrupt_note(self._interrupt_note)

    def _interrupt_note(self) -> str:
        """What Ctrl-C reports: where training stopped, the last checkpoint, how to resume."""
        latest = self._checkpointer.latest_checkpoint_dir() if self._checkpointer else None
        return recipe_utils.interrupt_note(
            latest, self.global_step, self.epochs_run, self.total_epochs
        )

    # ------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        """Build everything from the config, in dependency order."""
        if cfg.get("prepare_base") is not None:
            # the RNG streams stay as seeded whether the base is made now or reused
            with torch.random.fork_rng(devices=[]):
                prepare = lambda: recipe_utils.instantiate_section(cfg.prepare_base, "prepare_base")
                recipe_utils.run_on_rank_zero(prepare)
                if not recipe_utils.is_rank_zero():
                    prepare()  # reuses (checks) rank 0's base
        self._checkpointer = self._setup_checkpointer(cfg.checkpointer)
        self._checkpointer.run_config = OmegaConf.to_yaml(cfg, resolve=True)
        self._model_cfg = cfg.model
        self._tokenizer = recipe_utils.instantiate_section(cfg.tokenizer, "tokenizer")
        self._model = self._setup_model(cfg.model)
        choose_merged_format(self._merged_format, self._model, self._device)  # before training
        recipe_utils.check_tokenizer_fits(self._tokenizer, self._model)
        self._loss_fn = self._setup_loss(cfg.loss)
        self._optimizer = self._setup_optimizer(cfg.optimizer)
        self._dataloader = self._setup_data(cfg.dataset, self._batch_size, self._shuffle)
        self._steps_per_epoch = self._count_steps_per_epoch()
        self._lr_scheduler = self._setup_lr_scheduler(cfg.get("lr_scheduler"))
        self._val_dataloader, self._val_cfg = self._setup_validation(cfg.get("validation"))
        self._probe_batch = recipe_utils.probe_batch(
            (self._val_dataloader or self._dataloader).dataset, self._merge_probe_size,
            self._tokenizer.pad_id,
        )
        # fixed for the run: computed once (the base fingerprint reads the weight files)
        self._adapter_metadata = self._adapter_config()
        if self._resume_from_checkpoint:
            self._restore(self._checkpointer.load_resume_state())
        # identical adapters on every rank (each initialised its own from seed + rank)
        recipe_utils.broadcast_parameters(self._adapter_params.values())
        # last, so that a failed setup leaves the output directory as it was
        self._metric_logger = self._setup_metric_logger(cfg.metric_logger)
        if self._metric_logger is not None:
            self._metric_logger.log_config(cfg)
            _info(f"Config saved in {self._output_dir}; each checkpoint keeps its own config.yaml")

    def _setup_metric_logger(self, cfg_metric_logger: DictConfig) -> Optional[Any]:
        """The metric logger, on rank 0 only (the logged values are global)."""
        if not recipe_utils.is_rank_zero():
            return None
        return recipe_utils.instantiate_section(cfg_metric_logger, "metric_logger")

    def _setup_checkpointer(self, cfg_checkpointer: DictConfig) -> Any:
        checkpointer = recipe_utils.instantiate_section(
            cfg_checkpointer,
            "checkpointer",
            output_dir=str(self._output_dir),
            resume_from_checkpoint=self._resume_from_checkpoint,
        )
        checkpointer.check_base_available()
        checkpointer.key_map  # outputs use Hugging Face names: fail now, not at the first save
        return checkpointer

    def _setup_model(self, cfg_model: DictConfig) -> nn.Module:
        start = time.perf_counter()
        with training.set_default_dtype(self._dtype), self._device:
            model = recipe_utils.instantiate_section(cfg_model, "model")
        if self._calibration is not None:
            self._hf_config = recipe_utils.calibrate_base(
                model, cfg_model._component_, self._checkpointer, self._calibration,
                lambda cfg_dataset: recipe_utils.build_dataset(
                    cfg_dataset, self._tokenizer, "calibration.dataset"
                ),
                self._device, self._dtype,
            )
        else:
            self._hf_config = self._checkpointer.load_base(model)
        adapters = {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
        if not adapters:
            raise UserValueError(
                "the model has no QA-LoRA adapters; set model.lora_attn_modules, "
                "model.apply_lora_to_mlp or model.apply_lora_to_output"
            )
        self._adapter_modules = adapters
        self._adapter_params = {
            name: param for name, param in model.named_parameters() if param.requires_grad
        }
        if self._compile:
            training.compile_model(model)
        if self._enable_activation_checkpointing:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        self._activations_ctx = training.get_act_offloading_ctx_manager(
            model, self._enable_activation_offloading
        )
        counts = count_parameters(model)
        _info(
            f"Model ready in {time.perf_counter() - start:.1f}s: {len(adapters)} QA-LoRA "
            f"layers, {counts['trainable']:,} trainable and {counts['frozen']:,} frozen "
            f"parameters, dtype {self._dtype}, device {self._device}; the base stores "
            f"{base_bits_per_weight(model):.3f} bits per linear weight"
        )
        if self._log_peak_memory_stats:
            _info(format_memory(memory_stats(self._device)))
        return model

    def _setup_loss(self, cfg_loss: DictConfig) -> nn.Module:
        loss_fn = recipe_utils.instantiate_section(cfg_loss, "loss")
        if self._compile:
            loss_fn = training.compile_loss(loss_fn)
        if hasattr(loss_fn, "num_output_chunks"):
            self._model.set_num_output_chunks(loss_fn.num_output_chunks)
        return loss_fn

    def _setup_optimizer(self, cfg_optimizer: DictConfig) -> Optimizer:
        params = list(self._adapter_params.values())
        return recipe_utils.instantiate_section(cfg_optimizer, "optimizer", params)

    def _setup_data(self, cfg_dataset: Any, batch_size: int, shuffle: bool) -> StatefulDataLoader:
        """This rank's loader: every ``world_size``-th example of each epoch's order."""
        dataset = recipe_utils.build_dataset(cfg_dataset, self._tokenizer)
        return recipe_utils.training_loader(
            dataset, batch_size, self._world_size, self._rank, shuffle, self.seed,
            self._tokenizer.pad_id,
        )

    def _count_steps_per_epoch(self) -> int:
        steps = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None:
            steps = min(steps, self.max_steps_per_epoch)
        if steps < 1:
            raise UserValueError(
                "an epoch has no optimizer step: lower gradient_accumulation_steps or "
                "batch_size, or use more data"
            )
        return steps

    def _setup_lr_scheduler(self, cfg_lr_scheduler: Optional[DictConfig]) -> Optional[Any]:
        if cfg_lr_scheduler is None:
            return None
        return recipe_utils.instantiate_section(
            cfg_lr_scheduler,
            "lr_scheduler",
            self._optimizer,
            num_training_steps=self.total_epochs * self._steps_per_epoch,
        )

    def _setup_validation(self, cfg_validation: Optional[DictConfig]):
        """A loader over this rank's share of the validation examples (the first
        ``max_batches * batch_size``; all when ``max_batches`` is null)."""
        if cfg_validation is None:
            return None, None
        dataset = recipe_utils.build_dataset(
            cfg_validation.dataset, self._tokenizer, "validation.dataset"
        )
        loader = recipe_utils.validation_loader(
            dataset, cfg_validation.get("batch_size", 8), cfg_validation.get("max_batches"),
            self._world_size, self._rank, self.seed, self._tokenizer.pad_id,
        )
        return loader, cfg_validation

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self) -> Dict[str, float]:
        return recipe_utils.evaluate_lm(
            self._model, self._val_dataloader, self._device, sum_across_ranks=self._world_size > 1
        )

    def _evaluate_full_precision(self, cfg_model: DictConfig) -> Dict[str, float]:
        model, _ = recipe_utils.load_full_precision(
            cfg_model._component_, self._checkpointer, self._device, self._dtype,
            otherwise="set validation.full_precision_baseline=False",
        )
        metrics = recipe_utils.evaluate_lm(
            model, self._val_dataloader, self._device, sum_across_ranks=self._world_size > 1
        )
        del model
        return metrics

    def evaluate_baselines(self) -> None:
        """Validation metrics of the full-precision base (if asked) and the int4 base."""
        if self._val_dataloader is None:
            return
        if self._val_cfg.get("full_precision_baseline", False):
            self._metrics["full-precision base"] = self._evaluate_full_precision(self._model_cfg)
        with recipe_utils.adapters_disabled(self._adapter_modules.values()):
            self._metrics["int4 base"] = self._evaluate()
        for name, values in self._metrics.items():
            _info(f"{name}: {recipe_utils.format_metrics(values)}")

    # ------------------------------------------------------------------ training

    def _loss_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return recipe_utils.loss_step(self._model, self._loss_fn, batch, self._activations_ctx)

    def train(self) -> None:
        """Run the remaining epochs, saving adapter and recipe state after each (and every
        ``save_every_n_steps`` optimizer steps, when set)."""
        if self._overwrite and recipe_utils.is_rank_zero():
            removed = recipe_utils.remove_previous_run(self._output_dir)
            if removed:
                _info(f"overwrite=True: removed the previous run's {', '.join(removed)}")
        recipe_utils.barrier()
        if self._compile:
            _info("torch.compile is on: the first steps compile the model (slow)")
        self._model.train()
        for epoch in range(self.epochs_run, self.total_epochs):
            if self._log_peak_memory_stats:
                reset_peak_rss()  # the steps log the peak of training, not of loading
            self._dataloader.sampler.set_epoch(epoch)
            if self._resumed_dataloader_state is not None:  # mid-epoch: skip what was seen
                self._dataloader.load_state_dict(self._resumed_dataloader_state)
                self._resumed_dataloader_state = None
            steps_done = self._steps_done_in_epoch
            progress = tqdm(
                total=self._steps_per_epoch,
                initial=steps_done,
                disable=not (sys.stderr.isatty() and recipe_utils.is_rank_zero()),
            )
            running_loss, num_tokens, micro_batches = 0.0, 0, 0
            step_start = time.perf_counter()
            for batch in self._dataloader:
                utils.batch_to_device(batch, self._device)
                batch_tokens = (batch["labels"] != recipe_utils.IGNORE_INDEX).sum()
                loss = self._loss_step(batch) * batch_tokens
                running_loss += loss.detach()
                num_tokens += batch_tokens
                loss.backward()
                micro_batches += 1
                if micro_batches % self._gradient_accumulation_steps:
                    continue
                grad_norm, step_loss = self._optimizer_step(running_loss, num_tokens)
                self.global_step += 1
                steps_done += 1
                recipe_utils.check_finite_loss(step_loss, self.global_step, self._checkpointer)
                progress.update(1)
                progress.set_description(f"{epoch + 1}|{self.global_step}|Loss: {step_loss:.4f}")
                if self.global_step % self._log_every_n_steps == 0:
                    self._log_step(step_loss, num_tokens, step_start, grad_norm)
                running_loss, num_tokens, step_start = 0.0, 0, time.perf_counter()
                if steps_done >= self._steps_per_epoch:
                    break
                if self._save_every_n_steps and self.global_step % self._save_every_n_steps == 0:
                    self.save_step_checkpoint(epoch, steps_done)
            progress.close()
            self._steps_done_in_epoch = 0
            self.epochs_run += 1
            if self._val_dataloader is not None:
                metrics = self._evaluate()
                self._metrics["QA-LoRA"] = metrics
                if self._metric_logger is not None:
                    self._metric_logger.log_dict(
                        {f"val_{k}": v for k, v in metrics.items()}, step=self.global_step
                    )
                _info(f"epoch {epoch + 1} validation: {recipe_utils.format_metrics(metrics)}")
            self.save_checkpoint(epoch)

    def _optimizer_step(self, running_loss: torch.Tensor, num_tokens: torch.Tensor):
        """Sum gradients, loss and token counts over ranks, normalise by the global token
        count and step; returns the gradient norm (when clipping) and the step's loss."""
        return recipe_utils.optimizer_step(
            self._model, self._adapter_params.values(), self._optimizer, self._lr_scheduler,
            running_loss, num_tokens, self._clip_grad_norm,
        )

    def _log_step(self, loss: float, num_tokens, step_start: float, grad_norm) -> None:
        seconds = time.perf_counter() - step_start
        values = {
            "loss": loss,
            "lr": self._optimizer.param_groups[0]["lr"],
            "tokens_per_second_per_gpu": float(num_tokens) / max(seconds, 1e-9),
        }
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        if self._log_peak_memory_stats:  # CUDA's allocator peaks, and the process's RSS
            values.update(memory_stats(self._device))
        if self._metric_logger is not None:
            self._metric_logger.log_dict(values, step=self.global_step)

    # ------------------------------------------------------------------ checkpoints

    def _adapter_config(self) -> AdapterConfig:
        return recipe_utils.adapter_config_for(
            self._adapter_modules, self._model_cfg, self._checkpointer, self._dtype,
            self._calibration,
        )

    def _recipe_state(self, epoch: int, steps_done: int) -> Dict[str, Any]:
        """Everything an exact resume needs, gathered from every rank (call on all)."""
        progress = {
            "epoch": epoch,
            "epochs_run": self.epochs_run,
            "steps_done_in_epoch": steps_done,
            "global_step": self.global_step,
        }
        run = {
            "seed": self.seed,
            "total_epochs": self.total_epochs,
            "max_steps_per_epoch": self.max_steps_per_epoch,
        }
        return recipe_utils.recipe_state(
            progress, self._optimizer, self._lr_scheduler, run, self._data_order(),
            self._dataloader, self._device,
        )

    def save_step_checkpoint(self, epoch: int, steps_done: int) -> None:
        """Write ``step_{global_step}/`` (adapter and recipe state) in the middle of an epoch."""
        start = time.perf_counter()
        state = self._recipe_state(epoch, steps_done)
        path = recipe_utils.run_on_rank_zero(
            lambda: self._checkpointer.save_step_checkpoint(
                self.global_step, self._adapter_modules, self._adapter_metadata, state
            )
        )
        _info(f"Saved {path} in {time.perf_counter() - start:.1f}s")

    def save_checkpoint(self, epoch: int) -> None:
        """Write ``epoch_{epoch}/``: the adapter, the merged int4 model (unless
        ``save_merged_int4=False``) and the recipe state."""
        start = time.perf_counter()
        if self._log_peak_memory_stats:
            reset_peak_rss()  # the save's own peak, logged below
        state = self._recipe_state(epoch, 0)
        layers = self._adapter_modules
        if not self._save_merged_int4:
            path = recipe_utils.run_on_rank_zero(
                lambda: self._checkpointer.save_checkpoint(
                    epoch, layers, self._adapter_metadata, state
                )
            )
            _info(f"Saved {path} in {time.perf_counter() - start:.1f}s")
            return
        # every rank merges (a zero-point update), so that all can evaluate the merged model
        report = recipe_utils.merge_with_report(
            self._model, layers.values(), self._probe_batch, self._device
        )
        try:
            if epoch == self.total_epochs - 1 and self._val_dataloader is not None:
                self._metrics["QA-LoRA merged int4"] = self._evaluate()
            path = recipe_utils.run_on_rank_zero(
                lambda: self._checkpointer.save_checkpoint(
                    epoch, layers, self._adapter_metadata, state,
                    merged_model=self._model, merge_report=report,
                    merged_format=self._merged_format, finish_merged=self._finish_merged,
                )
            )
        finally:
            for layer in layers.values():
                layer.unmerge()  # restores the zeros bit for bit
        saved = f"Saved {path} in {time.perf_counter() - start:.1f}s"
        if self._log_peak_memory_stats:
            saved += f" (peak RSS of the merge and export {peak_rss_bytes() / 2**30:.2f} GiB)"
        _info(f"{saved}; {recipe_utils.summarize_report(report)}")

    def _restore(self, saved: Dict[str, Any]) -> None:
        # a checkpoint of earlier qalora-tune (mean pooling) resumes in its own convention
        pooling = adopt_pooling(self._adapter_modules.values(), saved["adapter_config"])
        if pooling != self._adapter_metadata.pooling:
            _info(f"{saved['path']} was trained with {pooling} pooling: resuming it so")
            self._adapter_metadata = self._adapter_config()
        check_resume_matches(saved["adapter_config"], self._adapter_metadata, saved["path"])
        recipe_utils.check_saved_adapter(saved["adapter"], self._adapter_params, saved["path"])
        with recipe_utils.unreadable_state(saved["path"] / RECIPE_STATE_NAME):
            state = saved["recipe_state"]
            mid_epoch = state["progress"]["steps_done_in_epoch"] > 0
            if mid_epoch:
                recipe_utils.check_data_order(
                    saved["path"], state["data_order"], self._data_order()
                )
            with torch.no_grad():
                for name, param in self._adapter_params.items():
                    param.copy_(saved["adapter"][name])
            progress, self._resumed_dataloader_state = recipe_utils.apply_recipe_state(
                state, self._optimizer, self._lr_scheduler, self._rank, self._device
            )
            self.epochs_run, self.global_step = progress["epochs_run"], progress["global_step"]
            self._steps_done_in_epoch = progress["steps_done_in_epoch"]
        where = (
            f"step {self._steps_done_in_epoch} of epoch {self.epochs_run + 1}"
            if mid_epoch
            else f"epoch {self.epochs_run}"
        )
        _info(f"Resumed from {saved['path']} after {where} (global step {self.global_step})")

    def _data_order(self) -> Dict[str, Any]:
        """The settings that fix which examples each rank sees at each step."""
        return {
            "world_size": self._world_size,
            "batch_size": self._batch_size,
            "gradient_accumulation_steps": self._gradient_accumulation_steps,
            "shuffle": self._shuffle,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ summary

    def summary(self) -> str:
        """A short report: validation metrics per model and where the outputs are; also
        written to ``{output_dir}/summary.json`` (call on rank 0)."""
        latest = self._checkpointer.latest_epoch_dir()
        summary = recipe_utils.summary_json(self._metrics, latest)
        atomic_write_text(self._output_dir / "summary.json", summary)
        return "\n".join(recipe_utils.summary_lines(self._metrics, latest))

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
        recipe_utils.destroy_distributed()


def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run qalora_finetune --config NAME_OR_PATH [key=value ...]``."""
    recipe_utils.check_config(cfg, CONFIG_KEYS, "qalora_finetune")
    recipe = QALoRAFinetuneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.evaluate_baselines()
    recipe.train()
    if recipe_utils.is_rank_zero():
        print(recipe.summary())
    recipe.cleanup()


def main(argv: Optional[List[str]] = None) -> None:
    """Parse the command line (a packaged config name or a path), then run the recipe."""
    recipe_utils.run_recipe("qalora_finetune", recipe_main, argv)


if __name__ == "__main__":
    main()
