"""One point of ``benchmarks/lr_transfer.py``: a training run of the packaged recipe with
the point's overrides (in this process), and the init-scale statistic of a case."""

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _lr_transfer_cases import TINY_PRETRAIN, TINY_PROTOCOL, Case, builder_of, case_by_name, tiny_base_dir


@dataclasses.dataclass(frozen=True)
class Point:
    """One training run: a case, a parametrization, a learning rate, a seed, a variant."""

    case: str
    pooling: str
    lr: float
    seed: int
    b_lr_ratio: float = 1.0
    min_lr_ratio: float | None = None  # None: the config's own floor
    warmup_steps: int | None = None  # None: the config's warmup

    @classmethod
    def of(cls, record: dict[str, Any]) -> "Point":
        """The point of a result record (fields added later take their defaults)."""
        return cls(**{f.name: record.get(f.name, f.default) for f in dataclasses.fields(cls)})

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def point_overrides(point: Point, args: argparse.Namespace, output_dir: Path) -> list[str]:
    """The ``key=value`` overrides of the case's packaged config that make ``point``."""
    case = case_by_name(point.case)
    builder = "qalora_tune.tiny.qalora_tiny_llama"
    overrides = [
        f"output_dir={output_dir}",
        f"metric_logger.log_dir={output_dir}/logs",
        "log_every_n_steps=1000",
        "save_merged_int4=False",
        "validation.full_precision_baseline=False",
        f"seed={point.seed}",
        f"optimizer.lr={point.lr!r}",
        f"model.group_size={case.group_size}",
        f"model.bits={case.bits}",
        f"model.lora_rank={case.rank}",
        f"model.lora_alpha={case.alpha!r}",
    ]
    if case.config == "tiny_qalora":
        base = tiny_base_dir(args.work_dir, case.width or 128)
        if case.width is None:
            base = args.work_dir / "bases" / "tiny_qalora"  # the config's own base (700 steps)
        overrides += [
            f"prepare_base.checkpoint_dir={base}",
            f"checkpointer.checkpoint_dir={base}",
            f"tokenizer.path={base}/tiny_tokenizer.json",
        ]
    if case.width is not None:
        peak = TINY_PRETRAIN["peak_lr_at_width_128"] * math.sqrt(128 / case.width)
        overrides += [
            f"prepare_base.embed_dim={case.width}",
            f"prepare_base.steps={args.pretrain_steps}",
            f"prepare_base.batch_size={TINY_PRETRAIN['batch_size']}",
            f"prepare_base.lr={peak!r}",
            f"model.embed_dim={case.width}",
            *(f"{k}={v}" for k, v in TINY_PROTOCOL.items()),
        ]
    overrides.append(f"model.builder={builder_of(case, builder)}")
    overrides += ["model._component_=lr_transfer.adapted_model", f"model.pooling={point.pooling}"]
    if point.b_lr_ratio != 1.0:
        overrides += ["optimizer._component_=lr_transfer.adamw_lora_plus",
                      f"optimizer.b_lr_ratio={point.b_lr_ratio!r}"]
    if point.min_lr_ratio is not None:
        overrides += ["lr_scheduler._component_=qalora_tune.recipe_utils.get_cosine_schedule_with_floor",
                      f"lr_scheduler.min_lr_ratio={point.min_lr_ratio!r}"]
    if point.warmup_steps is not None:
        overrides.append(f"lr_scheduler.num_warmup_steps={point.warmup_steps}")
    if args.steps is not None:
        overrides.append(f"max_steps_per_epoch={args.steps}")
    return [*overrides, *case.overrides]


def _recipe(point: Point, args: argparse.Namespace, output_dir: Path) -> Any:
    """The recipe of ``point``, set up (config checked as ``tune run`` checks it)."""
    from omegaconf import OmegaConf

    import qalora_finetune
    from qalora_tune.recipe_utils import check_config, resolve_config

    case = case_by_name(point.case)
    overrides = point_overrides(point, args, output_dir)
    cfg = OmegaConf.merge(OmegaConf.load(resolve_config(case.config)), OmegaConf.from_dotlist(overrides))
    cfg = OmegaConf.create(_rebase_shared(OmegaConf.to_container(cfg), args.shared))
    check_config(cfg, qalora_finetune.CONFIG_KEYS, "qalora_finetune")
    recipe = qalora_finetune.QALoRAFinetuneRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    return recipe


def run_point(point: Point, args: argparse.Namespace) -> dict[str, Any]:
    """Train one point with the recipe, in this process; its validation metrics."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lr_point_", dir=args.work_dir) as output_dir:
        start_cpu, start = time.process_time(), time.perf_counter()
        recipe = _recipe(point, args, Path(output_dir))
        try:
            recipe.train()
            recipe.summary()
            metrics = json.loads((Path(output_dir) / "summary.json").read_text())["metrics"]["QA-LoRA"]
            loss = metrics["loss"]
        except Exception as error:  # a diverged run (non-finite loss) is a result, not a crash
            if "loss became" not in str(error):
                raise
            loss, metrics = math.inf, {}
        finally:
            recipe.cleanup()
    return {
        **dataclasses.asdict(point),
        "loss": loss if math.isfinite(loss) else None,
        "perplexity": metrics.get("perplexity"),
        "accuracy": metrics.get("accuracy"),
        "cpu_seconds": round(time.process_time() - start_cpu, 2),
        "wall_seconds": round(time.perf_counter() - start, 2),
    }


@torch.no_grad()
def pooled_input_scale(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """How large each adapter's ``A p`` is at initialisation next to LoRA's ``A x`` on the
    same inputs (the case's first validation batch, through the int4 base):
    ``sqrt(E|p_sum|^2 / E|x|^2)`` with sum pooling (1 when the inputs of a group are
    uncorrelated, up to ``sqrt(G)`` when they are equal), ``sqrt(G)`` times less with mean
    pooling. Median and range over the adapted linears."""
    from qalora_tune.modules import QALoRALinear

    ratios: list[float] = []

    def record(module: QALoRALinear, inputs: tuple[torch.Tensor, ...]) -> None:
        x = module.pad_input(inputs[0]).double()
        pooled = x.unflatten(-1, (-1, module.group_size)).sum(-1)
        ratios.append((pooled.pow(2).sum() / x.pow(2).sum()).item())

    with tempfile.TemporaryDirectory(prefix="lr_stats_", dir=args.work_dir) as output_dir:
        recipe = _recipe(Point(case.name, "sum", 1e-3, args.seeds[0]), args, Path(output_dir))
        try:  # the recipe's model and validation data (its own attributes)
            layers = [m for m in recipe._model.modules() if isinstance(m, QALoRALinear)]
            handles = [layer.register_forward_pre_hook(record) for layer in layers]
            recipe._model.eval()(next(iter(recipe._val_dataloader))["tokens"])
            for handle in handles:
                handle.remove()
        finally:
            recipe.cleanup()
    scales = sorted(math.sqrt(r) for r in ratios)
    return {
        "sum": {"median": statistics.median(scales), "min": scales[0], "max": scales[-1]},
        "mean": {k: v / math.sqrt(case.group_size) for k, v in
                 {"median": statistics.median(scales), "min": scales[0], "max": scales[-1]}.items()},
    }


def _rebase_shared(node: Any, shared: Path) -> Any:
    """The config with every ``../shared/...`` path (the packaged configs' spelling,
    relative to the project root) moved under ``shared``."""
    if isinstance(node, dict):
        return {k: _rebase_shared(v, shared) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase_shared(v, shared) for v in node]
    if isinstance(node, str) and node.startswith("../shared/"):
        return str(shared / node[len("../shared/"):])
    return node


def _quiet_run_point(point: Point, args: argparse.Namespace) -> dict[str, Any]:
    """run_point in a worker: torchtune's per-run INFO lines silenced."""
    import logging

    logging.getLogger("torchtune").setLevel(logging.WARNING)
    return run_point(point, args)
