"""The bad-input catalogue (issue 5): each case ends ``tune run`` with status 1, one line
``<recipe>: error: ...`` on stderr naming the setting to change, and nothing written that
looks complete.

Runs the offline ``tiny_qalora`` config against one quickly pretrained tiny base (built
once for the module), two optimizer steps per epoch where training is needed.
"""

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qalora_tune.tiny import TinyTokenizer, prepare_tiny_base

ROOT = Path(__file__).resolve().parents[2]
TUNE = str(Path(sys.executable).with_name("tune"))
requires_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")


def _tune_run(recipe, *args, cwd=ROOT, timeout=300, preexec_fn=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [TUNE, "run", recipe, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn,
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base in Hugging Face layout (a short pretraining: its quality is not tested)."""
    directory = tmp_path_factory.mktemp("tiny") / "base"
    prepare_tiny_base(str(directory), seed=0, steps=20, max_seconds=10, num_validation=50, log=None)
    return directory


def _args(base: Path, out: Path, *overrides):
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


def _finetune(base: Path, out: Path, *overrides, **kwargs):
    return _tune_run("qalora_finetune", *_args(base, out, *overrides), **kwargs)


def _error_line(result, *settings, recipe="qalora_finetune") -> str:
    """The one-line error, checked: status 1, the recipe's prefix, each setting named."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{recipe}: error: "), result.stderr[-3000:]
    for setting in settings:
        assert setting in last, last
    return last


def _checkpoints(out: Path):
    """Everything under ``out`` that is or could pass for a checkpoint (hidden partial
    directories included)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name.lstrip(".").startswith(("epoch_", "step_")))


def _snapshot(directory: Path):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A finished one-epoch run (``epoch_0``), copied by the tests that resume it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = _finetune(base, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# ---------------------------------------------------------------------- 1-3: the model's knobs


def test_group_size_not_dividing_a_linear_without_padding(base, tmp_path):
    # every tiny linear has in_dim 128 or 256: 256 does not divide 128
    last = _error_line(
        _finetune(base, tmp_path / "out", "model.group_size=256", "model.pad_in_dim=False"),
        "model.group_size=256", "in_dim=128", "model.pad_in_dim=True",
    )
    assert "set model.group_size to 32 or 64 or 128" in last
    assert _checkpoints(tmp_path / "out") == []


@pytest.mark.parametrize(
    "override, message",
    [("model.bits=5", "model.bits=5 is not a supported bit width; choose from 2, 3, 4, 8"),
     ("model.group_size=0", "model.group_size=0 is not a positive integer; set model.group_size")],
)
def test_bits_and_group_size_outside_the_supported_values(base, tmp_path, override, message):
    _error_line(_finetune(base, tmp_path / "out", override), message)
    assert _checkpoints(tmp_path / "out") == []


@pytest.mark.parametrize(
    "override, setting",
    [("model.lora_rank=0", "model.lora_rank"), ("model.lora_alpha=-1", "model.lora_alpha"),
     ("model.lora_dropout=1.0", "model.lora_dropout")],
)
def test_rank_alpha_and_dropout_out_of_range(base, tmp_path, override, setting):
    _error_line(_finetune(base, tmp_path / "out", override), override, f"set {setting}")
    assert _checkpoints(tmp_path / "out") == []


# ---------------------------------------------------------------------- 4: checkpoint files


def test_missing_base_weights(base, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _error_line(
        _finetune(base, tmp_path / "out", f"checkpointer.checkpoint_dir={empty}"),
        "base model weights missing", "set checkpointer.checkpoint_dir",
    )


def test_truncated_safetensors(base, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    _error_line(
        _finetune(base, tmp_path / "out", f"checkpointer.checkpoint_dir={broken}"),
        f"{weights} cannot be read", "truncated or corrupt", "checkpointer.checkpoint_dir",
    )
    assert _checkpoints(tmp_path / "out") == []


def test_weights_of_another_model_size(base, tmp_path):
    # TinyStories-656K's builder: 2048 x 128 embeddings, the tiny base has 57 x 128
    _error_line(
        _finetune(
            base, tmp_path / "out", "model._component_=qalora_tune.models.qalora_tinystories656k",
            "model.apply_lora_to_output=False",
        ),
        "model.embed_tokens.weight", "(57, 128)", "(2048, 128)", "model._component_",
        "checkpointer.checkpoint_dir",
    )


@pytest.mark.parametrize(
    "model_type, message",
    [("QWEN2", "set checkpointer.model_type to LLAMA2 or LLAMA3 or LLAMA3_2"),
     ("LLAMA", "checkpointer.model_type='LLAMA' is not supported; use one of")],
)
def test_wrong_model_type(base, tmp_path, model_type, message):
    _error_line(_finetune(base, tmp_path / "out", f"checkpointer.model_type={model_type}"), message)


# ---------------------------------------------------------------------- 5: tokenizer


def test_tokenizer_larger_than_the_embedding_table(base, tmp_path):
    path = tmp_path / "big_tokenizer.json"
    TinyTokenizer(alphabet=TinyTokenizer().alphabet + "ABCDEFGH").save(str(path))
    _error_line(
        _finetune(base, tmp_path / "out", f"tokenizer.path={path}"),
        "tokenizer.path", "65 token ids", "57 rows",
    )


# ---------------------------------------------------------------------- 6: resuming another adapter


@pytest.mark.parametrize(
    "override, message",
    [("model.lora_rank=4", "rank=8 and this config gives rank=4; set model.lora_rank back"),
     ("model.group_size=64", "group_size=32 and this config gives group_size=64; set model.group_size")],
)
def test_resuming_an_adapter_of_another_configuration(trained, tmp_path, base, override, message):
    out = _copy(trained, tmp_path)
    before = _snapshot(out / "epoch_0")
    last = _error_line(
        _finetune(base, out, "epochs=2", "resume_from_checkpoint=True", override), message
    )
    assert f"{out / 'epoch_0'}" in last and "resume_from_checkpoint=False" in last
    assert _checkpoints(out) == ["epoch_0"] and _snapshot(out / "epoch_0") == before


# ---------------------------------------------------------------------- 7: keys and components


@pytest.mark.parametrize(
    "override, message",
    [
        ("epoch=2", "unknown config key epoch: qalora_finetune does not read it; did you mean epochs?"),
        ("model._component_=qalora_tune.models.qalora_tiny_lama",
         "model._component_='qalora_tune.models.qalora_tiny_lama' cannot be imported; "
         "did you mean qalora_tune.models.qalora_tiny_llama?"),
        ("model.lora_rnk=4", "model.lora_rnk is not an argument of qalora_tiny_llama; did you mean lora_rank?"),
    ],
    ids=["key", "component", "argument"],
)
def test_unknown_keys_and_misspelled_components(base, tmp_path, override, message):
    _error_line(_finetune(base, tmp_path / "out", override), message)
    assert not (tmp_path / "out").exists()  # refused before anything is created


def test_merge_and_generate_check_their_keys_too(tmp_path):
    merge = _tune_run(
        "qalora_merge", "--config", "tiny_qalora", f"output_dir={tmp_path}",
        f"adapter_dir={tmp_path}/adapter", f"merge_dir={tmp_path}/merged",
    )
    _error_line(merge, "unknown config key merge_dir", "did you mean merged_dir?", recipe="qalora_merge")
    generate = _tune_run(
        "qalora_generate", "--config", "tiny_qalora_generate", f"output_dir={tmp_path}",
        "max_new_token=3",
    )
    _error_line(generate, "did you mean max_new_tokens?", recipe="qalora_generate")


# ---------------------------------------------------------------------- 8: CUDA-only options


@requires_no_cuda
@pytest.mark.parametrize(
    "override, message",
    [
        ("device=cuda", "device=cuda but CUDA is not available; set device=cpu"),
        ("enable_activation_offloading=True", "set enable_activation_offloading=False"),
        ("dtype=fp16", "dtype=fp16 is not supported here"),
    ],
)
def test_cuda_only_options_on_cpu(base, tmp_path, override, message):
    last = _error_line(_finetune(base, tmp_path / "out", override), message)
    assert override != "dtype=fp16" or "set dtype to one of fp32, bf16" in last


@requires_no_cuda
def test_peak_memory_logging_on_cpu_is_a_warning_and_bits_are_recorded(base, tmp_path):
    out = tmp_path / "out"
    result = _finetune(base, out, "log_peak_memory_stats=True", "save_merged_int4=False")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "log_peak_memory_stats=True is ignored on cpu" in result.stdout + result.stderr
    config = (out / "epoch_0" / "adapter" / "adapter_config.json").read_text()
    assert '"bits": 4' in config


# ---------------------------------------------------------------------- 9: the output directory


def test_output_dir_that_cannot_be_created(base, tmp_path):
    if not Path("/sys").is_dir():
        pytest.skip("needs /sys (not writable, even by root)")
    _error_line(
        _finetune(base, Path("/sys/qalora-tune-not-writable")),
        "output_dir=/sys/qalora-tune-not-writable is not writable", "set output_dir",
    )


def test_output_dir_under_a_file(base, tmp_path):
    (tmp_path / "file").write_text("")
    _error_line(_finetune(base, tmp_path / "file" / "out"), "is not writable", "set output_dir")


@pytest.mark.parametrize(
    "save_merged, limit", [("True", 200_000), ("False", 150_000)], ids=["merged_int4", "recipe_state"]
)
def test_file_size_limit_during_a_save_keeps_the_previous_checkpoint(
    trained, tmp_path, base, save_merged, limit
):
    """A real failure: the second epoch's save exceeds RLIMIT_FSIZE (Python ignores SIGXFSZ,
    so the write fails with EFBIG) in the merged model's safetensors file or in
    ``torch.save`` of the recipe state."""
    out = _copy(trained, tmp_path)
    before = _snapshot(out / "epoch_0")

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    last = _error_line(
        _finetune(
            base, out, "epochs=2", "resume_from_checkpoint=True", f"save_merged_int4={save_merged}",
            preexec_fn=limit_file_size,
        ),
        f"could not write {out / 'epoch_1'}: ", "set output_dir to another location",
    )
    assert "[Errno 27] File too large" in last or "PyTorch file writer failed" in last
    assert _checkpoints(out) == ["epoch_0"]  # no epoch_1, no partial directory
    assert _snapshot(out / "epoch_0") == before


# ---------------------------------------------------------------------- 10: non-finite loss


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path, base):
    out = _copy(trained, tmp_path)
    before = _snapshot(out / "epoch_0")
    last = _error_line(
        _finetune(
            base, out, "epochs=2", "resume_from_checkpoint=True",
            "loss._component_=tests.recipes.nan_loss.NaNLoss",
        ),
        "the loss became nan at step 3", "lower optimizer.lr or set clip_grad_norm",
        f"the last good checkpoint, {out / 'epoch_0'}, is kept",
    )
    assert "Traceback" not in last
    assert _checkpoints(out) == ["epoch_0"] and _snapshot(out / "epoch_0") == before
