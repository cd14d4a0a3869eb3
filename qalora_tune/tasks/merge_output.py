"""``tune run qalora_merge ... merged_format=zero_table``: a task package instead of a model.

    tune run qalora_merge --config tinystories656K_qalora adapter_dir=runs/alpaca/epoch_0/adapter \\
        merged_format=zero_table merged_dir=tasks/alpaca base_dir=models/base_int4

``merged_dir`` receives the task package (default: ``zero_table/`` beside the adapter
directory), named ``task_name`` (default: the training run's directory name).
``base_dir``, when given, is the task-free model every package of this base applies to:
written there once, as an ordinary merged model (``merged_format=auto``'s format) whose
zero points are the base's own (no adapter in them), or, when a merged model is already
there, checked to have this base's fingerprint, so that a package is never written for a
base it does not fit. The package holds the zero points exactly as that format's file
would (each layer goes through the merged writer's own conversion), so that a base
switched to it equals the task's own merged model bit for bit.
"""

import contextlib
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from qalora_tune.checkpointing import OUTPUT_MARKER_NAME, atomic_directory
from qalora_tune.checkpointing._merged_formats import TASK_FORMAT
from qalora_tune.errors import UserValueError
from qalora_tune.modules import QALoRALinear
from qalora_tune.tasks.base_layers import fingerprint_layers, fingerprint_model, read_merged_base
from qalora_tune.tasks.zero_table import export_task

__all__ = ["ZeroTableOutput", "zero_table_output"]

BASE_FORMAT = "auto"  # the task-free base's merged_format


def zero_table_output(cfg: DictConfig, adapter_dir: Path) -> Optional["ZeroTableOutput"]:
    """The zero-table output ``cfg`` asks for (``merged_format=zero_table``), else None.

    Raises:
        ValueError: for ``base_dir`` or ``task_name`` without ``merged_format=zero_table``.
    """
    if cfg.get("merged_format") != TASK_FORMAT:
        for key in ("base_dir", "task_name"):
            if cfg.get(key) is not None:
                raise UserValueError(
                    f"{key} is read only with merged_format={TASK_FORMAT}; add "
                    f"merged_format={TASK_FORMAT} or drop {key}"
                )
        return None
    base_dir = cfg.get("base_dir")
    name = cfg.get("task_name") or adapter_dir.parent.parent.name or "task"
    return ZeroTableOutput(Path(base_dir).expanduser() if base_dir else None, str(name))


@contextlib.contextmanager
def _base_zeros_written(layers: Iterable[QALoRALinear]) -> Iterator[None]:
    """Let the merged-model writer take unmerged layers as they are: their zero points are
    the base's, which is what the task-free model must hold."""
    unmerged = [layer for layer in layers if not layer.merged]
    for layer in unmerged:
        layer.merged = True
    try:
        yield
    finally:
        for layer in unmerged:
            layer.merged = False


class ZeroTableOutput:
    """Writes the task package (and the task-free base) of one ``qalora_merge`` run.

    Args:
        base_dir (Path, optional): the task-free model's directory.
        name (str): the task's name.
    """

    default_dir_name = "zero_table"
    base_format = BASE_FORMAT  # the merged format of the task-free base (and the package's zeros)

    def __init__(self, base_dir: Optional[Path], name: str) -> None:
        self.base_dir = base_dir
        self.name = name

    def base_dir_problem(self, protected: Dict[str, Any]) -> Optional[str]:
        """Why ``base_dir`` cannot be used (None when it can): inside a protected
        directory, a file, or a directory of other files."""
        if self.base_dir is None:
            return None
        target = self.base_dir.resolve()
        for setting, directory in protected.items():
            kept = Path(directory).expanduser().resolve()
            if target == kept or target in kept.parents or kept in target.parents:
                return f"base_dir={self.base_dir} overlaps {setting}={directory}; choose another base_dir"
        if target.exists() and not target.is_dir():
            return f"base_dir={self.base_dir} is a file; set base_dir to a directory"
        if target.is_dir() and any(target.iterdir()) and not (target / OUTPUT_MARKER_NAME).is_file():
            return (
                f"base_dir={self.base_dir} holds files qalora-tune did not write; set base_dir "
                "to a new directory or to a task-free model qalora_merge wrote"
            )
        return None

    def write_base(
        self, model: nn.Module, layers: Iterable[QALoRALinear], checkpointer: Any, metadata: Any
    ) -> Optional[str]:
        """Before the merge: write the task-free model to ``base_dir``, or check the one
        there against this base. Returns what was done, for the log.

        Args:
            model (nn.Module): the model, adapters loaded and not merged.
            layers (Iterable[QALoRALinear]): its QA-LoRA layers.
            checkpointer: the recipe's ``QALoRACheckpointer``.
            metadata (AdapterConfig): what ``write_merged`` records for the model.

        Raises:
            ValueError: if ``base_dir`` holds a model of another base.
        """
        if self.base_dir is None:
            return None
        if (self.base_dir / "config.json").is_file():
            _, stored = read_merged_base(self.base_dir)
            if fingerprint_layers(stored) != fingerprint_model(model, checkpointer.key_map):
                raise UserValueError(
                    f"base_dir={self.base_dir} holds another base (its codes or scales differ "
                    "from this config's int4 base); set base_dir to this base's task-free "
                    "model or to a new directory"
                )
            return f"checked the task-free base in {self.base_dir}"
        note = {"note": "task-free base written by qalora_merge merged_format=zero_table: no adapter merged"}
        with atomic_directory(self.base_dir, setting="base_dir") as staging:
            with _base_zeros_written(layers), torch.no_grad():
                checkpointer.write_merged(staging, model, metadata, note, BASE_FORMAT)
        return f"wrote the task-free base to {self.base_dir}"

    def write_task(
        self,
        model: nn.Module,
        directory: Path,
        checkpointer: Any,
        report: Dict[str, Any],
        adapter_dir: Path,
    ) -> Dict[str, Any]:
        """After the merge: write the task package into ``directory`` (already checked to
        be new, empty or qalora-tune's). Returns the report with the package's sizes."""
        source = {
            "adapter_dir": str(adapter_dir),
            "base_dir": str(self.base_dir) if self.base_dir else None,
            "base_format": BASE_FORMAT,
            "merge_report": {k: v for k, v in report.items() if k != "definition"},
        }
        metadata = export_task(
            model, directory, key_map=checkpointer.key_map, hf_config=checkpointer.hf_config,
            name=self.name, source=source, overwrite=True, merged_format=BASE_FORMAT,
        )
        size = dict(metadata["size"], shards=1)  # one zero_points.safetensors
        return dict(report, size=size, fingerprint=metadata["base"]["fingerprint"])
