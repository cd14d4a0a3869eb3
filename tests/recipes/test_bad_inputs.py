"""The bad-input catalogue: hostile and careless inputs to every recipe and loader.

Each case asserts that the run ends with a non-zero status and ONE line
``<recipe>: error: ...`` (no traceback) that names the setting or file to change, and that
every file that existed before is byte-identical afterwards (the recipes' lock files,
``.qalora-tune.lock`` and ``.<merged_dir>.lock``, excepted: they are rewritten by design).
Planted payloads (a pickle that runs code, a model description naming ``os.system``)
would write a marker file; the marker must never appear.

Most cases run the recipe in this process (``main(argv)``, as ``tune run`` does), which
takes milliseconds for a refusal; the few that need a real process (Ctrl-C, a second
concurrent run, a file size limit, kill -9) start ``tune run``. Marked ``heavy``: the
whole catalogue takes a few minutes (``-m "not heavy"`` skips it).
"""

import importlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence

import pytest
import torch
from safetensors.torch import load_file, save_file

from qalora_tune import load_merged
from qalora_tune.errors import UserError
from qalora_tune.tiny import TinyTokenizer, prepare_tiny_base

pytestmark = pytest.mark.heavy

ROOT = Path(__file__).resolve().parents[2]
TUNE = str(Path(sys.executable).with_name("tune"))
HERE = Path(__file__).resolve().parent
requires_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
LOCKS = (".qalora-tune.lock",)


# ---------------------------------------------------------------------- harness


def _tune_run(recipe, *args, cwd=ROOT, timeout=300, preexec_fn=None, env=None):
    environment = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}")
    environment.update(env or {})
    result = subprocess.run(
        [TUNE, "run", recipe, *map(str, args)],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout,
        preexec_fn=preexec_fn,
    )
    return Outcome(result.returncode, result.stderr)


class Outcome(NamedTuple):
    code: int
    stderr: str

    @property
    def returncode(self) -> int:
        return self.code


def _run_inline(recipe: str, args: Sequence[str], capsys) -> Outcome:
    """``tune run recipe args...`` in this process."""
    module = importlib.import_module(recipe)
    argv = sys.argv[:]
    capsys.readouterr()
    code = 0
    try:
        module.main([recipe, *map(str, args)])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return Outcome(code, capsys.readouterr().err)


def _error_line(outcome, *named, recipe="qalora_finetune", code=1) -> str:
    """The one-line error, checked: the status, one line of the recipe's prefix, last,
    no traceback, and each of ``named`` in it."""
    assert outcome.code == code, outcome.stderr[-3000:]
    stderr = outcome.stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    prefix = f"{recipe}: {'interrupted' if code == 130 else 'error'}: "
    flagged = [line for line in lines if line.startswith(f"{recipe}: ")]
    assert len(flagged) == 1 and lines[-1] == flagged[0], stderr[-3000:]
    assert flagged[0].startswith(prefix), flagged[0]
    for text in named:
        assert str(text) in flagged[0], (text, flagged[0])
    return flagged[0]


def _snapshot(directory: Path):
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base in Hugging Face layout (a short pretraining: its quality is not tested)."""
    directory = tmp_path_factory.mktemp("tiny") / "base"
    prepare_tiny_base(str(directory), seed=0, steps=20, max_seconds=10, num_validation=50, log=None)
    return directory


def _args(base: Path, out: Path, *overrides) -> List[str]:
    return [
        "--config", "tiny_qalora",
        f"output_dir={out}",
        f"prepare_base.checkpoint_dir={base}",
        f"checkpointer.checkpoint_dir={base}",
        f"tokenizer.path={base / 'tiny_tokenizer.json'}",
        "max_steps_per_epoch=2",
        "dataset.num_examples=64",
        "validation.dataset.num_examples=32",
        "validation.batch_size=32",
        "validation.max_batches=1",
        "validation.full_precision_baseline=False",
        "merge_probe_size=2",
        *overrides,
    ]


def _plain_args(base: Path, out: Path, *overrides) -> List[str]:
    """``_args`` without ``prepare_base`` (so a broken base is not re-made)."""
    return [a for a in _args(base, out, *overrides) if not a.startswith("prepare_base")] + [
        "~prepare_base"
    ]


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A finished one-epoch run (``epoch_0`` with adapter, merged_int4, recipe state)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = _tune_run("qalora_finetune", *_args(base, out, "save_every_n_steps=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


class Workspace:
    """Copies of the fixtures a case may damage, under one directory whose files are all
    compared before and after the run."""

    def __init__(self, root: Path, base: Path, trained: Optional[Path] = None):
        self.root = root
        self.base = root / "base"
        shutil.copytree(base, self.base)
        self.out = root / "out"
        self.run = root / "run"
        if trained is not None:
            shutil.copytree(trained, self.run)
            self.adapter = self.run / "epoch_0" / "adapter"
            self.merged = self.run / "epoch_0" / "merged_int4"

    def snapshot(self):
        """Every file's bytes, and every directory but the run's own output directories
        (created once a run starts, with its lock file)."""
        outputs = {"out", "eval_out", "merge_out"}
        directories = sorted(
            str(p.relative_to(self.root)) for p in self.root.rglob("*")
            if p.is_dir() and p.relative_to(self.root).parts[0] not in outputs
        )
        return _snapshot(self.root), directories


def _check(outcome, ws: Workspace, before, *named, recipe="qalora_finetune", code=1) -> str:
    line = _error_line(outcome, *named, recipe=recipe, code=code)
    assert ws.snapshot() == before, "a file that existed before was changed or removed"
    return line


# ---------------------------------------------------------------------- 1. settings of fine-tuning


FLOOR_SCHEDULE = "qalora_tune.recipe_utils.get_cosine_schedule_with_floor"

FINETUNE_SETTINGS = [
    ("batch_size-text", ["batch_size=abc"], ["batch_size='abc' is not a positive integer"]),
    ("batch_size-zero", ["batch_size=0"], ["batch_size=0 is not a positive integer"]),
    ("batch_size-float", ["batch_size=2.5"], ["batch_size=2.5", "positive integer"]),
    ("batch_size-bool", ["batch_size=true"], ["batch_size=True", "positive integer"]),
    ("batch_size-null", ["batch_size=null"], ["batch_size is null"]),
    ("lr-text", ["optimizer.lr=fast"], ["optimizer.lr='fast' is not a positive number"]),
    ("lr-negative", ["optimizer.lr=-1e-3"], ["optimizer.lr=-0.001 is not a positive number"]),
    ("lr-zero", ["optimizer.lr=0"], ["optimizer.lr=0", "positive number"]),
    ("lr-nan", ["optimizer.lr=.nan"], ["optimizer.lr=nan", "positive number"]),
    ("lr-list", ["optimizer.lr=[1,2]"], ["optimizer.lr=[1, 2]", "positive number"]),
    ("weight_decay-negative", ["optimizer.weight_decay=-0.1"], ["optimizer.weight_decay=-0.1"]),
    ("seed-text", ["seed=abc"], ["seed='abc' is not a non-negative integer"]),
    ("seed-negative", ["seed=-3"], ["seed=-3", "non-negative integer"]),
    ("epochs-zero", ["epochs=0"], ["epochs=0 is not a positive integer"]),
    ("epochs-text", ["epochs=many"], ["epochs='many'"]),
    ("clip-text", ["clip_grad_norm=abc"], ["clip_grad_norm='abc' is not a positive number or null"]),
    ("clip-negative", ["clip_grad_norm=-1"], ["clip_grad_norm=-1"]),
    ("log_every-zero", ["log_every_n_steps=0"], ["log_every_n_steps=0 is not a positive integer"]),
    ("max_steps-zero", ["max_steps_per_epoch=0"], ["max_steps_per_epoch=0"]),
    ("accumulation-zero", ["gradient_accumulation_steps=0"], ["gradient_accumulation_steps=0"]),
    ("save_every-zero", ["save_every_n_steps=0"], ["save_every_n_steps=0"]),
    ("probe-negative", ["merge_probe_size=-1"], ["merge_probe_size=-1", "non-negative integer"]),
    ("merged_format-zero_table", ["merged_format=zero_table"],
     ["merged_format='zero_table' is not one of auto"]),  # task packages: qalora_merge only
    ("shard-size-text", ["checkpointer.max_shard_size=big"],
     ["checkpointer.max_shard_size='big' is not a size", "e.g. 5GB"]),
    ("shard-size-zero", ["checkpointer.max_shard_size=0"], ["checkpointer.max_shard_size=0 is not a size"]),
    # the tiny builder has no num_layers: named as such (the big builders check it is >= 1, tests/models)
    ("num_layers-zero", ["model.num_layers=0"], ["model.num_layers is not an argument of qalora_tiny_llama"]),
    ("shuffle-text", ["shuffle=maybe"], ["shuffle='maybe' is not True or False"]),
    ("compile-int", ["compile=3"], ["compile=3 is not True or False"]),
    ("resume-text", ["resume_from_checkpoint=yes please"], ["resume_from_checkpoint='yes please'"]),
    ("warmup-negative", ["lr_scheduler.num_warmup_steps=-5"], ["lr_scheduler.num_warmup_steps=-5"]),
    ("floor-above-one", [f"lr_scheduler._component_={FLOOR_SCHEDULE}", "lr_scheduler.min_lr_ratio=1.5"],
     ["lr_scheduler.min_lr_ratio=1.5 is not a number in [0, 1]", "e.g. 0.1"]),
    ("floor-text", [f"lr_scheduler._component_={FLOOR_SCHEDULE}", "lr_scheduler.min_lr_ratio=low"],
     ["lr_scheduler.min_lr_ratio='low' is not a number in [0, 1]"]),
    ("floor-on-torchtune-cosine",
     ["lr_scheduler._component_=torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
      "lr_scheduler.min_lr_ratio=0.1"], ["lr_scheduler.min_lr_ratio is not an argument"]),
    ("val_batch-zero", ["validation.batch_size=0"], ["validation.batch_size=0"]),
    ("val_batches-text", ["validation.max_batches=all"], ["validation.max_batches='all'"]),
    ("device-gpu", ["device=gpu"], ["device='gpu' is not a device: cpu, cuda or cuda:N"]),
    ("device-index", ["device=cuda:x"], ["device='cuda:x'"]),
    ("dtype-int8", ["dtype=int8"], ["dtype=int8 is not supported here", "fp32, bf16"]),
    ("dtype-fp64", ["dtype=fp64"], ["dtype=fp64 is not supported here", "set dtype"]),
    ("dtype-fp16", ["dtype=fp16"], ["dtype=fp16 is not supported here", "bf16"]),
    ("output_dir-empty", ["output_dir="], ["output_dir", "non-empty text"]),
    ("resume-and-overwrite", ["resume_from_checkpoint=True", "overwrite=True"],
     ["contradict each other"]),
    ("resume-nothing", ["resume_from_checkpoint=True"],
     ["resume_from_checkpoint=True but output_dir=", "holds no epoch_* or step_* checkpoint"]),
    ("unknown-key", ["learning_rate=1"], ["unknown config key learning_rate"]),
    ("misspelled-key", ["epoch=2"], ["unknown config key epoch", "did you mean epochs?"]),
    ("misspelled-component", ["model._component_=qalora_tune.tiny.qalora_tiny_lama"],
     ["cannot be imported", "did you mean qalora_tune.tiny.qalora_tiny_llama?"]),
    ("moved-component", ["model._component_=qalora_tune.models.qalora_tiny_llama"],
     ["has moved to qalora_tune.tiny.qalora_tiny_llama"]),
    ("unknown-argument", ["model.lora_rnk=4"], ["model.lora_rnk is not an argument", "lora_rank"]),
    ("several-problems", ["batch_size=0", "epochs=-1", "shuffle=2"],
     ["3 problems: (1) batch_size=0", "(2) epochs=-1", "(3) shuffle=2"]),
]


@pytest.mark.parametrize("overrides, named", [c[1:] for c in FINETUNE_SETTINGS],
                         ids=[c[0] for c in FINETUNE_SETTINGS])
def test_finetune_settings(base, tmp_path, capsys, overrides, named):
    ws = Workspace(tmp_path, base)
    before = ws.snapshot()
    _check(_run_inline("qalora_finetune", _args(ws.base, ws.out, *overrides), capsys), ws, before, *named)
    assert not ws.out.exists() or not any(p.name.startswith("epoch_") for p in ws.out.iterdir())


MODEL_KNOBS = [
    ("rank-zero", ["model.lora_rank=0"], ["model.lora_rank", "set model.lora_rank"]),
    ("rank-text", ["model.lora_rank=big"], ["model.lora_rank='big'"]),
    ("alpha-negative", ["model.lora_alpha=-1"], ["model.lora_alpha", "set model.lora_alpha"]),
    ("dropout-one", ["model.lora_dropout=1.0"], ["model.lora_dropout", "set model.lora_dropout"]),
    ("bits-five", ["model.bits=5"], ["model.bits=5 is not a supported bit width; choose from 2, 3, 4, 8"]),
    ("group-zero", ["model.group_size=0"], ["model.group_size=0 is not a positive integer"]),
    ("group-not-dividing", ["model.group_size=256", "model.pad_in_dim=False"],
     ["model.group_size=256", "in_dim=128", "model.pad_in_dim=True"]),
    ("quantizer-unknown", ["model.quantizer=awq"], ["model.quantizer='awq' is not a base quantizer"]),
    ("targets-unknown", ["model.lora_attn_modules=[q_proj,query]"], ["model.lora_attn_modules"]),
    ("double-quant-text", ["model.double_quant_scales=sometimes"], ["model.double_quant_scales"]),
    # an 8-bit (intx) base padded to whole groups has no merged file layout: refused before training
    ("padded-intx-merge", ["model.bits=8", "model.group_size=48", "model.pad_in_dim=True"],
     ["cannot hold linears padded to whole groups", "set merged_format=int4_plain"]),
    ("format-for-intx", ["model.bits=8", "merged_format=int4_tile_packed"],
     ["merged_format=int4_tile_packed holds int4 kernel bases", "set merged_format=intx"]),
]


@pytest.mark.parametrize("overrides, named", [c[1:] for c in MODEL_KNOBS], ids=[c[0] for c in MODEL_KNOBS])
def test_model_knobs(base, tmp_path, capsys, overrides, named):
    ws = Workspace(tmp_path, base)
    before = ws.snapshot()
    _check(_run_inline("qalora_finetune", _args(ws.base, ws.out, *overrides), capsys), ws, before, *named)


# ---------------------------------------------------------------------- 2. the command line and the YAML


def _write(path: Path, data) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


CONFIG_FILES = [
    ("broken-yaml", "output_dir: /tmp/x\nmodel: [unclosed\n", ["is not valid YAML", "line"]),
    ("tab-indent", "model:\n\t_component_: x\n", ["is not valid YAML"]),
    ("empty", "", ["is empty"]),
    ("comments-only", "# nothing\n", ["is empty"]),
    ("a-list", "- 1\n- 2\n", ["holds a YAML list, not a mapping"]),
    ("a-scalar", "just text\n", ["holds a YAML str, not a mapping"]),
    ("duplicate-key", "epochs: 1\nepochs: 2\n", ["cannot be read"]),
    ("not-utf8", b"output_dir: \xff\xfe\n", ["is not UTF-8 text"]),
    ("config-key", "config: other.yaml\n", ["must not set 'config'"]),
]


@pytest.mark.parametrize("content, named", [c[1:] for c in CONFIG_FILES], ids=[c[0] for c in CONFIG_FILES])
def test_config_files_that_are_not_configs(tmp_path, capsys, content, named):
    path = _write(tmp_path / "my.yaml", content)
    before = _snapshot(tmp_path)
    outcome = _run_inline("qalora_finetune", ["--config", path], capsys)
    _error_line(outcome, f"--config {path}", *named)
    assert _snapshot(tmp_path) == before


COMMAND_LINES = [
    ("no-config", [], ["no --config given"]),
    ("config-without-value", ["--config"], ["--config needs a value"]),
    ("unknown-name", ["--config", "llama9_qalora"], ["--config 'llama9_qalora' is neither a file nor a packaged config"]),
    ("unknown-flag", ["--config", "tiny_qalora", "--epochs", "2"], ["unknown option --epochs"]),
    ("no-equals", ["--config", "tiny_qalora", "epochs"], ["'epochs' is not an override; write key=value"]),
    ("bad-key", ["--config", "tiny_qalora", "two words=1"], ["does not start with a setting name"]),
    ("remove-unknown", ["--config", "tiny_qalora", "~validation.nothing"], ["cannot remove validation.nothing"]),
    ("remove-component", ["--config", "tiny_qalora", "~model._component_"], ["cannot remove"]),
    ("bad-interpolation", ["--config", "tiny_qalora", "output_dir=${nowhere}/x"],
     ["cannot be resolved in output_dir", "nowhere"]),
]


@pytest.mark.parametrize("args, named", [c[1:] for c in COMMAND_LINES], ids=[c[0] for c in COMMAND_LINES])
def test_command_lines(capsys, args, named):
    _error_line(_run_inline("qalora_finetune", args, capsys), *named)


# ---------------------------------------------------------------------- 3. the base checkpoint


def _rewrite_base_tensor(ws: Workspace, change: Callable[[dict], None]) -> None:
    path = ws.base / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _nan_in_mlp(tensors):
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")


def _inf_in_norm(tensors):
    tensors["model.norm.weight"][0] = float("inf")


def _wrong_q_shape(tensors):
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()


def _wrong_mlp_shape(tensors):
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key][:-1].contiguous()


def _extra_tensor(tensors):
    tensors["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)


def _missing_tensor(tensors):
    del tensors["model.layers.1.mlp.up_proj.weight"]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BASE_FILES = [
    ("nan-weight", lambda ws: _rewrite_base_tensor(ws, _nan_in_mlp),
     ["model.layers.1.mlp.down_proj.weight holds 1 NaN or infinite value", "download it again"]),
    ("inf-norm", lambda ws: _rewrite_base_tensor(ws, _inf_in_norm), ["model.norm.weight holds 1 NaN"]),
    ("q-shape", lambda ws: _rewrite_base_tensor(ws, _wrong_q_shape),
     ["model.layers.0.self_attn.q_proj.weight: checkpoint shape (128, 127)", "model._component_"]),
    ("mlp-shape", lambda ws: _rewrite_base_tensor(ws, _wrong_mlp_shape),
     ["model.layers.0.mlp.up_proj.weight", "checkpoint shape (255, 128) does not match the model's (256, 128)"]),
    ("extra-tensor", lambda ws: _rewrite_base_tensor(ws, _extra_tensor),
     ["holds weights this model does not have", "model.layers.7"]),
    ("missing-tensor", lambda ws: _rewrite_base_tensor(ws, _missing_tensor),
     ["lacks weights the model needs", "layers.1.mlp.w3.weight"]),
    ("truncated", lambda ws: _truncate(ws.base / "model.safetensors"),
     ["model.safetensors cannot be read", "truncated or corrupt"]),
    ("garbage-weights", lambda ws: _write(ws.base / "model.safetensors", os.urandom(4096)),
     ["model.safetensors cannot be read"]),
    ("empty-weights", lambda ws: _write(ws.base / "model.safetensors", b""),
     ["model.safetensors cannot be read"]),
    ("no-weights", lambda ws: (ws.base / "model.safetensors").unlink(),
     ["base model weights missing", "checkpointer.checkpoint_dir"]),
    ("config-json-broken", lambda ws: _write(ws.base / "config.json", "{not json"),
     ["config.json is not valid JSON"]),
    ("config-json-list", lambda ws: _write(ws.base / "config.json", "[1, 2]"),
     ["config.json holds a JSON list, not an object"]),
    ("config-json-heads", lambda ws: _write(
        ws.base / "config.json",
        json.dumps({k: v for k, v in json.loads((ws.base / "config.json").read_text()).items()
                    if k != "num_attention_heads"})),
     ["num_attention_heads=None, not a positive integer"]),
    ("config-json-missing", lambda ws: (ws.base / "config.json").unlink(),
     ["config.json not found"]),
    ("pickle-bin", lambda ws: (
        (ws.base / "model.safetensors").unlink(),
        _write(ws.base / "pytorch_model.bin", pickle.dumps({"a": 1}))),
     ["pytorch_model.bin cannot be read", "truncated or corrupt"]),
]


@pytest.mark.parametrize("damage, named", [c[1:] for c in BASE_FILES], ids=[c[0] for c in BASE_FILES])
def test_damaged_base_checkpoints(base, tmp_path, capsys, damage, named):
    ws = Workspace(tmp_path, base)
    damage(ws)
    before = ws.snapshot()
    _check(_run_inline("qalora_finetune", _plain_args(ws.base, ws.out), capsys), ws, before, *named)


BASE_SETTINGS = [
    ("model-type-unknown", ["checkpointer.model_type=LLAMA"], ["checkpointer.model_type='LLAMA' is not supported"]),
    ("model-type-wrong", ["checkpointer.model_type=QWEN2"], ["set checkpointer.model_type to LLAMA2"]),
    ("format-unknown", ["checkpointer.checkpoint_format=gguf"], ["checkpointer.checkpoint_format='gguf' is not supported"]),
    ("format-meta", ["checkpointer.checkpoint_format=meta"], ["checkpointer.checkpoint_format='hf'"]),
    ("files-missing", ["checkpointer.checkpoint_files=[nothere.safetensors]"], ["nothere.safetensors"]),
    ("another-model", ["model._component_=qalora_tune.models.qalora_tinystories656k",
                       "model.apply_lora_to_output=False"],
     ["model.embed_tokens.weight", "(57, 128)", "(2048, 128)", "model._component_"]),
    ("dir-missing", ["checkpointer.checkpoint_dir=/no/such/place/base"], ["base model weights missing"]),
]


@pytest.mark.parametrize("overrides, named", [c[1:] for c in BASE_SETTINGS], ids=[c[0] for c in BASE_SETTINGS])
def test_base_settings(base, tmp_path, capsys, overrides, named):
    ws = Workspace(tmp_path, base)
    before = ws.snapshot()
    _check(_run_inline("qalora_finetune", _plain_args(ws.base, ws.out, *overrides), capsys), ws, before, *named)


# ---------------------------------------------------------------------- 4. tokenizer and data


def _tokenizer_file(ws: Workspace, content) -> List[str]:
    path = _write(ws.root / "tok.json", content)
    return [f"tokenizer.path={path}"]


def _text_dataset(ws: Workspace, content) -> List[str]:
    path = _write(ws.root / "data.txt", content)
    return [
        "dataset._component_=qalora_tune.data.text_file_dataset", f"dataset.path={path}",
        "~dataset.num_examples", "~dataset.seed", "dataset.block_size=16",
        "~validation",
    ]


def _json_dataset(ws: Workspace, content) -> List[str]:
    path = _write(ws.root / "data.json", content)
    return [
        "dataset._component_=qalora_tune.data.instruct_json_dataset", f"dataset.path={path}",
        "~dataset.num_examples", "~dataset.seed", "~validation",
    ]


DATA_FILES = [
    ("tokenizer-not-json", lambda ws: _tokenizer_file(ws, "not json at all"), ["tokenizer.path", "is not valid JSON"]),
    ("tokenizer-not-utf8", lambda ws: _tokenizer_file(ws, b"\x89PNG\r\n\x1a\n\x00"), ["is not UTF-8 text"]),
    ("tokenizer-other-format", lambda ws: _tokenizer_file(ws, '{"format": "sentencepiece"}'),
     ["is not a tiny tokenizer file"]),
    ("tokenizer-missing", lambda ws: ["tokenizer.path=/no/such/place/tok.json"],
     ["tokenizer.path=/no/such/place/tok.json not found"]),
    ("tokenizer-directory", lambda ws: [f"tokenizer.path={ws.root}"], ["tokenizer.path=", "is a directory"]),
    ("tokenizer-too-large", lambda ws: _tokenizer_file(
        ws, json.dumps({"format": "qalora_tune.tiny_tokenizer", "version": 1,
                        "special_tokens": ["<pad>", "<bos>", "<eos>"],
                        "alphabet": TinyTokenizer().alphabet + "ABCDEFGH"})),
     ["tokenizer.path", "65 token ids", "57 rows"]),
    ("text-not-utf8", lambda ws: _text_dataset(ws, b"hello \xff\xfe world\n" * 50), ["dataset.path", "is not UTF-8 text"]),
    ("text-missing", lambda ws: _text_dataset(ws, "x") + ["dataset.path=/no/such/place.txt"],
     ["dataset.path=/no/such/place.txt not found"]),
    ("text-too-short", lambda ws: _text_dataset(ws, "x"), ["dataset.path", "too short to split"]),
    ("json-broken", lambda ws: _json_dataset(ws, '[{"instruction": "a",'), ["is not valid JSON"]),
    ("json-not-records", lambda ws: _json_dataset(ws, '{"instruction": "a"}'), ["must hold a list of records"]),
    ("json-no-field", lambda ws: _json_dataset(ws, json.dumps([{"question": "a", "output": "b"}] * 80)),
     ["has no 'instruction' field"]),
    ("dataset-unknown-argument", lambda ws: ["dataset.num_exampels=5"], ["dataset.num_exampels is not an argument"]),
    ("dataset-zero-examples", lambda ws: ["dataset.num_examples=0"], ["num_examples"]),
]


@pytest.mark.parametrize("make, named", [c[1:] for c in DATA_FILES], ids=[c[0] for c in DATA_FILES])
def test_tokenizer_and_data_files(base, tmp_path, capsys, make, named):
    ws = Workspace(tmp_path, base)
    overrides = make(ws)
    before = ws.snapshot()
    _check(_run_inline("qalora_finetune", _plain_args(ws.base, ws.out, *overrides), capsys), ws, before, *named)


def test_preflight_reports_every_problem_at_once(tmp_path, capsys):
    """The headline command on a CPU machine without the weights: CUDA, the download and
    the tokenizer in one line (not one problem per run)."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = tmp_path / "out"
    line = _error_line(_run_inline(
        "qalora_finetune",
        ["--config", "llama2_7B_qalora", f"output_dir={out}",
         f"checkpointer.checkpoint_dir={tmp_path / 'Llama-2-7b-hf'}",
         f"tokenizer.path={tmp_path / 'Llama-2-7b-hf' / 'tokenizer.model'}"],
        capsys,
    ), "3 problems", "device=cuda but CUDA is not available", "tune download meta-llama/Llama-2-7b-hf",
        "tokenizer.path=")
    assert "set device=cpu" in line


# ---------------------------------------------------------------------- 5. output directories


def test_a_used_output_dir_is_refused_and_kept(base, trained, tmp_path, capsys):
    ws = Workspace(tmp_path, base, trained)
    before = ws.snapshot()
    line = _check(_run_inline("qalora_finetune", _args(ws.base, ws.run), capsys), ws, before,
                  f"output_dir={ws.run} already holds a run (epoch_0, summary.json)")
    for way in ("resume_from_checkpoint=True", "set output_dir to a new directory", "overwrite=True"):
        assert way in line


def test_overwrite_replaces_the_previous_run_whole(base, trained, tmp_path):
    ws = Workspace(tmp_path, base, trained)
    (ws.run / "epoch_1").mkdir()  # a stale later epoch of the old run
    (ws.run / "epoch_1" / "marker").write_text("old")
    result = _tune_run("qalora_finetune", *_args(ws.base, ws.run, "overwrite=True"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in ws.run.iterdir() if p.name.startswith("epoch_")) == ["epoch_0"]
    assert json.loads((ws.run / "summary.json").read_text())["outputs"] == str(ws.run / "epoch_0")


def test_output_dir_under_a_file(base, tmp_path, capsys):
    ws = Workspace(tmp_path, base)
    _write(tmp_path / "file", "x")
    before = ws.snapshot()
    _check(_run_inline("qalora_finetune", _args(ws.base, tmp_path / "file" / "out"), capsys), ws, before,
           "is not writable", "set output_dir")


def test_output_dir_that_cannot_be_created(base, tmp_path, capsys):
    if not Path("/sys").is_dir():
        pytest.skip("needs /sys (not writable, even by root)")
    _error_line(_run_inline("qalora_finetune", _args(base, Path("/sys/qalora-tune-x")), capsys),
                "output_dir=/sys/qalora-tune-x is not writable", "set output_dir")


def test_a_second_concurrent_run_fails_at_start_naming_the_first(base, tmp_path):
    ws = Workspace(tmp_path, base)
    first = subprocess.Popen(
        [TUNE, "run", "qalora_finetune", *_args(ws.base, ws.out, "max_steps_per_epoch=1000",
                                                "dataset.num_examples=20000", "save_merged_int4=False")],
        cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        lock = ws.out / ".qalora-tune.lock"
        deadline = time.time() + 240
        while time.time() < deadline and not (lock.is_file() and str(first.pid) in lock.read_text()):
            time.sleep(0.5)
        assert lock.is_file(), "the first run never took its lock"
        second = _tune_run("qalora_finetune", *_args(ws.base, ws.out))
        _error_line(second, f"output_dir={ws.out} is in use by another run",
                    f"pid {first.pid}", "set output_dir to another directory")
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def test_ctrl_c_prints_one_line_with_the_resume_command(base, tmp_path):
    ws = Workspace(tmp_path, base)
    run = subprocess.Popen(
        [TUNE, "run", "qalora_finetune", *_args(ws.base, ws.out, "max_steps_per_epoch=2000",
                                                "dataset.num_examples=64000", "save_every_n_steps=2",
                                                "log_every_n_steps=1")],
        cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 600  # generous: a loaded 2-core machine
    while time.time() < deadline and not any(ws.out.glob("step_*")):
        time.sleep(0.5)
    assert any(ws.out.glob("step_*")), "no step checkpoint was written"
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=300)
    outcome = Outcome(run.returncode, stderr)
    line = _error_line(outcome, "stopped at global step", "the last checkpoint is", str(ws.out / "step_"),
                       "resume with: tune run qalora_finetune", "resume_from_checkpoint=True", code=130)
    assert line.count("resume_from_checkpoint=True") == 1


# ---------------------------------------------------------------------- 6. resuming


def _planted_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"progress": Payload()})


def _resume_args(ws: Workspace, *overrides):
    return _args(ws.base, ws.run, "epochs=2", "resume_from_checkpoint=True", *overrides)


def _latest(ws: Workspace) -> Path:
    return ws.run / "epoch_0"


RESUMES = [
    ("recipe-state-pickle-payload", lambda ws, marker: _write_pickle_payload(ws, marker),
     ["recipe_state.pt cannot be read as a recipe state", "UnpicklingError"]),
    ("recipe-state-truncated", lambda ws, marker: _truncate(_latest(ws) / "recipe_state.pt", 0.3),
     ["recipe_state.pt cannot be read as a recipe state"]),
    ("recipe-state-garbage", lambda ws, marker: _write(_latest(ws) / "recipe_state.pt", b"garbage" * 10),
     ["recipe_state.pt cannot be read"]),
    ("recipe-state-list", lambda ws, marker: torch.save([1, 2], _latest(ws) / "recipe_state.pt"),
     ["holds a list, not a recipe state"]),
    ("recipe-state-keys", lambda ws, marker: torch.save({"progress": {}}, _latest(ws) / "recipe_state.pt"),
     ["does not hold the recipe state this run needs"]),
    ("progress-broken", lambda ws, marker: _write(_latest(ws) / "progress.json", "{oops"),
     ["progress.json is not valid JSON"]),
    ("progress-step-text", lambda ws, marker: _write(_latest(ws) / "progress.json", '{"global_step": "two"}'),
     ["global_step='two', not an integer"]),
    ("adapter-config-broken", lambda ws, marker: _write(_latest(ws) / "adapter" / "adapter_config.json", "{"),
     ["adapter_config.json is not valid JSON"]),
    ("adapter-rank-lie", lambda ws, marker: _edit_adapter_config(_latest(ws) / "adapter", rank=4),
     ["rank=4 and this config gives rank=8; set model.lora_rank back"]),
    ("adapter-rank-type", lambda ws, marker: _edit_adapter_config(_latest(ws) / "adapter", rank="eight"),
     ["qalora_tune.rank='eight', not a positive integer"]),
    ("adapter-nan", lambda ws, marker: _nan_adapter(_latest(ws) / "adapter"),
     ["NaN or infinite"]),
    ("adapter-truncated", lambda ws, marker: _truncate(_latest(ws) / "adapter" / "adapter_model.safetensors"),
     ["adapter_model.safetensors cannot be read", "truncated or corrupt"]),
    ("another-rank", lambda ws, marker: ["model.lora_rank=4"],
     ["rank=8 and this config gives rank=4; set model.lora_rank back"]),
    ("another-group-size", lambda ws, marker: ["model.group_size=64"],
     ["group_size=32 and this config gives group_size=64"]),
]


def _write_pickle_payload(ws: Workspace, marker: Path) -> None:
    # torch.save's zip layout with a pickle that calls os.system when fully unpickled
    torch.save({"progress": 0}, _latest(ws) / "recipe_state.pt")
    import zipfile

    path = _latest(ws) / "recipe_state.pt"
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    data_name = next(n for n in entries if n.endswith("data.pkl"))
    entries[data_name] = _planted_pickle(marker)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def _edit_adapter_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["qalora_tune"].update(changes)
    path.write_text(json.dumps(config))


def _nan_adapter(adapter: Path) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("damage, named", [c[1:] for c in RESUMES], ids=[c[0] for c in RESUMES])
def test_resuming_damaged_or_foreign_checkpoints(base, trained, tmp_path, capsys, damage, named):
    ws = Workspace(tmp_path, base, trained)
    for step in ws.run.glob("step_*"):
        shutil.rmtree(step)
    marker = tmp_path.parent / f"{tmp_path.name}-payload-ran"
    overrides = damage(ws, marker) or []
    overrides = overrides if isinstance(overrides, list) else []
    before = ws.snapshot()
    _check(_run_inline("qalora_finetune", _resume_args(ws, *overrides), capsys), ws, before, *named)
    assert not marker.exists(), "a planted payload ran"


# ---------------------------------------------------------------------- 7. merging


def _merge_args(ws: Workspace, *overrides):
    return [
        "--config", "tiny_qalora", f"output_dir={ws.root / 'merge_out'}", "~prepare_base",
        f"checkpointer.checkpoint_dir={ws.base}", f"tokenizer.path={ws.base / 'tiny_tokenizer.json'}",
        f"adapter_dir={ws.adapter}", "merge_probe_size=2",
        "dataset.num_examples=64", "validation.dataset.num_examples=32", *overrides,
    ]


MERGES = [
    ("into-the-adapter", lambda ws: [f"merged_dir={ws.adapter}"], ["merged_dir=", "is adapter_dir="]),
    ("into-a-parent", lambda ws: [f"merged_dir={ws.run}"], ["contains adapter_dir="]),
    ("into-the-base", lambda ws: [f"merged_dir={ws.base}"], ["is checkpointer.checkpoint_dir="]),
    ("inside-the-base", lambda ws: [f"merged_dir={ws.base / 'merged'}"], ["lies inside checkpointer.checkpoint_dir="]),
    ("foreign-directory", lambda ws: (
        (ws.root / "photos").mkdir(), _write(ws.root / "photos" / "cat.jpg", b"meow"),
        [f"merged_dir={ws.root / 'photos'}"])[-1],
     ["holds files qalora-tune did not write (cat.jpg)"]),
    ("merged-dir-is-a-file", lambda ws: (_write(ws.root / "file", "x"), [f"merged_dir={ws.root / 'file'}"])[-1],
     ["is a file"]),
    ("no-adapter-dir", lambda ws: ["adapter_dir=/no/such/place/adapter"], ["adapter_dir=/no/such/place/adapter does not exist"]),
    ("adapter-dir-unset", lambda ws: ["adapter_dir=null"], ["adapter_dir is null"]),
    ("adapter-config-broken", lambda ws: (_write(ws.adapter / "adapter_config.json", "{]"), [])[-1],
     ["adapter_config.json is not valid JSON"]),
    ("adapter-config-not-ours", lambda ws: (_write(ws.adapter / "adapter_config.json", '{"r": 8}'), [])[-1],
     ["is not a qalora-tune adapter"]),
    ("adapter-rank-lie", lambda ws: (_edit_adapter_config(ws.adapter, rank=4), ["model.lora_rank=4"])[-1],
     ["do not fit rank=4"]),
    ("adapter-truncated", lambda ws: (_truncate(ws.adapter / "adapter_model.safetensors"), [])[-1],
     ["adapter_model.safetensors cannot be read"]),
    ("adapter-nan", lambda ws: (_nan_adapter(ws.adapter), [])[-1], ["NaN or infinite values", "cannot be merged"]),
    ("another-base", lambda ws: (_rewrite_base_tensor(ws, lambda t: t["model.norm.weight"].mul_(2)), [])[-1],
     ["was trained on another base checkpoint", "checkpointer.checkpoint_dir"]),
    ("another-group-size", lambda ws: ["model.group_size=64"], ["group_size=32 but the model has group_size=64"]),
    ("another-model", lambda ws: ["model._component_=qalora_tune.models.qalora_tinystories656k",
                                  "model.apply_lora_to_output=False"],
     ["model.embed_tokens.weight"]),
    ("probe-size-text", lambda ws: ["merge_probe_size=some"], ["merge_probe_size='some'"]),
    ("unknown-key", lambda ws: ["merge_dir=/tmp/x"], ["unknown config key merge_dir", "did you mean merged_dir?"]),
    # task packages (merged_format=zero_table, qalora_tune.tasks)
    ("format-unknown", lambda ws: ["merged_format=zip"], ["merged_format='zip' is not one of", "zero_table"]),
    ("base-dir-without-zero-table", lambda ws: [f"base_dir={ws.root / 'b'}"],
     ["base_dir is read only with merged_format=zero_table"]),
    ("task-name-without-zero-table", lambda ws: ["task_name=poems"],
     ["task_name is read only with merged_format=zero_table"]),
    ("base-dir-foreign", lambda ws: (
        (ws.root / "photos").mkdir(), _write(ws.root / "photos" / "cat.jpg", b"meow"),
        ["merged_format=zero_table", f"base_dir={ws.root / 'photos'}"])[-1],
     ["base_dir=", "holds files qalora-tune did not write"]),
    ("base-dir-is-the-adapter", lambda ws: ["merged_format=zero_table", f"base_dir={ws.adapter}"],
     ["base_dir=", "overlaps adapter_dir="]),
    ("base-dir-is-a-file", lambda ws: (_write(ws.root / "file", "x"),
                                       ["merged_format=zero_table", f"base_dir={ws.root / 'file'}"])[-1],
     ["base_dir=", "is a file"]),
]


@pytest.mark.parametrize("make, named", [c[1:] for c in MERGES], ids=[c[0] for c in MERGES])
def test_merge_refusals(base, trained, tmp_path, capsys, make, named):
    ws = Workspace(tmp_path, base, trained)
    overrides = make(ws)
    before = ws.snapshot()
    _check(_run_inline("qalora_merge", _merge_args(ws, *overrides), capsys), ws, before, *named,
           recipe="qalora_merge")


def test_merge_replaces_its_own_output_and_marks_it(base, trained, tmp_path, capsys):
    ws = Workspace(tmp_path, base, trained)
    target = ws.root / "my_int4"
    for _ in range(2):  # a new directory, then the one it wrote
        outcome = _run_inline("qalora_merge", _merge_args(ws, f"merged_dir={target}"), capsys)
        assert outcome.code == 0, outcome.stderr[-3000:]
        assert (target / ".qalora-tune-output").is_file() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in ws.root.iterdir() if p.name.startswith(".my_int4")) == [".my_int4.lock"]


# ---------------------------------------------------------------------- 8. generation and loading


def _generate_args(ws: Workspace, *overrides):
    return [
        "--config", "tiny_qalora_generate", f"merged_dir={ws.merged}",
        f"tokenizer.path={ws.merged / 'tiny_tokenizer.json'}", "max_new_tokens=3", *overrides,
    ]


def _edit_spec(ws: Workspace, **model):
    path = ws.merged / "qalora_tune.json"
    spec = json.loads(path.read_text())
    spec["model"].update(model)
    path.write_text(json.dumps(spec))


def _planted_spec(ws: Workspace, marker: Path):
    path = ws.merged / "qalora_tune.json"
    spec = json.loads(path.read_text())
    spec["model"] = {"_component_": "os.system", "command": f"touch {marker}"}
    path.write_text(json.dumps(spec))


def _edit_merged_config(ws: Workspace, **changes):
    path = ws.merged / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


GENERATES = [
    ("max-new-tokens-zero", lambda ws, m: ["max_new_tokens=0"], ["max_new_tokens=0 is not a positive integer"]),
    ("max-new-tokens-text", lambda ws, m: ["max_new_tokens=lots"], ["max_new_tokens='lots'"]),
    ("temperature-negative", lambda ws, m: ["temperature=-0.5"], ["temperature=-0.5 is not a non-negative number"]),
    ("top-k-zero", lambda ws, m: ["top_k=0"], ["top_k=0"]),
    ("prompt-empty-list", lambda ws, m: ["prompt=[]"], ["prompt=[]", "a text or a non-empty list of texts"]),
    ("prompt-numbers", lambda ws, m: ["prompt=[1,2]"], ["prompt=[1, 2]"]),
    ("seed-text", lambda ws, m: ["seed=abc"], ["seed='abc'"]),
    ("device-gpu", lambda ws, m: ["device=gpu"], ["device='gpu'"]),
    ("dtype-fp64", lambda ws, m: ["dtype=fp64"], ["dtype=fp64 is not supported here"]),
    ("merged-dir-missing", lambda ws, m: ["merged_dir=/no/such/place/merged"], ["merged_dir=/no/such/place/merged does not exist"]),
    ("tokenizer-missing", lambda ws, m: ["tokenizer.path=/no/such/place/tok.json"], ["tokenizer.path=/no/such/place/tok.json not found"]),
    ("spec-payload", lambda ws, m: _planted_spec(ws, m), ["names the model builder 'os.system'", "never allowed to run other code"]),
    ("spec-other-builder", lambda ws, m: _edit_spec(ws, _component_="torchtune.models.llama2.llama2_7b"),
     ["names the model builder 'torchtune.models.llama2.llama2_7b', which is not one of qalora-tune's"]),
    ("spec-unknown-argument", lambda ws, m: _edit_spec(ws, evil="x"), ["'evil' is not an argument of"]),
    ("spec-bad-value", lambda ws, m: _edit_spec(ws, group_size=-4), ["model.group_size=-4"]),
    ("spec-broken", lambda ws, m: _write(ws.merged / "qalora_tune.json", "{"), ["qalora_tune.json is not valid JSON"]),
    ("spec-missing", lambda ws, m: (ws.merged / "qalora_tune.json").unlink(), ["qalora_tune.json not found"]),
    ("config-dtype", lambda ws, m: _edit_merged_config(ws, torch_dtype="load"), ["torch_dtype='load'"]),
    ("config-broken", lambda ws, m: _write(ws.merged / "config.json", "nope"), ["config.json is not valid JSON"]),
    ("weights-truncated", lambda ws, m: _truncate(ws.merged / "model.safetensors"), ["model.safetensors cannot be read"]),
    ("weights-garbage", lambda ws, m: _write(ws.merged / "model.safetensors", os.urandom(2048)), ["model.safetensors cannot be read"]),
    ("weights-shape", lambda ws, m: _edit_spec(ws, _component_="qalora_tune.models.qalora_tinystories656k"),
     ["model.embed_tokens.weight has shape (57, 128) where the model it describes has (2048, 128)"]),
    ("unknown-key", lambda ws, m: ["max_new_token=3"], ["did you mean max_new_tokens?"]),
    # task= (a task package applied to merged_dir, qalora_tune.tasks)
    ("task-missing", lambda ws, m: ["task=/no/such/place/task"], ["task=/no/such/place/task does not exist"]),
    ("task-a-number", lambda ws, m: ["task=7"], ["task=7 is not a non-empty text"]),
    ("task-not-a-package", lambda ws, m: _task_dir(ws, "task.json", "{"), ["task.json is not valid JSON"]),
    ("task-pickle-payload", lambda ws, m: _task_dir(ws, "zero_points.safetensors", _planted_pickle(m)),
     ["zero_points.safetensors cannot be read"]),
    ("task-another-model", lambda ws, m: _task_dir(ws, None, None, hidden_size=256),
     ["does not fit the base", "hidden_size=256"]),
    ("task-nan", lambda ws, m: _task_dir(ws, None, None, nan=True), ["NaN or infinite zero points"]),
]


def _task_dir(ws: Workspace, name: Optional[str], content, hidden_size=None, nan=False) -> List[str]:
    """A task package of the merged model itself, one file replaced or damaged."""
    from qalora_tune.tasks import export_task_from_merged

    task = ws.root / "task"
    export_task_from_merged(ws.merged, task)
    if name is not None:
        _write(task / name, content)
    if hidden_size is not None:
        meta = json.loads((task / "task.json").read_text())
        meta["base"]["config"]["hidden_size"] = hidden_size
        (task / "task.json").write_text(json.dumps(meta))
    if nan:
        zeros = load_file(str(task / "zero_points.safetensors"))
        next(iter(zeros.values()))[0, 0] = float("nan")
        save_file(zeros, str(task / "zero_points.safetensors"))
    return [f"task={task}"]


@pytest.mark.parametrize("make, named", [c[1:] for c in GENERATES], ids=[c[0] for c in GENERATES])
def test_generate_refusals(base, trained, tmp_path, capsys, make, named):
    ws = Workspace(tmp_path, base, trained)
    marker = tmp_path.parent / f"{tmp_path.name}-payload-ran"
    overrides = make(ws, marker)
    overrides = overrides if isinstance(overrides, list) else []
    before = ws.snapshot()
    _check(_run_inline("qalora_generate", _generate_args(ws, *overrides), capsys), ws, before, *named,
           recipe="qalora_generate")
    assert not marker.exists(), "a planted payload ran"


def test_load_merged_never_runs_a_planted_builder(base, trained, tmp_path):
    ws = Workspace(tmp_path, base, trained)
    marker = tmp_path / "payload-ran"
    _planted_spec(ws, marker)
    with pytest.raises(UserError, match="never allowed to run other code"):
        load_merged(ws.merged)
    assert not marker.exists()


def test_documented_generate_commands_work(trained, capsys):
    """docs/usage.md section 3: merged_dir overridden (the config's output_dir unused), and
    a prompt with '=' in it."""
    outcome = _run_inline(
        "qalora_generate",
        ["--config", "tiny_qalora_generate", f"merged_dir={trained / 'epoch_0' / 'merged_int4'}",
         'prompt=kau lij qus=', "max_new_tokens=4"],
        capsys,
    )
    assert outcome.code == 0, outcome.stderr[-3000:]


def test_a_tokenizer_linked_from_outside_the_base_is_not_copied(base, tmp_path):
    ws = Workspace(tmp_path, base)
    secret = _write(tmp_path / "secret.txt", "do not ship")
    (ws.base / "tokenizer.model").symlink_to(secret)
    result = _tune_run("qalora_finetune", *_plain_args(ws.base, ws.out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not copying" in result.stderr and "tokenizer.model" in result.stderr
    assert not (ws.out / "epoch_0" / "merged_int4" / "tokenizer.model").exists()


# ---------------------------------------------------------------------- 9. evaluation


def _eval_args(ws: Workspace, kind: str, *overrides):
    return [
        "--config", "tiny_qalora_eval", f"output_dir={ws.root / 'eval_out'}",
        f"checkpointer.checkpoint_dir={ws.base}", f"tokenizer.path={ws.base / 'tiny_tokenizer.json'}",
        f"checkpoint.kind={kind}", f"checkpoint.adapter_dir={ws.adapter}",
        f"checkpoint.merged_dir={ws.merged}", "max_batches=1", *overrides,
    ]


EVALS = [
    ("kind-unknown", "bogus", lambda ws, m: [], ["checkpoint.kind='bogus' is not one of"]),
    ("batch-size-zero", "merged", lambda ws, m: ["batch_size=0"], ["batch_size=0 is not a positive integer"]),
    ("max-batches-negative", "merged", lambda ws, m: ["max_batches=-1"], ["max_batches=-1"]),
    ("merged-dir-missing", "merged", lambda ws, m: ["checkpoint.merged_dir=/no/such/place"], ["checkpoint.merged_dir=/no/such/place does not exist"]),
    ("adapter-dir-missing", "adapter", lambda ws, m: ["checkpoint.adapter_dir=/no/such/place"], ["checkpoint.adapter_dir=/no/such/place does not exist"]),
    ("adapter-nan", "adapter", lambda ws, m: _nan_adapter(ws.adapter), ["NaN or infinite"]),
    ("adapter-another-base", "adapter", lambda ws, m: _rewrite_base_tensor(ws, lambda t: t["model.norm.weight"].mul_(2)),
     ["was trained on another base checkpoint"]),
    ("merged-payload", "merged", lambda ws, m: _planted_spec(ws, m), ["never allowed to run other code"]),
    ("device-gpu", "merged", lambda ws, m: ["device=gpu"], ["device='gpu'"]),
    ("datasets-empty", "merged", lambda ws, m: ["datasets=[]"], ["datasets is empty"]),
    ("task-with-an-adapter", "adapter", lambda ws, m: _task_dir(ws, None, None), ["task=", "checkpoint.kind=merged"]),
    ("task-missing", "merged", lambda ws, m: ["task=/no/such/place"], ["task=/no/such/place does not exist"]),
    ("task-pickle-payload", "merged", lambda ws, m: _task_dir(ws, "zero_points.safetensors", _planted_pickle(m)),
     ["zero_points.safetensors cannot be read"]),
]


@pytest.mark.parametrize("kind, make, named", [c[1:] for c in EVALS], ids=[c[0] for c in EVALS])
def test_eval_refusals(base, trained, tmp_path, capsys, kind, make, named):
    ws = Workspace(tmp_path, base, trained)
    marker = tmp_path.parent / f"{tmp_path.name}-payload-ran"
    overrides = make(ws, marker)
    overrides = overrides if isinstance(overrides, list) else []
    before = ws.snapshot()
    _check(_run_inline("qalora_eval", _eval_args(ws, kind, *overrides), capsys), ws, before, *named,
           recipe="qalora_eval")
    assert not marker.exists(), "a planted payload ran"


# ---------------------------------------------------------------------- 10. failures during training


@pytest.mark.parametrize(
    "save_merged, limit", [("True", 200_000), ("False", 150_000)], ids=["merged_int4", "recipe_state"]
)
def test_file_size_limit_during_a_save_keeps_the_previous_checkpoint(
    base, trained, tmp_path, save_merged, limit
):
    """A real failure: the second epoch's save exceeds RLIMIT_FSIZE (Python ignores SIGXFSZ,
    so the write fails with EFBIG) in the merged model's safetensors file or in
    ``torch.save`` of the recipe state."""
    ws = Workspace(tmp_path, base, trained)
    before = _snapshot(ws.run / "epoch_0")

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    line = _error_line(
        _tune_run("qalora_finetune", *_resume_args(ws, f"save_merged_int4={save_merged}"),
                  preexec_fn=limit_file_size),
        f"could not write {ws.run / 'epoch_1'}: ", "set output_dir to another location",
    )
    assert "[Errno 27] File too large" in line or "PyTorch file writer failed" in line
    assert not (ws.run / "epoch_1").exists()
    assert not [p for p in ws.run.iterdir() if ".partial-" in p.name]
    assert _snapshot(ws.run / "epoch_0") == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(base, trained, tmp_path):
    ws = Workspace(tmp_path, base, trained)
    before = _snapshot(ws.run / "epoch_0")
    _error_line(
        _tune_run("qalora_finetune", *_resume_args(ws, "loss._component_=nan_loss.NaNLoss")),
        "the loss became nan at step", "lower optimizer.lr or set clip_grad_norm",
        f"the last good checkpoint, {ws.run / 'epoch_0'}, is kept",
    )
    assert _snapshot(ws.run / "epoch_0") == before


@requires_no_cuda
@pytest.mark.parametrize("override, named", [
    ("device=cuda", "device=cuda but CUDA is not available; set device=cpu"),
    ("enable_activation_offloading=True", "set enable_activation_offloading=False"),
])
def test_cuda_only_options_on_cpu(base, tmp_path, capsys, override, named):
    ws = Workspace(tmp_path, base)
    before = ws.snapshot()
    _check(_run_inline("qalora_finetune", _args(ws.base, ws.out, override), capsys), ws, before, named)


# ---------------------------------------------------------------------- 11. the qalora-tune command


def test_cli_copy_refuses_to_overwrite(tmp_path):
    from qalora_tune._cli import main

    target = _write(tmp_path / "my.yaml", "mine")
    assert main(["cp", "tiny_qalora", str(target)]) == 1
    assert target.read_text() == "mine"
    assert main(["cp", "no_such_config", str(tmp_path / "x.yaml")]) == 1
