"""The entry point every recipe shares: the command line, one-line errors, Ctrl-C.

``tune run qalora_<recipe> --config NAME_OR_PATH key=value ...`` reaches
:func:`run_recipe`, which parses the command line (:func:`parse_recipe_config`), runs the
recipe, and turns what a user can fix into one line on stderr:

- a :class:`~qalora_tune.errors.UserError` (a setting, a file, the disk):
  ``<recipe>: error: <message>``, exit status 1;
- the disk refusing a write anywhere (no space, quota, file size limit, read-only):
  the same, naming the file;
- Ctrl-C: ``<recipe>: interrupted: <where it stopped, the last checkpoint, how to
  resume>``, exit status 130.

Anything else is a bug and keeps its traceback. ``QALORA_TUNE_TRACEBACK=1`` shows the
traceback of user errors too.
"""

import errno
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

from qalora_tune._progress import close_progress_bars
from qalora_tune.errors import UserError
from qalora_tune.recipe_utils._configs import parse_recipe_config
from qalora_tune.recipe_utils._output_dir import release_all_locks

__all__ = ["interrupt_note", "resume_command", "run_recipe", "set_interrupt_note"]

_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_interrupt_note: Optional[Callable[[], str]] = None


def set_interrupt_note(note: Optional[Callable[[], str]]) -> None:
    """Register what Ctrl-C should report: ``note()`` returns where the run stopped, its
    last checkpoint and how to resume (``None``: the default, nothing was written)."""
    global _interrupt_note
    _interrupt_note = note


def resume_command(argv: Optional[List[str]] = None, extra: str = "resume_from_checkpoint=True") -> str:
    """The ``tune run`` command that repeats this run with ``extra`` (replacing the same key)."""
    argv = list(sys.argv if argv is None else argv)
    name = os.path.splitext(os.path.basename(argv[0]))[0] if argv else "qalora_finetune"
    key = extra.split("=", 1)[0]
    kept = [
        a if " " not in a else f'"{a}"'
        for a in argv[1:]
        if a.split("=", 1)[0] not in (key, "overwrite")
    ]
    return " ".join(["tune", "run", name, *kept, extra])


def interrupt_note(latest: Optional[Path], global_step: int, epochs_run: int, total_epochs: int) -> str:
    """The training recipe's Ctrl-C line: where it stopped, the last checkpoint (``latest``,
    ``None`` when nothing was saved) and the command that resumes it."""
    where = (
        f"at global step {global_step} (epoch {epochs_run + 1} of {total_epochs})"
        if global_step
        else "before the first optimizer step"
    )
    if latest is None:
        return f"stopped {where}; no checkpoint was written; run the same command to start again"
    return f"stopped {where}; the last checkpoint is {latest}; resume with: {resume_command()}"


def run_recipe(name: str, recipe_main: Callable[[DictConfig], None], argv: Optional[List[str]] = None) -> None:
    """Parse the command line and run ``recipe_main(cfg)``, reporting user errors in one line.

    Args:
        name (str): the recipe's name, the prefix of its messages.
        recipe_main (Callable[[DictConfig], None]): the recipe's main.
        argv (List[str], optional): defaults to ``sys.argv`` (program name first).
    """
    argv = list(sys.argv if argv is None else argv)
    sys.argv = argv
    set_interrupt_note(None)
    try:
        cfg = parse_recipe_config(argv[1:], name)
        recipe_main(cfg)
    except KeyboardInterrupt:
        note = _interrupt_note() if _interrupt_note is not None else (
            "stopped before any checkpoint was written"
        )
        _print(f"{name}: interrupted: {note}")
        sys.exit(130)
    except UserError as error:
        _fail(name, str(error), error)
    except (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue) as error:
        key = getattr(error, "full_key", None) or "a setting"
        _fail(name, f"the config has no value for {key}; set {key}=... (or add it to the YAML)", error)
    except OSError as error:
        if error.errno not in _DISK_ERRNOS:
            raise
        where = f" {error.filename}" if error.filename else ""
        _fail(
            name,
            f"could not write{where}: [Errno {error.errno}] {os.strerror(error.errno)}; free "
            "space on that disk (or raise its quota or file size limit), or write elsewhere "
            "(output_dir); files written before are intact",
            error,
        )
    finally:
        set_interrupt_note(None)
        release_all_locks()


def _fail(name: str, message: str, error: BaseException) -> None:
    if os.environ.get("QALORA_TUNE_TRACEBACK") == "1":
        raise error
    _print(f"{name}: error: {' '.join(message.split())}")
    sys.exit(1)


def _print(line: str) -> None:
    close_progress_bars()  # a bar cut short by the error ends its line first
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
