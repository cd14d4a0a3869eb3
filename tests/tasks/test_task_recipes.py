"""The recipes with task packages, end to end on TinyStories-656K: two training runs on
different text, ``qalora_merge merged_format=zero_table`` writing one task-free base and
two packages, then ``qalora_generate task=`` and ``qalora_eval task=`` on the base."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qalora_tune
from qalora_tune.checkpointing import OUTPUT_MARKER_NAME, HFKeyMap, write_merged_int4
from qalora_tune.tasks import read_task_package
from tests.tasks.family import assert_same_model

ROOT = Path(__file__).resolve().parents[2]
SHARED = (ROOT / ".." / "shared").resolve()
MODEL = SHARED / "models" / "tinystories656K"
TUNE = str(Path(sys.executable).with_name("tune"))
TEXTS = {
    "shakespeare": SHARED / "data" / "tinyshakespeare_train.txt",
    "stories": SHARED / "data" / "tinystories_val_a.txt",
}

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(not MODEL.is_dir(), reason="needs ../shared (real tiny checkpoints and data)"),
]


def _tune(recipe, *args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [TUNE, "run", recipe, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def _training(run, text):
    return [
        "--config", "tinystories656K_qalora", f"output_dir={run}",
        f"checkpointer.checkpoint_dir={MODEL}", f"tokenizer.path={MODEL / 'tokenizer.json'}",
        f"dataset.path={text}", f"validation.dataset.path={text}", "validation.max_batches=1",
        "validation.full_precision_baseline=False", "batch_size=4", "merge_probe_size=2",
    ]


def _last_line(process):
    return process.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two runs, then their packages and the task-free base written by qalora_merge."""
    root = tmp_path_factory.mktemp("tasks")
    for name, text in TEXTS.items():
        result = _tune("qalora_finetune", *_training(root / name, text), "max_steps_per_epoch=3")
        assert result.returncode == 0, result.stderr[-3000:]
    for name, text in TEXTS.items():
        result = _tune(
            "qalora_merge", *_training(root / name, text),
            f"adapter_dir={root / name / 'epoch_0' / 'adapter'}", "merged_format=zero_table",
            f"merged_dir={root / 'packages' / name}", f"base_dir={root / 'base'}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        verb = "wrote" if name == "shakespeare" else "checked"
        assert f"{verb} the task-free base" in result.stderr + result.stdout
    return root


def test_merge_writes_one_base_and_packages_that_switch_it_exactly(tasks):
    assert (tasks / "base" / "config.json").is_file()
    report = json.loads((tasks / "base" / "merge_report.json").read_text())
    assert "task-free base" in report["note"]
    base = qalora_tune.load_merged(tasks / "base")
    fingerprints = set()
    for name in TEXTS:
        package = read_task_package(tasks / "packages" / name)
        assert package.name == name  # the training run's directory
        assert package.metadata["source"]["adapter_dir"].endswith(f"{name}/epoch_0/adapter")
        assert package.metadata["size"]["bits_per_quantized_parameter"] == pytest.approx(1.0)
        fingerprints.add(package.base["fingerprint"])
        base.load_task(tasks / "packages" / name)
        assert_same_model(base, qalora_tune.load_merged(tasks / name / "epoch_0" / "merged_int4"))
    assert len(fingerprints) == 1
    # the task-free base holds the base's own zeros: unmerged adapters, i.e. no task
    untouched = qalora_tune.load_merged(tasks / "base")
    with torch.no_grad():
        tokens = torch.randint(3, 2000, (1, 32))
        assert not torch.equal(untouched(tokens), base(tokens))


def test_generate_and_eval_take_a_task(tasks):
    common = [f"tokenizer.path={MODEL / 'tokenizer.json'}", "max_new_tokens=12", "temperature=0.0"]
    own = _tune(
        "qalora_generate", "--config", "tinystories656K_qalora_generate",
        f"merged_dir={tasks / 'shakespeare' / 'epoch_0' / 'merged_int4'}", *common,
    )
    switched = _tune(
        "qalora_generate", "--config", "tinystories656K_qalora_generate",
        f"merged_dir={tasks / 'base'}", f"task={tasks / 'packages' / 'shakespeare'}", *common,
    )
    assert own.returncode == 0 and switched.returncode == 0, switched.stderr[-3000:]
    assert switched.stdout.strip().splitlines()[-1] == own.stdout.strip().splitlines()[-1]
    assert "with task" in switched.stderr

    evaluation = [
        "--config", "tinystories656K_qalora_eval", f"run_dir={tasks / 'stories'}",
        "max_batches=1", "batch_size=4",  # the config's datasets, relative to the project root
    ]
    own = _tune("qalora_eval", *evaluation, f"output_dir={tasks / 'eval_own'}")
    switched = _tune(
        "qalora_eval", *evaluation, f"checkpoint.merged_dir={tasks / 'base'}",
        f"task={tasks / 'packages' / 'stories'}", f"output_dir={tasks / 'eval_task'}",
    )
    assert own.returncode == 0 and switched.returncode == 0, switched.stderr[-3000:]
    mine = json.loads((tasks / "eval_task" / "eval_results.json").read_text())
    theirs = json.loads((tasks / "eval_own" / "eval_results.json").read_text())
    assert mine["task"] == str(tasks / "packages" / "stories")
    for name, row in theirs["datasets"].items():
        assert mine["datasets"][name]["nll"] == row["nll"]  # the same model, bit for bit


def test_recipe_errors_are_one_line(tasks):
    adapter = tasks / "shakespeare" / "epoch_0" / "adapter"
    training = _training(tasks / "shakespeare", TEXTS["shakespeare"])
    bogus = _tune("qalora_merge", *training, f"adapter_dir={adapter}", "merged_format=zip")
    assert bogus.returncode == 1 and "merged_format='zip' is not one of" in _last_line(bogus)
    assert "zero_table" in _last_line(bogus)
    stray = _tune("qalora_merge", *training, f"adapter_dir={adapter}", f"base_dir={tasks / 'x'}")
    assert stray.returncode == 1 and "merged_format=zero_table" in _last_line(stray)
    foreign = tasks / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = _tune(
        "qalora_merge", *training, f"adapter_dir={adapter}", "merged_format=zero_table",
        f"merged_dir={tasks / 'packages' / 'again'}", f"base_dir={foreign}",
    )
    assert refused.returncode == 1 and "base_dir=" in _last_line(refused)
    assert not (tasks / "packages" / "again").exists()
    # a base_dir holding the same base with other zeros is accepted; other scales are not
    same = tasks / "same_base"
    shutil.copytree(tasks / "stories" / "epoch_0" / "merged_int4", same)
    args = [f"adapter_dir={adapter}", "merged_format=zero_table", f"merged_dir={tasks / 'again'}"]
    accepted = _tune("qalora_merge", *training, *args, f"base_dir={same}")
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    model = qalora_tune.load_merged(same)
    model.layers[1].mlp.w1.weight.scale_and_zero[0, 0, 0] *= 2  # one scale of one group
    other = tasks / "other_base"
    other.mkdir()
    spec = json.loads((same / "qalora_tune.json").read_text())
    config = json.loads((same / "config.json").read_text())
    write_merged_int4(model, other, HFKeyMap("LLAMA2", config), config, spec)
    (other / OUTPUT_MARKER_NAME).write_text("{}")
    refused = _tune("qalora_merge", *training, *args, f"base_dir={other}")
    assert refused.returncode == 1 and "holds another base" in _last_line(refused)
    wrong_kind = _tune(
        "qalora_eval", "--config", "tinystories656K_qalora_eval", f"run_dir={tasks / 'stories'}",
        "checkpoint.kind=full", f"task={tasks / 'packages' / 'stories'}",
        f"checkpointer.checkpoint_dir={MODEL}", f"tokenizer.path={MODEL / 'tokenizer.json'}",
    )
    assert wrong_kind.returncode == 1 and "checkpoint.kind=merged" in _last_line(wrong_kind)
    missing = _tune(
        "qalora_generate", "--config", "tinystories656K_qalora_generate",
        f"merged_dir={tasks / 'base'}", f"task={tasks / 'nowhere'}",
        f"tokenizer.path={MODEL / 'tokenizer.json'}",
    )
    assert missing.returncode == 1 and "task=" in _last_line(missing)
