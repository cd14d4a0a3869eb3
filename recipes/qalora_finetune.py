"""QA-LoRA fine-tuning recipe for torchtune.

    tune run qalora_finetune --config tiny_qalora
    tune run qalora_finetune --config llama2_7B_qalora batch_size=8 model.lora_rank=16

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
fp32/bf16 on CPU or CUDA, and ``resume_from_checkpoint``.
"""

import contextlib
import json
import math
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
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

import qalora_tune
from qalora_tune._compat import get_component_from_path
from qalora_tune.models import count_parameters
from qalora_tune.modules import QALoRALinear
from qalora_tune.recipe_utils import evaluate_lm, merge_with_report, run_recipe

log = utils.get_logger("INFO")

IGNORE_INDEX = -100


class QALoRAFinetuneRecipe(FTRecipeInterface):
    """Fine-tune QA-LoRA adapters on a frozen int4 base, on one device.

    Args:
        cfg (DictConfig): the parsed config (see ``configs/``).

    Raises:
        ValueError: for settings that cannot work together (named in the message).
    """

    def __init__(self, cfg: DictConfig) -> None:
        if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"device={cfg.device} but CUDA is not available; set device=cpu "
                "(with dtype=fp32 or bf16)"
            )
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self._output_dir = Path(cfg.output_dir).expanduser()
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False)
        self._gradient_accumulation_steps = cfg.get("gradient_accumulation_steps", 1)
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._compile = cfg.get("compile", False)
        self._enable_activation_checkpointing = cfg.get("enable_activation_checkpointing", False)
        self._enable_activation_offloading = cfg.get("enable_activation_offloading", False)
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._save_merged_int4 = cfg.get("save_merged_int4", True)
        self._merge_probe_size = cfg.get("merge_probe_size", 8)
        if self._enable_activation_offloading and self._device.type != "cuda":
            raise ValueError(
                "enable_activation_offloading=True needs a CUDA device; set "
                "enable_activation_offloading=False on CPU"
            )
        if self._gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps must be >= 1, got {self._gradient_accumulation_steps}"
            )
        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.epochs_run = 0
        self.global_step = 0
        self._metrics: Dict[str, Dict[str, float]] = {}

    # ------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        """Build everything from the config, in dependency order."""
        if cfg.get("prepare_base") is not None:
            config.instantiate(cfg.prepare_base)
        self._checkpointer = self._setup_checkpointer(cfg.checkpointer)
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)
        self._model_cfg = cfg.model
        self._model = self._setup_model(cfg.model)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._loss_fn = self._setup_loss(cfg.loss)
        self._optimizer = self._setup_optimizer(cfg.optimizer)
        self._dataloader = self._setup_data(cfg.dataset, cfg.batch_size, cfg.get("shuffle", True))
        self._steps_per_epoch = self._count_steps_per_epoch()
        self._lr_scheduler = self._setup_lr_scheduler(cfg.get("lr_scheduler"))
        self._val_dataloader, self._val_cfg = self._setup_validation(cfg.get("validation"))
        self._probe_batch = self._probe(self._val_dataloader or self._dataloader)
        if self._resume_from_checkpoint:
            self._restore(self._checkpointer.load_resume_state())

    def _setup_checkpointer(self, cfg_checkpointer: DictConfig) -> Any:
        checkpointer = config.instantiate(
            cfg_checkpointer,
            output_dir=str(self._output_dir),
            resume_from_checkpoint=self._resume_from_checkpoint,
        )
        checkpointer.check_base_available()
        checkpointer.key_map  # outputs use Hugging Face names: fail now, not at the first save
        return checkpointer

    def _setup_model(self, cfg_model: DictConfig) -> nn.Module:
        start = time.perf_counter()
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg_model)
        self._hf_config = self._checkpointer.load_base(model)
        adapters = {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
        if not adapters:
            raise ValueError(
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
        log.info(
            f"Model ready in {time.perf_counter() - start:.1f}s: {len(adapters)} QA-LoRA "
            f"layers, {counts['trainable']:,} trainable and {counts['frozen']:,} frozen "
            f"parameters, dtype {self._dtype}, device {self._device}"
        )
        if self._device.type == "cuda":
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        return model

    def _setup_loss(self, cfg_loss: DictConfig) -> nn.Module:
        loss_fn = config.instantiate(cfg_loss)
        if self._compile:
            loss_fn = training.compile_loss(loss_fn)
        if hasattr(loss_fn, "num_output_chunks"):
            self._model.set_num_output_chunks(loss_fn.num_output_chunks)
        return loss_fn

    def _setup_optimizer(self, cfg_optimizer: DictConfig) -> Optimizer:
        return config.instantiate(cfg_optimizer, list(self._adapter_params.values()))

    def _build_dataset(self, cfg_dataset: Any) -> torch.utils.data.Dataset:
        if isinstance(cfg_dataset, (list, tuple)) or OmegaConf.is_list(cfg_dataset):
            parts = [config.instantiate(c, self._tokenizer) for c in cfg_dataset]
            return torch.utils.data.ConcatDataset(parts)
        return config.instantiate(cfg_dataset, self._tokenizer)

    def _make_loader(self, dataset, batch_size: int, shuffle: bool) -> StatefulDataLoader:
        collate = get_component_from_path("torchtune.data.padded_collate_sft")
        sampler = StatefulDistributedSampler(
            dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=self.seed
        )
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=shuffle,
            collate_fn=partial(
                collate, padding_idx=self._tokenizer.pad_id, ignore_idx=IGNORE_INDEX
            ),
        )

    def _setup_data(self, cfg_dataset: Any, batch_size: int, shuffle: bool) -> StatefulDataLoader:
        dataset = self._build_dataset(cfg_dataset)
        if len(dataset) < batch_size:
            raise ValueError(
                f"the dataset has {len(dataset)} examples, fewer than batch_size={batch_size}; "
                "lower batch_size"
            )
        return self._make_loader(dataset, batch_size, shuffle)

    def _count_steps_per_epoch(self) -> int:
        steps = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None:
            steps = min(steps, self.max_steps_per_epoch)
        if steps < 1:
            raise ValueError(
                "an epoch has no optimizer step: lower gradient_accumulation_steps or "
                "batch_size, or use more data"
            )
        return steps

    def _setup_lr_scheduler(self, cfg_lr_scheduler: Optional[DictConfig]) -> Optional[Any]:
        if cfg_lr_scheduler is None:
            return None
        return config.instantiate(
            cfg_lr_scheduler,
            self._optimizer,
            num_training_steps=self.total_epochs * self._steps_per_epoch,
        )

    def _setup_validation(self, cfg_validation: Optional[DictConfig]):
        if cfg_validation is None:
            return None, None
        dataset = self._build_dataset(cfg_validation.dataset)
        loader = self._make_loader(dataset, cfg_validation.get("batch_size", 8), shuffle=False)
        return loader, cfg_validation

    def _probe(self, loader: StatefulDataLoader) -> Dict[str, torch.Tensor]:
        """The first ``merge_probe_size`` examples of ``loader``'s dataset, collated: the
        batch on which every save measures the merge (the loader itself is not advanced)."""
        dataset = loader.dataset
        count = min(self._merge_probe_size, len(dataset))
        return loader.collate_fn([dataset[i] for i in range(count)])

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self) -> Dict[str, float]:
        return evaluate_lm(
            self._model,
            self._val_dataloader,
            self._device,
            self._val_cfg.get("max_batches"),
        )

    @contextlib.contextmanager
    def _adapters_disabled(self):
        for module in self._adapter_modules.values():
            module.disabled = True
        try:
            yield
        finally:
            for module in self._adapter_modules.values():
                module.disabled = False

    def _evaluate_full_precision(self, cfg_model: DictConfig) -> Dict[str, float]:
        builder = get_component_from_path(cfg_model._component_)
        if not hasattr(builder, "full_precision"):
            raise ValueError(
                f"{cfg_model._component_} has no full-precision counterpart; set "
                "validation.full_precision_baseline=False"
            )
        with training.set_default_dtype(self._dtype), self._device:
            model = builder.full_precision()
        self._checkpointer.load_base(model)
        metrics = evaluate_lm(model, self._val_dataloader, self._device, self._val_cfg.get("max_batches"))
        del model
        return metrics

    def evaluate_baselines(self) -> None:
        """Validation metrics of the full-precision base (if asked) and the int4 base."""
        if self._val_dataloader is None:
            return
        if self._val_cfg.get("full_precision_baseline", False):
            self._metrics["full-precision base"] = self._evaluate_full_precision(self._model_cfg)
        with self._adapters_disabled():
            self._metrics["int4 base"] = self._evaluate()
        for name, values in self._metrics.items():
            log.info(f"{name}: {_format_metrics(values)}")

    # ------------------------------------------------------------------ training

    def _loss_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.pop("labels")
        with self._activations_ctx:
            logits = self._model(**batch)
        # position t predicts token t + 1: shift labels left, pad with the ignore index
        labels = torch.hstack((labels[..., 1:], torch.full_like(labels[..., :1], IGNORE_INDEX)))
        if not isinstance(logits, list):
            labels = labels.reshape(-1)
            logits = logits.reshape(-1, logits.size(-1))
        loss = self._loss_fn(logits, labels)
        del logits
        return loss

    def train(self) -> None:
        """Run the remaining epochs, saving adapter and recipe state after each."""
        if self._compile:
            log.info("torch.compile is on: the first steps compile the model (slow)")
        self._model.train()
        for epoch in range(self.epochs_run, self.total_epochs):
            self._dataloader.sampler.set_epoch(epoch)
            progress = tqdm(total=self._steps_per_epoch, disable=not sys.stderr.isatty())
            running_loss, num_tokens, step_start = 0.0, 0, time.perf_counter()
            for index, batch in enumerate(self._dataloader):
                utils.batch_to_device(batch, self._device)
                batch_tokens = (batch["labels"] != IGNORE_INDEX).sum()
                loss = self._loss_step(batch) * batch_tokens
                running_loss += loss.detach()
                num_tokens += batch_tokens
                loss.backward()
                if (index + 1) % self._gradient_accumulation_steps:
                    continue
                grad_norm = self._optimizer_step(num_tokens)
                self.global_step += 1
                step_loss = (running_loss / num_tokens).item()
                if not math.isfinite(step_loss):
                    raise RuntimeError(
                        f"the loss became {step_loss} at step {self.global_step}; lower "
                        "optimizer.lr or set clip_grad_norm (last good state: "
                        f"{self._checkpointer.latest_epoch_dir()})"
                    )
                progress.update(1)
                progress.set_description(f"{epoch + 1}|{self.global_step}|Loss: {step_loss:.4f}")
                if self.global_step % self._log_every_n_steps == 0:
                    self._log_step(step_loss, num_tokens, step_start, grad_norm)
                running_loss, num_tokens, step_start = 0.0, 0, time.perf_counter()
                if (index + 1) // self._gradient_accumulation_steps >= self._steps_per_epoch:
                    break
            progress.close()
            self.epochs_run += 1
            if self._val_dataloader is not None:
                metrics = self._evaluate()
                self._metrics["QA-LoRA"] = metrics
                self._metric_logger.log_dict(
                    {f"val_{k}": v for k, v in metrics.items()}, step=self.global_step
                )
                log.info(f"epoch {epoch + 1} validation: {_format_metrics(metrics)}")
            self.save_checkpoint(epoch)

    def _optimizer_step(self, num_tokens: torch.Tensor) -> Optional[torch.Tensor]:
        training.scale_grads(self._model, 1 / num_tokens)
        grad_norm = None
        if self._clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self._adapter_params.values(), max_norm=float(self._clip_grad_norm)
            )
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        return grad_norm

    def _log_step(self, loss: float, num_tokens, step_start: float, grad_norm) -> None:
        seconds = time.perf_counter() - step_start
        values = {
            "loss": loss,
            "lr": self._optimizer.param_groups[0]["lr"],
            "tokens_per_second_per_gpu": float(num_tokens) / max(seconds, 1e-9),
        }
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        if self._device.type == "cuda" and self._log_peak_memory_stats:
            values.update(training.get_memory_stats(device=self._device))
        self._metric_logger.log_dict(values, step=self.global_step)

    # ------------------------------------------------------------------ checkpoints

    def _adapter_config(self) -> Dict[str, Any]:
        first = next(iter(self._adapter_modules.values()))
        cfg = self._model_cfg
        base_builder = {
            "_component_": cfg._component_,
            "lora_attn_modules": [],
            "apply_lora_to_mlp": False,
            "apply_lora_to_output": False,
            "group_size": first.group_size,
            "quantizer": first.quantizer,
            "pad_in_dim": bool(cfg.get("pad_in_dim", False)),
        }
        return {
            "format": "qalora_tune",
            "rank": first.rank,
            "alpha": first.alpha,
            "group_size": first.group_size,
            "bits": 4,
            "pooling": "mean",
            "pooling_note": (
                "the adapter's input is the mean over each group of group_size inputs; "
                "for sum pooling (paper, Algorithm 1) divide lora_A by group_size; PEFT "
                "multiplies the mean by n_groups, which lora_alpha/alpha_pattern here "
                "already account for (alpha / n_groups)"
            ),
            "quantizer": first.quantizer,
            "pad_in_dim": bool(cfg.get("pad_in_dim", False)),
            "lora_dropout": float(cfg.get("lora_dropout", 0.0)),
            "target_modules": sorted(self._adapter_modules),
            "model": base_builder,
            "model_builder": cfg._component_,
            "model_type": self._checkpointer.model_type,
            "checkpoint_format": self._checkpointer.checkpoint_format,
            "dtype": str(self._dtype).removeprefix("torch."),
            "base_checkpoint_dir": str(self._checkpointer.checkpoint_dir),
            "base_fingerprint": self._checkpointer.base_fingerprint(),
            "versions": {
                "qalora_tune": qalora_tune.__version__,
                "torch": torch.__version__,
                "torchao": _version("torchao"),
                "torchtune": _version("torchtune"),
            },
        }

    def save_checkpoint(self, epoch: int) -> None:
        """Write ``epoch_{epoch}/``: adapter weights and config, and the recipe state."""
        start = time.perf_counter()
        recipe_state = {
            "optimizer": self._optimizer.state_dict(),
            "lr_scheduler": None if self._lr_scheduler is None else self._lr_scheduler.state_dict(),
            "epochs_run": self.epochs_run,
            "global_step": self.global_step,
            "seed": self.seed,
            "total_epochs": self.total_epochs,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "dataloader": self._dataloader.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        layers = self._adapter_modules
        if not self._save_merged_int4:
            path = self._checkpointer.save_checkpoint(
                epoch, layers, self._adapter_config(), recipe_state
            )
            log.info(f"Saved {path} in {time.perf_counter() - start:.1f}s")
            return
        report = merge_with_report(self._model, layers.values(), self._probe_batch, self._device)
        try:
            if epoch == self.total_epochs - 1 and self._val_dataloader is not None:
                self._metrics["QA-LoRA merged int4"] = self._evaluate()
            path = self._checkpointer.save_checkpoint(
                epoch, layers, self._adapter_config(), recipe_state,
                merged_model=self._model, merge_report=report,
            )
        finally:
            for layer in layers.values():
                layer.unmerge()  # restores the zeros bit for bit
        log.info(
            f"Saved {path} in {time.perf_counter() - start:.1f}s; merged int4 vs unmerged "
            f"logits: max relative error {report['max_relative_logit_error']:.2e}"
        )

    def _restore(self, saved: Dict[str, Any]) -> None:
        state = saved["recipe_state"]
        missing = set(self._adapter_params) - set(saved["adapter"])
        if missing:
            raise ValueError(
                f"the checkpoint in {saved['path']} lacks adapter weights {sorted(missing)[:3]}; "
                "resume with the config it was trained with"
            )
        with torch.no_grad():
            for name, param in self._adapter_params.items():
                param.copy_(saved["adapter"][name])
        self._optimizer.load_state_dict(state["optimizer"])
        if self._lr_scheduler is not None and state["lr_scheduler"] is not None:
            self._lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.epochs_run = state["epochs_run"]
        self.global_step = state["global_step"]
        self.seed = state["seed"]
        torch.set_rng_state(state["rng"])
        log.info(f"Resumed from {saved['path']} after epoch {self.epochs_run}")

    # ------------------------------------------------------------------ summary

    def summary(self) -> str:
        """A short report: validation metrics per model and where the outputs are."""
        lines = ["", "QA-LoRA summary"]
        if self._metrics:
            lines.append(
                f"  {'model (validation)':<22}{'loss':>9}{'perplexity':>12}{'accuracy':>10}"
                f"{'exact match':>13}"
            )
            for name, m in self._metrics.items():
                lines.append(
                    f"  {name:<22}{m['loss']:>9.4f}{m['perplexity']:>12.4f}"
                    f"{m['accuracy']:>10.2%}{m['exact_match']:>13.2%}"
                )
        latest = self._checkpointer.latest_epoch_dir()
        lines.append(f"  outputs: {latest}" if latest else "  no outputs written")
        if latest is not None:
            lines.append(f"    adapter: {latest / 'adapter'}")
            merged = latest / "merged_int4"
            if merged.is_dir():
                report = json.loads((merged / "merge_report.json").read_text())
                lines.append(
                    f"    merged int4: {merged} ({report['size']['bits_per_quantized_parameter']:.2f}"
                    f" bits per quantized weight; merged vs unmerged logits: max relative "
                    f"error {report['max_relative_logit_error']:.2e})"
                )
        (self._output_dir / "summary.json").write_text(
            json.dumps({"metrics": self._metrics, "outputs": str(latest)}, indent=2)
        )
        return "\n".join(lines)

    def cleanup(self) -> None:
        self._metric_logger.close()


def _format_metrics(metrics: Dict[str, float]) -> str:
    return (
        f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3f}, "
        f"accuracy {metrics['accuracy']:.2%}, exact match {metrics['exact_match']:.2%}"
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run qalora_finetune --config NAME_OR_PATH [key=value ...]``."""
    config.log_config(recipe_name="QALoRAFinetuneRecipe", cfg=cfg)
    recipe = QALoRAFinetuneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.evaluate_baselines()
    recipe.train()
    print(recipe.summary())
    recipe.cleanup()


def main(argv: Optional[List[str]] = None) -> None:
    """Resolve a packaged config name, then run the recipe."""
    run_recipe("qalora_finetune", recipe_main, argv)


if __name__ == "__main__":
    main()
