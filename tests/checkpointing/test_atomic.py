"""``atomic_directory`` when the disk refuses a write: one ``CheckpointWriteError`` that
says what to change, the staging directory removed, nothing under the final name."""

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qalora_tune.checkpointing import (
    CheckpointWriteError,
    atomic_directory,
    atomic_write_text,
)

ROOT = Path(__file__).resolve().parents[2]


def _entries(directory: Path):
    return sorted(p.name for p in directory.iterdir())


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_no_space_left_is_a_checkpoint_write_error_and_leaves_nothing(tmp_path, monkeypatch):
    previous = tmp_path / "epoch_0"
    previous.mkdir()
    (previous / "weights").write_text("good")
    # a full disk often surfaces only when the data is flushed
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(CheckpointWriteError) as error:
        with atomic_directory(tmp_path / "epoch_1") as staging:
            (staging / "adapter").mkdir()
            torch.save({"x": torch.ones(2)}, staging / "recipe_state.pt")
    message = str(error.value)
    assert message.startswith(f"could not write {tmp_path / 'epoch_1'}: [Errno 28] No space left")
    assert "set output_dir to another location" in message and "free space" in message
    assert f"earlier checkpoints in {tmp_path} are intact" in message
    assert isinstance(error.value, OSError) and "\n" not in message
    assert _entries(tmp_path) == ["epoch_0"]  # staging removed, no epoch_1
    assert (previous / "weights").read_text() == "good"


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    final = tmp_path / "summary.json"
    assert atomic_write_text(final, "first") == final and final.read_text() == "first"
    atomic_write_text(final, "second")
    assert final.read_text() == "second" and _entries(tmp_path) == ["summary.json"]
    monkeypatch.setattr(os, "replace", _no_space)
    with pytest.raises(CheckpointWriteError, match="set output_dir to another location"):
        atomic_write_text(final, "third")
    assert final.read_text() == "second" and _entries(tmp_path) == ["summary.json"]


def test_a_failed_rewrite_keeps_the_previous_version_under_its_name(tmp_path, monkeypatch):
    final = tmp_path / "merged_int4"
    final.mkdir()
    (final / "model.safetensors").write_text("previous")
    with pytest.raises(CheckpointWriteError, match="set merged_dir to another location") as error:
        with atomic_directory(final, setting="merged_dir") as staging:
            (staging / "model.safetensors").write_text("new")
            _no_space()
    assert f"the previous {final} is intact" in str(error.value)
    assert _entries(tmp_path) == ["merged_int4"]
    assert (final / "model.safetensors").read_text() == "previous"


@pytest.mark.parametrize(
    "error, reason",
    [
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "[Errno 122]"),
        (RuntimeError("Error while serializing: I/O error: File too large (os error 27)"), "[Errno 27]"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
         "PyTorch file writer failed"),
    ],
    ids=["quota", "safetensors", "torch_save"],
)
def test_writer_specific_failures_are_recognised(tmp_path, error, reason):
    with pytest.raises(CheckpointWriteError, match=rf"could not write .*{reason}"):
        with atomic_directory(tmp_path / "epoch_0"):
            raise error
    assert _entries(tmp_path) == []


@pytest.mark.parametrize(
    "error",
    [ValueError("a bad setting; Permission denied"), FileNotFoundError(2, "No such file"),
     RuntimeError("a bug")],
    ids=["value_error", "missing_file", "bug"],
)
def test_other_errors_pass_through_unchanged(tmp_path, error):
    with pytest.raises(type(error)) as raised:
        with atomic_directory(tmp_path / "epoch_0"):
            raise error
    assert raised.value is error and not isinstance(raised.value, CheckpointWriteError)
    assert _entries(tmp_path) == []


# a real refusal: a file size limit (Python ignores SIGXFSZ, so writes fail with EFBIG),
# met by each writer a checkpoint uses
WRITERS = ("safetensors", "torch", "python")
SCRIPT = r"""
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from qalora_tune.checkpointing import CheckpointWriteError, atomic_directory, atomic_write_text
root = Path(sys.argv[1])
for writer in sys.argv[2:]:
    try:
        with atomic_directory(root / "epoch_1") as staging:
            (staging / "small.json").write_text("{}")
            tensors = {"x": torch.zeros(100_000)}
            if writer == "safetensors":
                save_file(tensors, str(staging / "model.safetensors"))
            elif writer == "torch":
                torch.save(tensors, staging / "recipe_state.pt")
            else:
                (staging / "big.bin").write_bytes(bytes(400_000))
        print(writer, "written")
    except CheckpointWriteError as error:
        print(writer, error)
"""


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_a_real_file_size_limit_is_reported_and_cleaned_up(tmp_path):
    (tmp_path / "epoch_0").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), *WRITERS],
        cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()[-len(WRITERS):]
    for writer, line in zip(WRITERS, lines):
        assert line.startswith(f"{writer} could not write {tmp_path / 'epoch_1'}: "), line
        assert ("[Errno 27] File too large" in line) or ("PyTorch file writer failed" in line)
    assert _entries(tmp_path) == ["epoch_0"]
