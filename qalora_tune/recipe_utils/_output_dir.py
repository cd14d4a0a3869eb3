"""Output directories that never lose data: one run at a time, no silent replacement.

- :class:`OutputDirLock`: an exclusive ``flock`` on ``{output_dir}/.qalora-tune.lock``,
  held for the life of the process (the kernel drops it when the process ends, even on
  ``kill -9``), so a second run into the same directory fails at start, naming the first.
- :func:`previous_run_outputs` / :func:`check_run_dir`: a fine-tuning run refuses a
  directory that holds another run's checkpoints unless told to resume or overwrite.
- :func:`check_merge_target`: a merge never writes over the adapter, the base, or a
  directory it did not write.
"""

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from qalora_tune.checkpointing import OUTPUT_MARKER_NAME
from qalora_tune.errors import UserValueError

__all__ = [
    "LOCK_NAME",
    "OutputDirLock",
    "check_merge_target",
    "check_run_dir",
    "previous_run_outputs",
    "release_all_locks",
    "remove_previous_run",
]

LOCK_NAME = ".qalora-tune.lock"
_held: List["OutputDirLock"] = []  # released together when a recipe returns or fails
_RUN_ENTRY = re.compile(r"^(epoch_\d+|step_\d+|summary\.json)$")


class OutputDirLock:
    """An exclusive lock on a directory for one recipe run.

    Args:
        directory (str or Path): the directory the run writes (created if missing).
        recipe (str): the recipe's name, recorded for whoever finds it locked.
        setting (str): the config key naming the directory, for the message.
        lock_name (str): the lock file's name inside ``directory``.
    """

    def __init__(
        self,
        directory: Union[str, Path],
        recipe: str,
        setting: str = "output_dir",
        lock_name: str = LOCK_NAME,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / lock_name
        self._recipe = recipe
        self._setting = setting
        self._handle = None

    def acquire(self) -> "OutputDirLock":
        """Take the lock or fail at once.

        Raises:
            UserValueError: if another process holds it, naming that process.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe_holder(handle.read())
            handle.close()
            raise UserValueError(
                f"{self._setting}={self.directory} is in use by another run ({holder}); wait "
                f"for it to finish, or set {self._setting} to another directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "recipe": self._recipe,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }))
        handle.flush()
        self._handle = handle
        _held.append(self)
        return self

    def release(self) -> None:
        """Give the lock up (also done by the kernel when the process ends)."""
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
        if self in _held:
            _held.remove(self)

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def release_all_locks() -> None:
    """Release every lock this process took (the recipes' entry point does, whatever
    happened, so that a recipe run in-process leaves nothing locked)."""
    for lock in list(_held):
        lock.release()


def _describe_holder(text: str) -> str:
    try:
        info: Dict[str, Any] = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return "a process that holds its lock file"
    return (
        f"{info.get('recipe', 'a recipe')}, pid {info.get('pid')} on {info.get('host')}, "
        f"started {info.get('started')}: {info.get('command', '')}".strip()
    )


def previous_run_outputs(output_dir: Union[str, Path]) -> List[str]:
    """The names in ``output_dir`` that a fine-tuning run writes (``epoch_{k}``,
    ``step_{n}``, ``summary.json``), sorted; empty for a fresh directory."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if _RUN_ENTRY.match(p.name))


def check_run_dir(output_dir: Union[str, Path], resume: bool, overwrite: bool) -> Optional[str]:
    """Why fine-tuning may not start in ``output_dir`` (None when it may).

    A directory holding another run's outputs needs ``resume_from_checkpoint=True`` (go
    on from its newest checkpoint) or ``overwrite=True`` (replace it); resuming needs one.
    """
    found = previous_run_outputs(output_dir)
    if resume:
        if not any(name != "summary.json" for name in found):
            return (
                f"resume_from_checkpoint=True but output_dir={output_dir} holds no epoch_* or "
                "step_* checkpoint; set resume_from_checkpoint=False to start fresh, or "
                "output_dir to the interrupted run's directory"
            )
        return None
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        return (
            f"output_dir={output_dir} already holds a run ({shown}); set "
            "resume_from_checkpoint=True to continue it, set output_dir to a new directory, "
            "or set overwrite=True to replace it"
        )
    return None


def remove_previous_run(output_dir: Union[str, Path]) -> List[str]:
    """Delete another run's ``epoch_*``, ``step_*`` and ``summary.json`` (``overwrite=True``).

    Each is first renamed to a hidden ``.partial-`` name, so a crash halfway leaves no
    mix of old and new checkpoints under checkpoint names.
    """
    directory = Path(output_dir)
    removed = previous_run_outputs(directory)
    for name in removed:
        doomed = directory / f".{name}.partial-overwritten-{os.getpid()}"
        os.replace(directory / name, doomed)
        if doomed.is_dir():
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            doomed.unlink(missing_ok=True)
    return removed


def check_merge_target(
    merged_dir: Union[str, Path], protected: Dict[str, Union[str, Path]]
) -> Optional[str]:
    """Why a merge may not write ``merged_dir`` (None when it may).

    Args:
        merged_dir (str or Path): where the merged model would go (``merged_dir=``).
        protected (Dict[str, Path]): directories that must survive, by the setting that
            names them (``adapter_dir``, ``checkpointer.checkpoint_dir``).

    It may not be, contain, or lie inside a protected directory; and it must be new,
    empty, or a merged model written by qalora-tune (it carries the output marker).
    """
    target = Path(os.path.realpath(Path(merged_dir).expanduser()))
    for setting, directory in protected.items():
        kept = Path(os.path.realpath(Path(directory).expanduser()))
        if target == kept or target in kept.parents or kept in target.parents:
            relation = (
                "is" if target == kept else "contains" if target in kept.parents else "lies inside"
            )
            return (
                f"merged_dir={merged_dir} {relation} {setting}={directory}, which the merge must "
                "not touch; set merged_dir to a new directory outside it"
            )
    if target.exists() and not target.is_dir():
        return f"merged_dir={merged_dir} is a file; set merged_dir to a new directory"
    if target.is_dir():
        entries = sorted(p.name for p in target.iterdir())
        if entries and OUTPUT_MARKER_NAME not in entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            return (
                f"merged_dir={merged_dir} holds files qalora-tune did not write ({shown}); set "
                "merged_dir to a new or empty directory"
            )
    return None
