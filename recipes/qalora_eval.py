"""Evaluate a checkpoint: perplexity on text and instruction data, EleutherAI lm-eval tasks.

    tune run qalora_eval --config tinystories656K_qalora_eval                     # merged int4
    tune run qalora_eval --config tinystories656K_qalora_eval checkpoint.kind=full
    tune run qalora_eval --config tiny_qalora_eval checkpoint.kind=adapter

``checkpoint.kind`` picks the model:

- ``full``: the full-precision base of ``checkpointer.checkpoint_dir`` (any format the
  checkpointer reads), in ``dtype`` (fp32 or bf16), through the ``full_precision``
  counterpart of the ``model`` builder;
- ``quantized_base``: the same base quantized as ``model`` says, adapters off (what
  quantization alone costs); a GPTQ base (``model.quantizer=gptq``) is calibrated with
  the config's ``calibration:`` section, which must name its ``dataset``;
- ``adapter``: the quantized base plus ``checkpoint.adapter_dir`` (an ``adapter/`` written
  by ``qalora_finetune``), unmerged; the adapter must match ``model`` and the base; a GPTQ
  base is calibrated again with the settings the adapter recorded (the same data, seed
  and order; equal to the training base up to floating-point summation order);
- ``merged``: ``checkpoint.merged_dir`` (a ``merged_int4/`` written by ``qalora_finetune``
  or ``qalora_merge``), loaded with :func:`qalora_tune.load_merged`; ``model`` and
  ``checkpointer`` are not needed. ``task=PATH`` applies a task package
  (:mod:`qalora_tune.tasks`) to it.

Each dataset of ``datasets`` (``_component_`` entries built with ``tokenizer``; a mapping
of names to entries also works) gives the mean next-token NLL over its labelled tokens,
the perplexity and the token count, over its first ``max_batches`` batches of
``batch_size``: printed one line per dataset and written atomically to
``{output_dir}/eval_results.json``. An optional ``lm_eval`` section runs EleutherAI
lm-evaluation-harness tasks through torchtune's eval wrapper (``pip install lm_eval``).
"""

import contextlib
import difflib
import importlib.util
import json
import time
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from torchtune import training, utils

import qalora_tune
from qalora_tune._compat import get_component_from_path, torchtune_eleuther_wrapper
from qalora_tune.checkpointing import (
    atomic_write_text,
    check_adapter_before_use,
    clean_module_name,
    load_adapter_into,
    read_adapter,
)
from qalora_tune.errors import UserFileNotFoundError, UserValueError
from qalora_tune.modules import QALoRALinear
from qalora_tune.quantization import CALIBRATED_QUANTIZERS
from qalora_tune.recipe_utils import (
    EVAL_KEYS,
    EVAL_SETTINGS,
    Problems,
    calibrate_base,
    calibration_settings,
    check_config,
    check_device,
    check_output_dir,
    check_settings,
    check_tokenizer_fits,
    component_file_problems,
    evaluate_lm,
    instantiate_section,
    load_full_precision,
    resolve_dtype,
    run_recipe,
)
from qalora_tune.tasks import load_merged  # with task= (qalora_tune.tasks)

log = utils.get_logger("INFO")

IGNORE_INDEX = -100
KINDS = ("full", "quantized_base", "adapter", "merged")
RESULTS_NAME = "eval_results.json"
LM_EVAL_MIN_VERSION = "0.4.5"  # what torchtune 0.6.1's eleuther_eval recipe requires

CONFIG_KEYS = EVAL_KEYS  # every top-level key this recipe reads


class QALoRAEvalRecipe:
    """Evaluate one checkpoint (``checkpoint.kind``) on ``datasets`` and ``lm_eval`` tasks.

    Args:
        cfg (DictConfig): see the module docstring and ``configs/*_eval.yaml``.

    Raises:
        ValueError: for an unknown ``checkpoint.kind``, a missing section the kind needs,
            an unsupported ``dtype``, CUDA asked for without one, or ``lm_eval`` tasks
            without lm-evaluation-harness installed.
        FileNotFoundError: for a missing ``checkpoint.adapter_dir`` or ``merged_dir``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        problems = Problems()
        problems.extend(check_settings(cfg, EVAL_SETTINGS))
        problems.raise_if_any()
        problems.check(check_device, cfg.device)
        problems.check(resolve_dtype, cfg.get("dtype"), torch.device("cpu"), ("fp32", "bf16"))
        checkpoint = problems.check(_check_checkpoint, cfg)
        self._task = problems.check(_check_task, cfg)  # task=: qalora_tune.tasks package
        self._lm_eval_cfg = problems.check(_check_lm_eval, cfg.get("lm_eval"))
        problems.check(check_output_dir, cfg.output_dir)
        problems.extend(component_file_problems(cfg.get("tokenizer"), "tokenizer"))
        for name, entry in problems.check(_named_entries, cfg.get("datasets")) or []:
            problems.extend(component_file_problems(entry, f"datasets.{name}"))
        if checkpoint is not None and checkpoint[0] in ("full", "quantized_base", "adapter"):
            checkpointer = problems.check(
                instantiate_section, cfg.checkpointer, "checkpointer", output_dir=str(cfg.output_dir)
            )
            if checkpointer is not None:
                problems.check(checkpointer.check_base_available)
        problems.raise_if_any()
        self._device = utils.get_device(device=cfg.device)
        self._dtype = resolve_dtype(cfg.get("dtype"), self._device, allowed=("fp32", "bf16"))
        self._kind, self._checkpoint_path = checkpoint
        self._batch_size = cfg.get("batch_size", 8)
        self._max_batches = cfg.get("max_batches")
        self._output_dir = Path(cfg.output_dir).expanduser()

    # ------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        """Load the tokenizer, the datasets and the model."""
        start = time.perf_counter()
        self._tokenizer = instantiate_section(cfg.tokenizer, "tokenizer")
        self._datasets = self._setup_datasets(cfg.get("datasets"))  # before the slow part
        if self._kind == "merged":
            self._model = self._setup_merged(self._checkpoint_path)
        else:
            checkpointer = self._setup_checkpointer(cfg.checkpointer)
            if self._kind == "full":
                self._model = self._setup_full_precision(cfg.model, checkpointer)
            else:
                self._model = self._setup_quantized(cfg.model, checkpointer, cfg)
        self._model.eval()
        check_tokenizer_fits(self._tokenizer, self._model)
        # build the harness and load its tasks now: a missing download fails before any work
        self._harness = None
        if self._lm_eval_cfg is not None:
            self._harness = self._setup_lm_eval(self._lm_eval_cfg)
        log.info(
            f"Loaded the {self._kind} model ({self._checkpoint_path}) in "
            f"{time.perf_counter() - start:.1f}s: dtype {self._dtype}, device {self._device}"
        )

    def _setup_checkpointer(self, cfg_checkpointer: DictConfig) -> Any:
        # the checkpointer only reads the base here; its output_dir receives nothing
        checkpointer = instantiate_section(
            cfg_checkpointer, "checkpointer", output_dir=str(self._output_dir)
        )
        checkpointer.check_base_available()
        return checkpointer

    def _setup_full_precision(self, cfg_model: DictConfig, checkpointer: Any) -> nn.Module:
        """The unquantized counterpart of ``model``'s builder, with the base loaded."""
        model, _ = load_full_precision(
            cfg_model._component_, checkpointer, self._device, self._dtype,
            otherwise="another checkpoint.kind",
        )
        return model

    def _setup_quantized(
        self, cfg_model: DictConfig, checkpointer: Any, cfg: DictConfig
    ) -> nn.Module:
        """The QA-LoRA model on the quantized base: adapters off (``quantized_base``) or
        loaded from ``checkpoint.adapter_dir`` (``adapter``). A calibrated (GPTQ) base is
        calibrated here: with the adapter's recorded settings, else ``calibration:``."""
        adapter, metadata = None, None
        if self._kind == "adapter":
            adapter, metadata = read_adapter(self._checkpoint_path, checkpointer.key_map)
            check_adapter_before_use(
                adapter, metadata, self._checkpoint_path, checkpointer.base_fingerprint()
            )
        recorded = metadata.calibration if metadata is not None else None
        if recorded is not None and cfg_model.get("quantizer") in CALIBRATED_QUANTIZERS:
            settings = recorded
        else:
            settings = calibration_settings(cfg)
        with training.set_default_dtype(self._dtype), self._device:
            model = instantiate_section(cfg_model, "model")
        if settings is None:
            checkpointer.load_base(model)
        else:
            calibrate_base(
                model, cfg_model._component_, checkpointer, settings,
                lambda cfg_dataset: instantiate_section(cfg_dataset, "calibration.dataset", self._tokenizer),
                self._device, self._dtype,
            )
        layers = {
            clean_module_name(n): m for n, m in model.named_modules() if isinstance(m, QALoRALinear)
        }
        if self._kind == "quantized_base":
            for layer in layers.values():
                layer.disabled = True
        else:
            load_adapter_into(
                layers, adapter, metadata, self._checkpoint_path,
                checkpointer.base_fingerprint(), bool(cfg_model.get("pad_in_dim", False)),
            )
        return model

    def _setup_merged(self, merged_dir: Path) -> nn.Module:
        return load_merged(merged_dir, device=self._device, dtype=self._dtype, task=self._task)

    def _setup_datasets(self, cfg_datasets: Any) -> Dict[str, DataLoader]:
        """One loader per dataset, in config order, keyed by the dataset's name."""
        entries = _named_entries(cfg_datasets)
        collate = partial(
            get_component_from_path("torchtune.data.padded_collate_sft"),
            padding_idx=self._tokenizer.pad_id,
            ignore_idx=IGNORE_INDEX,
        )
        loaders = {}
        for name, entry in entries:
            dataset = instantiate_section(entry, f"datasets.{name}", self._tokenizer)
            loaders[name] = DataLoader(
                dataset, batch_size=self._batch_size, shuffle=False, collate_fn=collate
            )
        return loaders

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> Dict[str, Any]:
        """Perplexity on every dataset, then the lm-eval tasks; print, write and return
        the results (what ``eval_results.json`` holds)."""
        results: Dict[str, Any] = {
            "checkpoint": {"kind": self._kind, "path": str(self._checkpoint_path)},
            **({"task": str(self._task)} if self._task else {}),
            "dtype": str(self._dtype).removeprefix("torch."),
            "device": str(self._device),
            "batch_size": self._batch_size,
            "max_batches": self._max_batches,
            "datasets": {},
            "versions": {"qalora_tune": qalora_tune.__version__, "torch": torch.__version__},
        }
        task = f" with task {self._task}" if self._task else ""
        print(f"qalora_eval: {self._kind} ({self._checkpoint_path}){task}, {results['dtype']}")
        for name, loader in self._datasets.items():
            start = time.perf_counter()
            metrics = evaluate_lm(self._model, loader, self._device, max_batches=self._max_batches)
            row = {
                "nll": metrics["loss"],
                "perplexity": metrics["perplexity"],
                "tokens": metrics["tokens"],
                "accuracy": metrics["accuracy"],
                "seconds": round(time.perf_counter() - start, 3),
            }
            results["datasets"][name] = row
            print(
                f"  {name:<36} nll {row['nll']:<10.6g} perplexity {row['perplexity']:<10.6g} "
                f"tokens {row['tokens']:>8,}"
            )
        path = atomic_write_text(self._output_dir / RESULTS_NAME, _json_text(results))
        if self._harness is not None:  # the perplexities are on disk if a task fails
            results["lm_eval"] = self._run_lm_eval(*self._harness)
            atomic_write_text(path, _json_text(results))
        print(f"  results: {path}")
        return results

    def _setup_lm_eval(self, cfg_lm_eval: DictConfig) -> Tuple[Any, Dict[str, Any], DictConfig]:
        """torchtune's EleutherAI eval wrapper around the model, and the loaded tasks."""
        from lm_eval.tasks import TaskManager, get_task_dict

        tasks = list(cfg_lm_eval.tasks)
        with _offline_hint("build torchtune's lm-eval wrapper"):
            wrapper = torchtune_eleuther_wrapper()(
                self._model,
                _HarnessTokenizer(self._tokenizer),
                device=self._device,
                max_seq_length=cfg_lm_eval.get("max_seq_length", 4096),
                batch_size=cfg_lm_eval.get("batch_size", self._batch_size),
                dtype=self._dtype,
                enable_kv_cache=cfg_lm_eval.get("enable_kv_cache", True),
            )
        with _offline_hint(f"load the lm_eval tasks {tasks}"):
            manager = TaskManager(include_path=cfg_lm_eval.get("include_path"))
            task_dict = get_task_dict(tasks, manager)
        return wrapper, task_dict, cfg_lm_eval

    def _run_lm_eval(
        self, wrapper: Any, task_dict: Dict[str, Any], cfg_lm_eval: DictConfig
    ) -> Dict[str, Any]:
        """Run the tasks; print lm_eval's table and return its results."""
        from lm_eval.evaluator import evaluate
        from lm_eval.utils import make_table

        tasks = list(cfg_lm_eval.tasks)
        start = time.perf_counter()
        with _offline_hint(f"run the lm_eval tasks {tasks}"):
            output = evaluate(wrapper, task_dict, limit=cfg_lm_eval.get("limit"))
        log.info(f"lm_eval tasks {tasks} done in {time.perf_counter() - start:.1f}s")
        print(make_table(output))
        return {
            "tasks": tasks,
            "limit": cfg_lm_eval.get("limit"),
            "results": json.loads(json.dumps(output.get("results", {}), default=str)),
        }

    def cleanup(self) -> None:
        """Nothing is held open: kept for torchtune's recipe shape."""


# ---------------------------------------------------------------------- config checks


def _check_checkpoint(cfg: DictConfig) -> Tuple[str, Optional[Path]]:
    """``checkpoint.kind`` and the directory it evaluates (the base's for ``full`` and
    ``quantized_base``).

    Raises:
        ValueError: for an unknown kind, or a section the kind needs that is missing.
        FileNotFoundError: for a missing adapter or merged directory.
    """
    section = cfg.get("checkpoint") or {}
    kind = section.get("kind")
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserValueError(
            f"checkpoint.kind={kind!r} is not one of {', '.join(KINDS)}{hint}; set "
            "checkpoint.kind to the checkpoint to evaluate"
        )
    if kind == "merged":
        merged_dir = section.get("merged_dir")
        return kind, _existing_dir(merged_dir, "checkpoint.merged_dir", "merged_int4")
    missing = [name for name in ("model", "checkpointer") if cfg.get(name) is None]
    if missing:
        raise UserValueError(
            f"checkpoint.kind={kind} needs the {' and '.join(missing)} section(s) of the "
            "training config (the base checkpoint and how it is quantized)"
        )
    if kind == "adapter":
        return kind, _existing_dir(section.get("adapter_dir"), "checkpoint.adapter_dir", "adapter")
    return kind, Path(cfg.checkpointer.checkpoint_dir).expanduser()


def _check_task(cfg: DictConfig) -> Optional[Path]:
    """``task`` (a task package for the merged model), or None.

    Raises:
        ValueError: with a kind other than ``merged``, or a package that does not exist.
    """
    if not cfg.get("task"):
        return None
    if cfg.checkpoint.get("kind") != "merged":
        raise UserValueError(
            "task= applies a task package to a merged model; set checkpoint.kind=merged "
            "(checkpoint.merged_dir: the base) or drop task"
        )
    task = Path(str(cfg.task)).expanduser()
    if not task.is_dir():
        raise UserFileNotFoundError(
            f"task={task} does not exist; set task to a task package directory (qalora-tune "
            "export-task, or tune run qalora_merge ... merged_format=zero_table)"
        )
    return task


def _existing_dir(value: Optional[str], setting: str, produced: str) -> Path:
    if not value:
        raise UserValueError(f"set {setting} to the {produced}/ directory of a training run")
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise UserFileNotFoundError(
            f"{setting}={path} does not exist; train first (tune run qalora_finetune ...) or "
            f"set {setting} to an epoch_{{k}}/{produced} directory"
        )
    return path


def _named_entries(cfg_datasets: Any) -> List[Tuple[str, DictConfig]]:
    """``(name, component entry)`` per dataset. A list's entries are named after their
    file (or builder) and split: ``tinyshakespeare_train:validation``; a mapping's keys
    are the names."""
    if cfg_datasets is None or len(cfg_datasets) == 0:
        raise UserValueError("datasets is empty; list at least one dataset _component_ to evaluate on")
    if OmegaConf.is_dict(cfg_datasets) and "_component_" not in cfg_datasets:
        return [(str(name), entry) for name, entry in cfg_datasets.items()]
    entries = list(cfg_datasets) if OmegaConf.is_list(cfg_datasets) else [cfg_datasets]
    named: List[Tuple[str, DictConfig]] = []
    seen: Dict[str, int] = {}
    for entry in entries:
        base = Path(str(entry.get("path"))).stem if entry.get("path") else (
            str(entry._component_).rsplit(".", 1)[-1]
        )
        name = f"{base}:{entry.split}" if entry.get("split") else base
        seen[name] = seen.get(name, 0) + 1
        named.append((name if seen[name] == 1 else f"{name}#{seen[name]}", entry))
    return named


def _check_lm_eval(cfg_lm_eval: Optional[DictConfig]) -> Optional[DictConfig]:
    """The ``lm_eval`` section when it names tasks and lm-evaluation-harness can run them.

    Raises:
        ValueError: if tasks are set and ``lm_eval`` is not installed (or too old).
    """
    if cfg_lm_eval is None or not cfg_lm_eval.get("tasks"):
        return None
    tasks = list(cfg_lm_eval.tasks)
    advice = (
        "install it with `pip install lm_eval` (>= "
        f"{LM_EVAL_MIN_VERSION}); it downloads each task's dataset from the Hugging Face Hub, "
        "so on a machine without network the datasets (and the gpt2 files torchtune's eval "
        "wrapper loads) must be in the Hugging Face cache already, with HF_DATASETS_OFFLINE=1 "
        "and HF_HUB_OFFLINE=1 set; or set lm_eval=null"
    )
    if importlib.util.find_spec("lm_eval") is None:
        raise UserValueError(
            f"lm_eval.tasks={tasks} needs EleutherAI's lm-evaluation-harness, which is not "
            f"installed: {advice}"
        )
    from packaging.version import Version

    try:
        installed = version("lm_eval")
    except PackageNotFoundError:
        installed = "0"
    if Version(installed) < Version(LM_EVAL_MIN_VERSION):
        raise UserValueError(f"lm_eval {installed} is installed, too old for lm_eval.tasks: {advice}")
    return cfg_lm_eval


# ---------------------------------------------------------------------- helpers


def _json_text(payload: Dict[str, Any]) -> str:
    return json.dumps(payload, indent=2) + "\n"


class _HarnessTokenizer:
    """The tokenizer as torchtune's lm-eval wrapper uses it: ``encode``/``decode``,
    ``pad_id``, ``eos_id`` and ``stop_tokens`` (``[eos_id]`` when the tokenizer has none)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        if name == "_tokenizer":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self._tokenizer, name)

    @property
    def stop_tokens(self) -> List[int]:
        return list(getattr(self._tokenizer, "stop_tokens", None) or [self._tokenizer.eos_id])


@contextlib.contextmanager
def _offline_hint(action: str) -> Iterator[None]:
    """Turn a download that failed (no network, or offline mode and nothing cached) into
    a one-line error saying what must be cached."""
    try:
        yield
    except OSError as error:  # ConnectionError, HF's offline errors, missing cache files
        raise UserValueError(
            f"lm_eval could not {action} ({type(error).__name__}: {error}); without network, "
            "download the task datasets (and gpt2, which torchtune's wrapper loads) into the "
            "Hugging Face cache first and set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1, or set "
            "lm_eval=null"
        ) from None


def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run qalora_eval --config NAME_OR_PATH [key=value ...]``."""
    check_config(cfg, CONFIG_KEYS, "qalora_eval")
    recipe = QALoRAEvalRecipe(cfg)
    recipe.setup(cfg)
    recipe.evaluate()
    recipe.cleanup()


def main(argv: Optional[List[str]] = None) -> None:
    """Parse the command line (a packaged config name or a path), then run the recipe."""
    run_recipe("qalora_eval", recipe_main, argv)


if __name__ == "__main__":
    main()
