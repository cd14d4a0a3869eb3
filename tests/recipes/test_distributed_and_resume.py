"""Scale and robustness of ``qalora_finetune``: two processes (gloo, CPU) follow one with
the same global batch, and a run killed mid-epoch resumes to the same adapter bit for bit."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.test_qalora_finetune import (
    ROOT,
    TUNE,
    _logged_losses,
    _shared_overrides,
    requires_shared,
)

HERE = Path(__file__).resolve().parent


def _env(**extra):
    # one thread per process: two ranks share the two cores; slow_dataset on the path
    return dict(
        os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(HERE), **extra
    )


def _run(args, **kwargs):
    return subprocess.run(
        [TUNE, "run", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=600, **kwargs,
    )


def _tinystories(out, *extra):
    return [
        "qalora_finetune", "--config", "tinystories656K_qalora",
        *_shared_overrides("tinystories656K", "tokenizer.json", out),
        "validation.full_precision_baseline=False",
        *extra,
    ]


def _tensors(path: Path):
    return load_file(str(path))


@requires_shared
def test_two_processes_follow_one_process_with_the_same_global_batch(tmp_path):
    steps = ["max_steps_per_epoch=5", "validation.max_batches=3", "validation.batch_size=6"]
    single = _run(_tinystories(tmp_path / "one", "batch_size=8", *steps))
    assert single.returncode == 0, single.stderr[-3000:]
    double = _run(
        ["--nproc_per_node", "2", *_tinystories(tmp_path / "two", "batch_size=4", *steps)]
    )
    assert double.returncode == 0, double.stderr[-3000:]

    one, two = tmp_path / "one", tmp_path / "two"
    # rank 0 alone logs, and logs the global loss: the same curve
    losses_one, losses_two = _logged_losses(one), _logged_losses(two)
    assert len(losses_one) == len(losses_two) == 5
    assert losses_two == pytest.approx(losses_one, rel=2e-5), (losses_one, losses_two)
    # one set of outputs, written once (no stray staging directories)
    written = [p.name for p in two.iterdir() if p.name.startswith((".", "epoch"))]
    assert sorted(written) == [".qalora-tune.lock", "epoch_0"]  # the lock stays, unlocked
    a = _tensors(one / "epoch_0" / "adapter" / "adapter_model.safetensors")
    b = _tensors(two / "epoch_0" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    # the merged int4 models agree: same codes, zero points within the adapters' tolerance
    ma = _tensors(one / "epoch_0" / "merged_int4" / "model.safetensors")
    mb = _tensors(two / "epoch_0" / "merged_int4" / "model.safetensors")
    assert ma.keys() == mb.keys()
    for key in ma:
        if ma[key].is_floating_point():
            torch.testing.assert_close(mb[key], ma[key], rtol=1e-4, atol=1e-6, msg=key)
        else:
            assert torch.equal(mb[key], ma[key]), key
    # validation is sharded across the ranks and summed: the same metrics
    s1 = json.loads((one / "summary.json").read_text())["metrics"]
    s2 = json.loads((two / "summary.json").read_text())["metrics"]
    for model in ("int4 base", "QA-LoRA", "QA-LoRA merged int4"):
        assert s2[model]["tokens"] == s1[model]["tokens"]
        assert s2[model]["loss"] == pytest.approx(s1[model]["loss"], rel=1e-5), model


@requires_shared
def test_a_run_killed_mid_epoch_resumes_to_the_same_adapter_bit_for_bit(tmp_path):
    def args(out, delay):
        return _tinystories(
            out, "batch_size=4", "max_steps_per_epoch=6", "epochs=2", "save_every_n_steps=2",
            "model.lora_dropout=0.1",  # the dropout masks draw from the restored RNG
            "dataset._component_=slow_dataset.slow_text_file_dataset", f"dataset.delay={delay}",
        )

    reference = _run(args(tmp_path / "reference", 0.0))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    process = subprocess.Popen(
        [TUNE, "run", *args(out, 0.05)], cwd=ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    # global step 8 is the second step of the second epoch (6 steps per epoch)
    deadline = time.monotonic() + 300
    while not (out / "step_8").is_dir():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "step_8 never appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL  # killed while training, not finished
    assert (out / "epoch_0").is_dir() and not (out / "epoch_1").exists()

    # the data order of a half-done epoch depends on the batch size: refused, nothing written
    wrong = _run([*args(out, 0.0), "resume_from_checkpoint=True", "batch_size=8"])
    assert wrong.returncode == 1
    last = wrong.stderr.strip().splitlines()[-1]
    assert last.startswith("qalora_finetune: error:") and "resume with batch_size=4" in last
    assert not (out / "epoch_1").exists()

    resumed = _run([*args(out, 0.0), "resume_from_checkpoint=True"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "of epoch 2 (global step" in resumed.stdout + resumed.stderr
    for name in ("adapter/adapter_model.safetensors", "merged_int4/model.safetensors"):
        expected = _tensors(tmp_path / "reference" / "epoch_1" / name)
        got = _tensors(out / "epoch_1" / name)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)
    state = torch.load(out / "epoch_1" / "recipe_state.pt", weights_only=False)
    assert state["global_step"] == 12 and state["epochs_run"] == 2
    assert not list(out.glob("step_*"))  # the epoch's end supersedes its step checkpoints


def _kill_when(out: Path, moment, delay: float):
    """Start the slow run into ``out`` and SIGKILL it as soon as ``moment(out)`` holds."""
    process = subprocess.Popen(
        [TUNE, "run", *_resumable(out, delay)], cwd=ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 400
    try:
        while not moment(out):
            if process.poll() is not None:
                return False  # finished before the moment came: nothing to test
            assert time.monotonic() < deadline, "the moment never came"
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    return process.returncode == -signal.SIGKILL


def _resumable(out, delay):
    return _tinystories(
        out, "batch_size=4", "max_steps_per_epoch=6", "epochs=2", "save_every_n_steps=2",
        "model.lora_dropout=0.1",
        "dataset._component_=slow_dataset.slow_text_file_dataset", f"dataset.delay={delay}",
    )


def _partial(out: Path, prefix: str) -> bool:
    return out.is_dir() and any(p.name.startswith(prefix) and ".partial-" in p.name for p in out.iterdir())


_MOMENTS = {
    "mid-step-save": lambda out: _partial(out, ".step_4"),
    "mid-epoch-save": lambda out: _partial(out, ".epoch_0"),
    "after-a-step-save": lambda out: (out / "step_8").is_dir(),
    "first-steps": lambda out: (out / "logs").is_dir() and any((out / "logs").iterdir()),
}


@requires_shared
@pytest.mark.heavy
def test_killed_anywhere_the_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path):
    """SIGKILL at several moments (inside a step save, inside the epoch save with its merged
    model, between saves, before any save), then ``resume_from_checkpoint=True`` (or a
    fresh start when nothing was saved): the final adapters, merged model and optimizer
    state equal an uninterrupted run's bit for bit, and no partial directory survives."""
    reference = _run(_resumable(tmp_path / "reference", 0.0))
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = 0
    for name, moment in _MOMENTS.items():
        out = tmp_path / name
        if not _kill_when(out, moment, 0.05):
            continue
        killed += 1
        saved = [p for p in out.iterdir() if p.name.startswith(("epoch_", "step_"))]
        resume = ["resume_from_checkpoint=True"] if saved else ["overwrite=True"]
        resumed = _run([*_resumable(out, 0.0), *resume])
        assert resumed.returncode == 0, (name, resumed.stderr[-3000:])
        assert not [p for p in out.iterdir() if ".partial-" in p.name or ".old-" in p.name], name
        for file in ("adapter/adapter_model.safetensors", "merged_int4/model.safetensors"):
            expected = _tensors(tmp_path / "reference" / "epoch_1" / file)
            got = _tensors(out / "epoch_1" / file)
            assert got.keys() == expected.keys(), (name, file)
            for key in expected:
                assert torch.equal(got[key], expected[key]), (name, file, key)
        ours = torch.load(out / "epoch_1" / "recipe_state.pt", weights_only=True)
        theirs = torch.load(tmp_path / "reference" / "epoch_1" / "recipe_state.pt", weights_only=True)
        for index, state in theirs["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(ours["optimizer"]["state"][index][key], value), (name, index, key)
    assert killed >= 3, f"only {killed} of the kill moments were reached"
