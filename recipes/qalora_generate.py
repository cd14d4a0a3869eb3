"""Generate text from a merged int4 QA-LoRA model with torchtune's generation utilities.

    tune run qalora_generate --config tiny_qalora_generate
    tune run qalora_generate --config tinystories656K_qalora_generate prompt="Once upon a time" max_new_tokens=64
    tune run qalora_generate --config tinystories656K_qalora_generate merged_dir=/models/base_int4 task=/tasks/shakespeare

The model comes from ``merged_dir`` (a ``merged_int4/`` directory written by
``qalora_finetune`` or ``qalora_merge``) through :func:`qalora_tune.load_merged`: a
torchtune decoder whose linears are torchao int4 tensors (CPU int4 kernel or CUDA
tinygemm), run with a KV cache by ``torchtune.generation.generate``.
"""

import time
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import DictConfig, ListConfig
from torchtune import generation, utils

from qalora_tune.recipe_utils import (
    GENERATE_KEYS,
    GENERATE_SETTINGS,
    Problems,
    check_config,
    check_device,
    check_settings,
    check_tokenizer_fits,
    component_file_problems,
    instantiate_section,
    resolve_dtype,
    run_recipe,
)
from qalora_tune.tasks import load_merged  # with task= (qalora_tune.tasks)

log = utils.get_logger("INFO")

CONFIG_KEYS = GENERATE_KEYS  # every top-level key this recipe reads


class QALoRAGenerateRecipe:
    """Load ``merged_dir`` and complete ``prompt`` (a string or a list of strings).

    Args:
        cfg (DictConfig): ``merged_dir`` (and optionally ``task``, a task package applied
            to it), ``tokenizer``, ``prompt``, ``max_new_tokens``,
            ``temperature``, ``top_k``, ``seed``, ``device`` and ``dtype`` (null: the
            stored dtype).

    Raises:
        FileNotFoundError: for a missing ``merged_dir``.
        ValueError: for CUDA asked for without one, an unsupported ``dtype``, or a
            tokenizer with more ids than the model's embedding table.
    """

    def __init__(self, cfg: DictConfig) -> None:
        problems = Problems()
        problems.extend(check_settings(cfg, GENERATE_SETTINGS))
        problems.raise_if_any()
        problems.check(check_device, cfg.device)
        if cfg.get("dtype"):
            problems.check(resolve_dtype, cfg.dtype, torch.device("cpu"))
        self._merged_dir = Path(cfg.merged_dir).expanduser()
        if not self._merged_dir.is_dir():
            problems.add(
                f"merged_dir={self._merged_dir} does not exist; train first (tune run "
                "qalora_finetune ...) or set merged_dir to a merged_int4/ directory"
            )
        # task=: a task package (qalora_tune.tasks) whose zero points replace merged_dir's
        self._task = Path(cfg.task).expanduser() if cfg.get("task") else None
        if self._task is not None and not self._task.is_dir():
            problems.add(
                f"task={self._task} does not exist; set task to a task package directory "
                "(qalora-tune export-task, or tune run qalora_merge ... merged_format=zero_table)"
            )
        problems.extend(component_file_problems(cfg.get("tokenizer"), "tokenizer"))
        problems.raise_if_any()
        self._device = utils.get_device(device=cfg.device)
        self._dtype = resolve_dtype(cfg.dtype, self._device) if cfg.get("dtype") else None
        self._rng = torch.Generator(self._device).manual_seed(cfg.get("seed") or 0)

    def setup(self, cfg: DictConfig) -> None:
        """Load the merged model and the tokenizer."""
        start = time.perf_counter()
        self._model = load_merged(
            self._merged_dir, device=self._device, dtype=self._dtype, task=self._task
        )
        self._tokenizer = instantiate_section(cfg.tokenizer, "tokenizer")
        check_tokenizer_fits(self._tokenizer, self._model)
        task = f" with task {self._task}" if self._task else ""
        log.info(f"Loaded {self._merged_dir}{task} in {time.perf_counter() - start:.1f}s")

    @torch.inference_mode()
    def generate(self, cfg: DictConfig) -> List[str]:
        """Complete every prompt; print and return the completions."""
        prompts = cfg.prompt if isinstance(cfg.prompt, (list, ListConfig)) else [cfg.prompt]
        dtype = next(p.dtype for p in self._model.parameters() if p.is_floating_point())
        completions = []
        for prompt in prompts:
            ids = self._tokenizer.encode(str(prompt), add_bos=True, add_eos=False)
            tokens = torch.tensor([ids], device=self._device)
            with self._device:
                self._model.setup_caches(
                    batch_size=1, dtype=dtype, decoder_max_seq_len=len(ids) + cfg.max_new_tokens
                )
            start = time.perf_counter()
            output, _ = generation.generate(
                self._model,
                tokens,
                max_generated_tokens=cfg.max_new_tokens,
                pad_id=self._tokenizer.pad_id,
                temperature=cfg.temperature,
                top_k=cfg.get("top_k"),
                stop_tokens=[self._tokenizer.eos_id],
                rng=self._rng,
            )
            seconds = time.perf_counter() - start
            self._model.reset_caches()
            new_tokens = output[0, len(ids):].tolist()
            if self._tokenizer.eos_id in new_tokens:  # generate() pads after the stop token
                new_tokens = new_tokens[: new_tokens.index(self._tokenizer.eos_id)]
            text = self._tokenizer.decode(new_tokens)
            completions.append(text)
            print(f"{prompt}{text}")
            log.info(f"{len(new_tokens)} tokens in {seconds:.2f}s ({len(new_tokens) / seconds:.1f} tokens/s)")
        return completions


def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run qalora_generate --config NAME_OR_PATH [key=value ...]``."""
    check_config(cfg, CONFIG_KEYS, "qalora_generate")
    recipe = QALoRAGenerateRecipe(cfg)
    recipe.setup(cfg)
    recipe.generate(cfg)


def main(argv: Optional[List[str]] = None) -> None:
    """Parse the command line (a packaged config name or a path), then run the recipe."""
    run_recipe("qalora_generate", recipe_main, argv)


if __name__ == "__main__":
    main()
