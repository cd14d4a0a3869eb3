"""The cases of ``benchmarks/lr_transfer.py``: the cross of settings whose loss-vs-
learning-rate curves are measured, the tiny bases' protocols, what each case's packaged
config says, and the model and optimizer components the points' configs name."""

import dataclasses
import sys
import tempfile
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _report import packaged_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = ROOT.parent / "shared"
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "qalora-tune" / "lr_transfer"
POOLINGS = ("mean", "sum")

TINY_PRETRAIN = {"steps": 300, "batch_size": 32, "peak_lr_at_width_128": 5e-3}
"""Pretraining of the wider tiny bases (random init, then this; peak lr scaled by
sqrt(128 / width)): brief, so the bases know the task's format and part of its glossary."""

TINY_PROTOCOL = {
    "max_steps_per_epoch": 100,
    "batch_size": 16,
    "dataset.num_examples": 4000,
    "validation.dataset.num_examples": 500,
    "lr_scheduler.num_warmup_steps": 10,
}
"""Fine-tuning of the tiny-width cases (``tiny_qalora`` with these overrides)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One setting whose loss-vs-learning-rate curve is measured."""

    name: str
    config: str
    axes: tuple[str, ...]
    group_size: int
    bits: int
    rank: int
    alpha: float
    width: int | None = None  # a tiny base of this width (None: the config's own model)
    overrides: tuple[str, ...] = ()

    def key(self) -> str:
        return self.name


def _tiny(width: int, group_size: int = 64, bits: int = 2, rank: int = 8, axes=()) -> Case:
    return Case(
        f"tiny w{width} G{group_size} b{bits} r{rank}", "tiny_qalora", tuple(axes),
        group_size, bits, rank, 16.0, width=width,
    )


def _config(config: str, group_size: int, bits: int, rank: int, alpha: float, axes=()) -> Case:
    return Case(f"{config} G{group_size} b{bits}", config, tuple(axes), group_size, bits, rank, alpha)


CASES: tuple[Case, ...] = (
    _config("tiny_qalora", 32, 2, 8, 16.0, axes=("config", "model")),
    _config("tiny_qalora", 32, 4, 8, 16.0, axes=("config",)),
    _config("stories260K_qalora", 32, 2, 2, 4.0, axes=("config", "model")),
    _config("stories260K_qalora", 32, 4, 2, 4.0, axes=("config",)),
    _config("tinystories656K_qalora", 32, 2, 4, 8.0, axes=("config", "model", "shared_group_size")),
    _config("tinystories656K_qalora", 32, 4, 4, 8.0, axes=("config",)),
    _config("tinystories656K_qalora", 64, 2, 4, 8.0, axes=("shared_group_size",)),
    _config("tinystories656K_qalora", 128, 2, 4, 8.0, axes=("shared_group_size",)),
    _tiny(128, axes=("width",)),
    _tiny(256, axes=("width",)),
    _tiny(512, axes=("centre", "width", "group_size", "rank")),
    _tiny(512, group_size=32, axes=("group_size",)),
    _tiny(512, group_size=128, axes=("group_size",)),
    _tiny(512, rank=2, axes=("rank",)),
    _tiny(512, rank=32, axes=("rank",)),
    _tiny(1024, axes=("width",)),
)
"""The cross, cheapest first: the packaged configs (their own protocols, at 2 and 4 bits),
then the tiny widths around the centre (width 512, G=64, 2 bits, rank 8, alpha 16)."""

AXES = {
    "width": "tiny base width (G=64, 2 bits, rank 8)",
    "group_size": "group size G (tiny w512, 2 bits, rank 8)",
    "rank": "rank at alpha 16 (tiny w512, G=64, 2 bits)",
    "shared_group_size": "group size G (tinystories656K config, 2 bits)",
    "model": "model (packaged configs, 2 bits)",
    "config": "packaged configs at 2 and 4 bits",
}


def _log(message: str) -> None:
    print(f"[lr_transfer {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def case_by_name(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise ValueError(f"unknown case {name!r}; cases: {[c.name for c in CASES]}")


def tiny_base_dir(work_dir: Path, width: int) -> Path:
    return work_dir / "bases" / f"w{width}"


def builder_of(case: Case, default: str) -> str:
    """The model builder a case's config names (the tiny widths build their own)."""
    if case.width is not None:
        return default
    return packaged_config(case.config).model._component_


def _config_warmup(case: Case) -> int:
    """The warmup steps a case trains with (the tiny widths: ``TINY_PROTOCOL``)."""
    if case.width is not None:
        return int(TINY_PROTOCOL["lr_scheduler.num_warmup_steps"])
    return int(packaged_config(case.config).lr_scheduler.num_warmup_steps)


def _config_floor(case: Case) -> float:
    """The cosine floor (``lr_scheduler.min_lr_ratio``, a fraction of the peak) a case's
    config trains with; 0 for a scheduler without one (cosine to zero)."""
    return float(packaged_config(case.config).lr_scheduler.get("min_lr_ratio", 0.0))


def _config_lr(config: str) -> float:
    return float(packaged_config(config).optimizer.lr)


def _config_seed(config: str) -> int | None:
    """The ``seed`` a packaged config sets (``None`` for a random one)."""
    seed = packaged_config(config).get("seed")
    return None if seed is None else int(seed)


# ------------------------------------------------------------------------- components


def adapted_model(
    builder: str, pooling: str = "sum", embed_dim: int | None = None, **knobs: Any
) -> torch.nn.Module:
    """A config component: the QA-LoRA model of ``builder`` (a model builder's import path)
    or, with ``embed_dim``, a tiny base of that width, with its adapters in ``pooling``.

    ``sum`` is what the builders make (nothing changes: the point equals ``tune run``);
    ``mean`` switches every adapter to mean pooling and draws its ``A`` again in that
    convention (earlier qalora-tune's initialisation).
    """
    from torchtune.models.llama2 import llama2

    from qalora_tune._compat import get_component_from_path
    from qalora_tune.models import qalora_transformer
    from qalora_tune.tiny import tiny_llama_sizes

    if embed_dim is not None:
        knobs.setdefault("lora_attn_modules", [])
        model = qalora_transformer(partial(llama2, **tiny_llama_sizes(embed_dim)), **knobs)
    else:
        model = get_component_from_path(builder)(**knobs)
    return use_pooling(model, pooling)


def use_pooling(model: torch.nn.Module, pooling: str) -> torch.nn.Module:
    """Switch every QA-LoRA adapter of ``model`` to ``pooling`` (``sum``: what the builders
    make; ``mean``: earlier qalora-tune's parametrization), drawing ``A`` again in that
    convention where it changes."""
    from qalora_tune.modules import QALoRALinear

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    for module in model.modules():
        if isinstance(module, QALoRALinear) and module.pooling != pooling:
            module.pooling = pooling
            module.initialize_parameters()
    return model


def adamw_lora_plus(params: Iterable[torch.nn.Parameter], lr: float, b_lr_ratio: float = 1.0,
                    **kwargs: Any) -> torch.optim.AdamW:
    """A config component: AdamW with ``lr`` on the adapters' ``A`` and ``b_lr_ratio * lr``
    on their ``B`` (LoRA+). ``B`` is told apart by shape: ``(out_dim, rank)`` with the
    rank as its second dimension, the first of ``A``'s (parameters come in A, B order)."""
    params = list(params)
    a_params, b_params = params[0::2], params[1::2]
    if any(a.shape[0] != b.shape[1] for a, b in zip(a_params, b_params)):
        raise ValueError("adamw_lora_plus expects the adapter parameters as A, B pairs")
    groups = [{"params": a_params, "lr": lr}, {"params": b_params, "lr": lr * b_lr_ratio}]
    return torch.optim.AdamW(groups, lr=lr, **kwargs)
