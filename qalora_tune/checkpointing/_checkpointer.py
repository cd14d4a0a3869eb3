"""QALoRACheckpointer: load a full-precision base; save adapters, the merged int4 model and
resumable state."""

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn
from torchtune import utils

from qalora_tune._memory import peak_rss_bytes

from qalora_tune._files import is_regular_file_inside, read_json
from qalora_tune.checkpointing._adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    read_adapter,
    write_adapter,
)
from qalora_tune.checkpointing._adapter_config import AdapterConfig, as_adapter_config
from qalora_tune.checkpointing._atomic import atomic_directory
from qalora_tune.checkpointing._formats import (
    check_checkpoint_format,
    find_checkpoint_files,
    load_checkpoint_weights,
    read_checkpoint_config,
)
from qalora_tune.checkpointing._hf_keys import HFKeyMap
from qalora_tune.checkpointing._hf_weights import read_hf_config
from qalora_tune.checkpointing._merged_formats import choose_merged_format, runs_on
from qalora_tune.checkpointing._merged_int4 import (
    MERGE_REPORT_NAME,
    MERGED_DIR_NAME,
    write_merged_int4,
)
from qalora_tune.checkpointing._safetensors_io import parse_size
from qalora_tune.errors import UserFileNotFoundError, UserValueError

log = utils.get_logger("INFO")

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "OUTPUT_MARKER_NAME",
    "PROGRESS_NAME",
    "RUN_CONFIG_NAME",
    "QALoRACheckpointer",
    "RECIPE_STATE_NAME",
]

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tiny_tokenizer.json",
)
RECIPE_STATE_NAME = "recipe_state.pt"
PROGRESS_NAME = "progress.json"
RUN_CONFIG_NAME = "config.yaml"
OUTPUT_MARKER_NAME = ".qalora-tune-output"
"""Marks a directory qalora-tune wrote (a merged model), so it may be replaced later."""
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FORMAT_NAMES = {"hf": "Hugging Face", "meta": "Meta", "torchtune": "torchtune"}



class QALoRACheckpointer:
    """Reads the base checkpoint and writes QA-LoRA outputs under ``output_dir``.

    Loading streams the base checkpoint into a model built by a QA-LoRA builder, one
    tensor at a time, so each linear is quantized as its weight arrives. Three formats are
    read, as torchtune's checkpointers do: ``hf`` (safetensors or ``.bin`` with a
    ``config.json``, keys converted by torchtune for ``model_type``), ``meta`` (Meta's
    ``consolidated.00.pth``, keys converted by torchtune's ``meta_to_tune``) and
    ``torchtune`` (``.pt``/``.bin``/``.safetensors`` already in torchtune's keys, optionally
    wrapped as ``{"model": state_dict}``). Saving writes, per epoch::

        {output_dir}/epoch_{k}/adapter/adapter_model.safetensors   PEFT layout
        {output_dir}/epoch_{k}/adapter/adapter_config.json         PEFT LoraConfig + "qalora_tune"
        {output_dir}/epoch_{k}/merged_int4/                         transformers TorchAoConfig model
        {output_dir}/epoch_{k}/recipe_state.pt      (optimizer, scheduler, data order, RNG)
        {output_dir}/epoch_{k}/progress.json        (epoch, global step: which is newest)

    and, every ``save_every_n_steps`` optimizer steps inside an epoch, a resumable
    ``{output_dir}/step_{n}/`` (adapter, recipe state, progress; no merged model) of which
    only the newest is kept. Every directory is written through a temporary directory
    renamed into place, so one that exists is complete (see
    :mod:`qalora_tune.checkpointing._adapter` and ``_merged_int4``).

    Args:
        checkpoint_dir (str): directory of the base checkpoint.
        model_type (str): torchtune model type naming the Hugging Face key layout:
            ``LLAMA2``, ``LLAMA3``, ``LLAMA3_2``, ``MISTRAL`` or ``QWEN2`` (only the ``hf``
            format depends on it).
        output_dir (str): where epochs are saved.
        checkpoint_files (List[str], optional): weight files in ``checkpoint_dir``; by
            default, per format: every ``*.safetensors`` (else ``*.bin``) file for ``hf``,
            the ``*.pth`` file for ``meta``, every ``*.pt`` (else ``*.bin``, else
            ``*.safetensors``) file for ``torchtune``.
        hf_repo_id (str, optional): the Hugging Face repository the base comes from, used
            to print the ``tune download`` command when the weights are missing.
        resume_from_checkpoint (bool): load the newest saved checkpoint's adapter and
            state (an ``epoch_{k}`` or ``step_{n}``, whichever is further on).
        checkpoint_format (str): ``"hf"`` (default), ``"meta"`` or ``"torchtune"``.
            ``config.json`` is required for ``hf`` only: the model builder fixes the sizes.
        max_shard_size (int or str): bytes per file of ``merged_int4/`` at most (default
            ``"5GB"``, as Hugging Face): a larger model is written as
            ``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json``.

    Raises:
        ValueError: if ``checkpoint_format`` is not one of those values, or
            ``max_shard_size`` is not a size.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        model_type: str,
        output_dir: str,
        checkpoint_files: Optional[List[str]] = None,
        hf_repo_id: Optional[str] = None,
        resume_from_checkpoint: bool = False,
        checkpoint_format: str = "hf",
        max_shard_size: Union[int, str] = "5GB",
    ):
        check_checkpoint_format(checkpoint_format)
        self.max_shard_size = parse_size(max_shard_size, "checkpointer.max_shard_size")
        self.checkpoint_format = checkpoint_format
        self.checkpoint_dir = Path(checkpoint_dir).expanduser()
        self.model_type = model_type
        self.output_dir = Path(output_dir).expanduser()
        self.checkpoint_files = list(checkpoint_files) if checkpoint_files else None
        self.hf_repo_id = hf_repo_id
        self.resume_from_checkpoint = resume_from_checkpoint
        self.run_config: Optional[str] = None
        """The run's resolved config as YAML, written as ``config.yaml`` in every checkpoint."""

    # ------------------------------------------------------------------ base weights

    def download_command(self) -> Optional[str]:
        """The ``tune download`` command that fetches the base, when its repo is known
        (``hf`` and ``meta`` formats; Hub repositories hold no ``torchtune`` checkpoints)."""
        if not self.hf_repo_id or self.checkpoint_format == "torchtune":
            return None
        ignore = "original/consolidated*" if self.checkpoint_format == "hf" else "*.safetensors"
        command = (
            f"tune download {self.hf_repo_id} --output-dir {self.checkpoint_dir} "
            f'--ignore-patterns "{ignore}"'
        )
        if self.hf_repo_id.startswith("meta-llama/"):
            command += " --hf-token <HF_TOKEN>"  # Meta's repositories are gated
        return command

    def check_base_available(self) -> None:
        """Fail early, naming the command that fetches the weights, if they are missing.

        Raises:
            FileNotFoundError: if the weight files (or, for ``hf``, ``config.json``) are
                absent.
            ValueError: if the directory holds another format's weights instead.
        """
        try:
            find_checkpoint_files(
                self.checkpoint_dir, self.checkpoint_files, self.checkpoint_format
            )
            read_checkpoint_config(self.checkpoint_dir, self.checkpoint_format)
        except FileNotFoundError as error:
            command = self.download_command()
            hint = (
                f"; fetch them with: {command}"
                if command
                else "; set checkpointer.checkpoint_dir to a directory holding a "
                f"{_FORMAT_NAMES[self.checkpoint_format]} checkpoint"
            )
            raise UserFileNotFoundError(f"base model weights missing ({error}){hint}") from None

    def load_base(self, model: nn.Module) -> Dict[str, Any]:
        """Stream the base checkpoint into ``model`` (quantizing its int4 layers).

        Returns:
            Dict[str, Any]: the checkpoint's config: ``config.json`` (``hf``; for
            ``torchtune`` when present), Meta's ``params.json`` when present, else ``{}``.

        Raises:
            FileNotFoundError: if the base is missing (see :meth:`check_base_available`).
            ValueError: if the checkpoint does not match the model or the format.
        """
        self.check_base_available()
        config = read_checkpoint_config(self.checkpoint_dir, self.checkpoint_format)
        paths = find_checkpoint_files(
            self.checkpoint_dir, self.checkpoint_files, self.checkpoint_format
        )
        start = time.perf_counter()
        load_checkpoint_weights(model, paths, self.checkpoint_format, self.model_type, config)
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in paths)
        self.last_load = {"bytes": size, "seconds": seconds, "files": len(paths)}
        utils.log_rank_zero(
            log,
            f"Read and quantized {size / 1e9:.2f} GB from {len(paths)} file(s) in "
            f"{seconds:.1f}s ({size / 1e9 / max(seconds, 1e-9):.3f} GB/s); peak RSS "
            f"{peak_rss_bytes() / 2**30:.2f} GiB",
        )
        return config

    @property
    def hf_config(self) -> Dict[str, Any]:
        """The base's Hugging Face ``config.json``.

        Raises:
            FileNotFoundError: if ``checkpoint_dir`` has none (a Meta or torchtune base):
                the adapter and the merged model are written under Hugging Face names.
        """
        try:
            return read_hf_config(self.checkpoint_dir)
        except FileNotFoundError:
            raise UserFileNotFoundError(
                f"{self.checkpoint_dir / 'config.json'} not found: the adapter and the merged "
                "int4 model are written in Hugging Face layout, which needs the model's "
                "Hugging Face config.json; copy it into checkpointer.checkpoint_dir"
            ) from None

    @property
    def key_map(self) -> HFKeyMap:
        """torchtune <-> Hugging Face names of this base (adapter and merged model use HF's)."""
        return HFKeyMap(self.model_type, self.hf_config)

    def base_fingerprint(self) -> str:
        """A cheap identity of the base: sha256 over ``config.json`` and ``params.json``
        (those present) and, per weight file, its name, size and first and last MiB (a
        changed weight file changes its header or data; the whole files are not hashed,
        which would take minutes for 7B)."""
        digest = hashlib.sha256()
        for name in ("config.json", "params.json"):
            if (self.checkpoint_dir / name).is_file():
                digest.update((self.checkpoint_dir / name).read_bytes())
        paths = find_checkpoint_files(
            self.checkpoint_dir, self.checkpoint_files, self.checkpoint_format
        )
        for path in paths:
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as handle:
                digest.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                digest.update(handle.read(1 << 20))
        return digest.hexdigest()

    # ------------------------------------------------------------------ epochs

    def epoch_dir(self, epoch: int) -> Path:
        return self.output_dir / f"epoch_{epoch}"

    def step_dir(self, global_step: int) -> Path:
        return self.output_dir / f"step_{global_step}"

    def _saved_dirs(self, pattern: "re.Pattern") -> List[Path]:
        if not self.output_dir.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.output_dir.iterdir()
            if p.is_dir() and (m := pattern.match(p.name))
        ]
        return [p for _, p in sorted(found)]

    def latest_epoch_dir(self) -> Optional[Path]:
        """The newest complete ``epoch_{k}`` directory, or None."""
        epochs = self._saved_dirs(_EPOCH_DIR)
        return epochs[-1] if epochs else None

    def latest_checkpoint_dir(self) -> Optional[Path]:
        """The resumable checkpoint (``epoch_{k}`` or ``step_{n}`` with recipe state) that
        is furthest on in training, or None."""
        candidates = [
            p
            for p in self._saved_dirs(_EPOCH_DIR) + self._saved_dirs(_STEP_DIR)
            if (p / RECIPE_STATE_NAME).is_file()
        ]
        if not candidates:
            return None
        # furthest global step; at equal steps an epoch (it also has merged_int4/), then
        # the higher epoch number (checkpoints written before progress.json existed)
        return max(
            candidates,
            key=lambda p: (_global_step(p), p.name.startswith("epoch_"), int(p.name.split("_")[1])),
        )

    def save_checkpoint(
        self,
        epoch: int,
        adapters: Mapping[str, nn.Module],
        adapter_metadata: AdapterConfig,
        recipe_state: Optional[Dict[str, Any]] = None,
        merged_model: Optional[nn.Module] = None,
        merge_report: Optional[Dict[str, Any]] = None,
        merged_format: str = "auto",
        finish_merged: Optional[Callable[[Path], None]] = None,
    ) -> Path:
        """Write ``epoch_{epoch}/`` atomically and return its path; step checkpoints up to
        this point are then removed.

        Args:
            epoch (int): epoch index (0-based).
            adapters (Mapping[str, nn.Module]): the QALoRALinear layers by torchtune name.
            adapter_metadata (Dict[str, Any]): JSON-serialisable adapter description (see
                :func:`~qalora_tune.checkpointing._adapter.write_adapter`); its ``"model"``
                entry (builder and arguments without adapters) goes to ``merged_int4/``.
            recipe_state (Dict[str, Any], optional): optimizer, scheduler, progress, data
                order and RNG state for resuming; its ``"progress"`` entry (a small
                JSON-serialisable dict with ``global_step``) is also written to
                ``progress.json``.
            merged_model (nn.Module, optional): the model with its adapters merged: written
                as ``merged_int4/``.
            merge_report (Dict[str, Any], optional): the measured merge deviation, written
                with the file sizes to ``merged_int4/merge_report.json``.
            merged_format (str): see :meth:`write_merged`.
            finish_merged (Callable[[Path], None], optional): called with the staging
                ``merged_int4/`` once it is written (e.g. a GGUF export into it), inside
                the atomic write.
        """
        final = self.epoch_dir(epoch)
        self._write(
            final, adapters, adapter_metadata, recipe_state, merged_model, merge_report,
            merged_format, finish_merged,
        )
        self._remove_step_dirs(keep=None)
        return final

    def save_step_checkpoint(
        self,
        global_step: int,
        adapters: Mapping[str, nn.Module],
        adapter_metadata: AdapterConfig,
        recipe_state: Dict[str, Any],
    ) -> Path:
        """Write the mid-epoch checkpoint ``step_{global_step}/`` (adapter and recipe
        state) atomically, then remove older step checkpoints; returns its path."""
        final = self.step_dir(global_step)
        self._write(final, adapters, adapter_metadata, recipe_state)
        self._remove_step_dirs(keep=final)
        return final

    def _write(
        self,
        final: Path,
        adapters: Mapping[str, nn.Module],
        adapter_metadata: AdapterConfig,
        recipe_state: Optional[Dict[str, Any]],
        merged_model: Optional[nn.Module] = None,
        merge_report: Optional[Dict[str, Any]] = None,
        merged_format: str = "auto",
        finish_merged: Optional[Callable[[Path], None]] = None,
    ) -> None:
        with atomic_directory(final) as staging:
            adapter_dir = staging / "adapter"
            adapter_dir.mkdir()
            write_adapter(adapter_dir, adapters, self.key_map, adapter_metadata)
            if merged_model is not None:
                merged_dir = staging / MERGED_DIR_NAME
                merged_dir.mkdir()
                self.write_merged(
                    merged_dir, merged_model, adapter_metadata, merge_report, merged_format
                )
                if finish_merged is not None:
                    finish_merged(merged_dir)
            if recipe_state is not None:
                torch.save(recipe_state, staging / RECIPE_STATE_NAME)
                progress = recipe_state.get("progress")
                if progress is not None:
                    (staging / PROGRESS_NAME).write_text(json.dumps(progress, indent=2))
            if self.run_config is not None:
                (staging / RUN_CONFIG_NAME).write_text(self.run_config)

    def _remove_step_dirs(self, keep: Optional[Path]) -> None:
        for path in self._saved_dirs(_STEP_DIR):
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    def write_merged(
        self,
        directory: Path,
        merged_model: nn.Module,
        adapter_metadata: AdapterConfig,
        merge_report: Optional[Dict[str, Any]] = None,
        merged_format: str = "auto",
    ) -> Dict[str, Any]:
        """Write a merged model into the existing ``directory`` (see ``save_checkpoint``).

        Args:
            directory (Path): an existing (staging) directory.
            merged_model (nn.Module): the model with its adapters merged.
            adapter_metadata (AdapterConfig): the adapter's description (its ``model``
                entry is written to ``qalora_tune.json``).
            merge_report (Dict[str, Any], optional): the measured merge deviation.
            merged_format (str): ``auto``, ``intx``, ``int4_tile_packed``, ``int4_plain`` or
                ``gguf`` (``auto``'s format; the GGUF file is the caller's), see
                :mod:`qalora_tune.checkpointing._merged_formats`.

        Returns:
            Dict[str, Any]: the merge report with the measured sizes and format added.
        """
        # merged_int4/ holds dense scales (8-bit ones decoded): it loads as a plain int4 base
        adapter_metadata = as_adapter_config(adapter_metadata)
        model_spec = dict(adapter_metadata.model)
        if "double_quant_scales" in model_spec:
            model_spec["double_quant_scales"] = False
        spec = {
            "model": model_spec,
            "model_type": self.model_type,
            "adapter": {
                k: getattr(adapter_metadata, k) for k in ("rank", "alpha", "group_size", "bits")
            },
        }
        device = next(merged_model.parameters()).device
        chosen = choose_merged_format(merged_format, merged_model, device)
        sizes = write_merged_int4(
            merged_model, directory, self.key_map, self.hf_config, spec, chosen,
            self.max_shard_size,
        )
        self.copy_tokenizer_files(directory)
        where = runs_on(chosen, merged_model)
        if chosen == "int4_plain":
            log.warning(
                f"merged_format=int4_plain runs {where}; merged_format=intx runs in stock "
                "transformers on any device"
            )
        report = dict(merge_report or {}, size=sizes, format=chosen, runs_on=where)
        (directory / MERGE_REPORT_NAME).write_text(json.dumps(report, indent=2))
        (directory / OUTPUT_MARKER_NAME).write_text(
            json.dumps({"written_by": "qalora_tune", "kind": "merged_int4"}) + "\n"
        )
        return report

    def load_resume_state(self) -> Dict[str, Any]:
        """The newest checkpoint's adapter weights (torchtune names, bit for bit), adapter
        description and recipe state (see :meth:`latest_checkpoint_dir`).

        Raises:
            FileNotFoundError: if there is no saved checkpoint with recipe state to resume
                from.
        """
        latest = self.latest_checkpoint_dir()
        if latest is None:
            raise UserFileNotFoundError(
                f"resume_from_checkpoint=True but {self.output_dir} has no saved epoch_* or "
                f"step_* checkpoint with {RECIPE_STATE_NAME}; set resume_from_checkpoint=False "
                "to start fresh, or output_dir to the interrupted run's directory"
            )
        adapter, metadata = read_adapter(latest / "adapter", self.key_map)
        return {
            "path": latest,
            "adapter": adapter,
            "adapter_config": metadata,
            "recipe_state": load_recipe_state(latest / RECIPE_STATE_NAME),
        }

    def copy_tokenizer_files(self, destination: Path) -> List[str]:
        """Copy the base's tokenizer files (if any) into ``destination``.

        Only regular files inside ``checkpoint_dir`` are copied (see
        :func:`~qalora_tune._files.is_regular_file_inside`): a link to a file elsewhere is
        skipped with a warning, never followed out of the base directory.

        Returns:
            List[str]: the names skipped.
        """
        skipped = []
        for name in TOKENIZER_FILES:
            source = self.checkpoint_dir / name
            if not (source.exists() or source.is_symlink()):
                continue
            if not is_regular_file_inside(source, self.checkpoint_dir):
                skipped.append(name)
                log.warning(
                    f"not copying {source}: it is not a regular file inside "
                    f"checkpointer.checkpoint_dir (a link to {os.path.realpath(source)}); copy "
                    "the file itself into the base directory to ship it with the outputs"
                )
                continue
            shutil.copyfile(source, destination / name)
        return skipped


def _global_step(checkpoint: Path) -> int:
    """The global step recorded in ``checkpoint/progress.json`` (-1 when absent)."""
    progress = read_json(
        checkpoint / PROGRESS_NAME, "the checkpoint's progress file", required=False,
        fix=f"delete {checkpoint} to resume from the checkpoint before it",
    )
    step = (progress or {}).get("global_step", -1)
    if isinstance(step, bool) or not isinstance(step, int):
        raise UserValueError(
            f"{checkpoint / PROGRESS_NAME} has global_step={step!r}, not an integer; delete "
            f"{checkpoint} to resume from the checkpoint before it"
        )
    return step


def load_recipe_state(path: Path) -> Dict[str, Any]:
    """A saved recipe state, read with ``torch.load(weights_only=True)``: tensors, numbers,
    strings and containers only, so the file cannot run code.

    Raises:
        UserFileNotFoundError: if it is missing.
        UserValueError: if it is truncated, corrupt, or holds anything but plain data.
    """
    if not path.is_file():
        raise UserFileNotFoundError(
            f"{path} not found; the checkpoint is incomplete: delete {path.parent} to resume "
            "from the one before it, or set resume_from_checkpoint=False"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError (refused object), RuntimeError (truncated)
        reason = " ".join(str(error).split())[:200]
        raise UserValueError(
            f"{path} cannot be read as a recipe state ({type(error).__name__}: {reason}); it "
            f"is truncated, corrupt or not written by qalora_finetune: delete {path.parent} to "
            "resume from the checkpoint before it, or set resume_from_checkpoint=False"
        ) from None
    if not isinstance(state, dict):
        raise UserValueError(
            f"{path} holds a {type(state).__name__}, not a recipe state; delete "
            f"{path.parent} or set resume_from_checkpoint=False"
        )
    return state
