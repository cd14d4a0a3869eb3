"""Atomic writes: a checkpoint directory exists under its final name only when complete."""

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Union

from qalora_tune.errors import UserError

__all__ = [
    "CheckpointWriteError",
    "OLD_MARK",
    "PARTIAL_MARK",
    "atomic_directory",
    "atomic_write_text",
    "recover_interrupted_writes",
]

# name parts of a directory being written (``.epoch_1.partial-x1y2``) and of a previous
# version moved aside while it is replaced (``.epoch_1.old-1234``)
PARTIAL_MARK = ".partial-"
OLD_MARK = ".old-"

# errno values of a write the disk or the system refused (not a bug in the writer)
_WRITE_ERRNOS = (
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM,
)


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, file too large, no permission, ...).

    Raised by :func:`atomic_directory` after it has removed its staging directory, so
    nothing under the final name was created or changed. The message says what to change.
    """


@contextlib.contextmanager
def atomic_directory(final: Union[str, Path], setting: str = "output_dir") -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``final`` once the block succeeds.

    The directory is created next to ``final`` (same filesystem, so renames are atomic).
    Every file and directory in it is fsynced before it takes the final name, and the
    parent directory after. If the block raises (or the process dies), ``final`` is
    untouched: a previous version stays as it was and no partial directory carries the
    final name. An existing ``final`` is swapped with the new one in a single atomic
    ``renameat2(RENAME_EXCHANGE)``, so there is no moment without a complete ``final``;
    where the filesystem lacks that call, the previous version is first renamed to
    ``.{name}.old-{pid}`` and :func:`recover_interrupted_writes` puts it back if the
    process dies in between.

    Args:
        final (str or Path): where the completed directory must end up.
        setting (str): the config key that chose where ``final`` lives, named when the
            disk refuses the write.

    Yields:
        Path: the temporary directory to write into.

    Raises:
        CheckpointWriteError: if a write fails for lack of space, size limit or
            permission (the staging directory is removed first).
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL_MARK}", dir=final.parent))
    except OSError as error:
        reason = _write_failure(error)
        if reason is None:
            raise
        raise _write_error(final, reason, setting) from error
    retired: Optional[Path] = None
    try:
        yield staging
        _apply_umask_modes(staging)
        _fsync_tree(staging)
        if final.exists() and _exchange(staging, final):
            retired = staging  # now holds the previous version
        else:
            if final.exists():
                retired = final.parent / f".{final.name}{OLD_MARK}{os.getpid()}"
                os.replace(final, retired)
            os.replace(staging, final)
        _fsync_directory(final.parent)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException as error:
        if retired is None or retired != staging:
            shutil.rmtree(staging, ignore_errors=True)
        if retired is not None and retired.exists() and not final.exists():
            os.replace(retired, final)  # the previous version goes back under its name
        reason = _write_failure(error) if isinstance(error, Exception) else None
        if reason is None:
            raise
        raise _write_error(final, reason, setting) from error


def atomic_write_text(final: Union[str, Path], text: str, setting: str = "output_dir") -> Path:
    """Write ``text`` to a temporary file beside ``final``, fsync it, then rename it into
    place (and fsync the directory).

    Args:
        final (str or Path): the file to (re)write.
        text (str): its whole content.
        setting (str): the config key that chose where ``final`` lives.

    Returns:
        Path: ``final``.

    Raises:
        CheckpointWriteError: if the disk refuses the write; ``final`` is then untouched.
    """
    final = Path(final)
    staging = final.with_name(f".{final.name}{PARTIAL_MARK}{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(staging, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, final)
        _fsync_directory(final.parent)
    except OSError as error:
        staging.unlink(missing_ok=True)
        reason = _write_failure(error)
        if reason is None:
            raise
        raise _write_error(final, reason, setting) from error
    return final


def recover_interrupted_writes(directory: Union[str, Path]) -> List[str]:
    """Finish what a process killed in the middle of a write left in ``directory``.

    - ``.{name}.partial-*`` (a staging directory or file never completed) is removed;
    - ``.{name}.old-{pid}`` (a previous version moved aside for a replacement) is put
      back under ``name`` when ``name`` is missing, and removed otherwise.

    Call it only while no other process writes there (the recipes hold the output
    directory's lock, :class:`~qalora_tune.recipe_utils.OutputDirLock`).

    Returns:
        List[str]: what was done, one line per entry (for the log).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    done = []
    for path in sorted(directory.iterdir()):
        name = path.name
        if not name.startswith("."):
            continue
        if OLD_MARK in name:
            original = directory / name[1:].split(OLD_MARK, 1)[0]
            if not original.exists():
                os.replace(path, original)
                done.append(f"restored {original} (a replacement was interrupted)")
            else:
                _remove(path)
                done.append(f"removed {path} (left by an interrupted replacement)")
        elif PARTIAL_MARK in name:
            _remove(path)
            done.append(f"removed {path} (an interrupted write)")
    if done:
        _fsync_directory(directory)
    return done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _apply_umask_modes(staging: Path) -> None:
    """mkdtemp (and some writers) create owner-only modes: apply the usual umask ones."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    for path in staging.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first), under ``root``."""
    directories = [root]
    for path in root.rglob("*"):
        if path.is_dir():
            directories.append(path)
        elif path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem does not offer it."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    number = ctypes.get_errno()
    if number in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(number, os.strerror(number), str(second))


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _write_error(final: Path, reason: str, setting: str) -> CheckpointWriteError:
    kept = (
        f"the previous {final} is intact"
        if final.exists()
        else f"nothing was written under {final.name}; earlier checkpoints in {final.parent} are intact"
    )
    return CheckpointWriteError(
        f"could not write {final}: {reason}; free space on that disk (or raise its quota "
        f"or file size limit) or set {setting} to another location ({kept})"
    )


def _write_failure(error: BaseException) -> Optional[str]:
    """``"[Errno N] reason"`` when ``error`` (or what caused it) is the disk refusing a
    write; None for anything else.

    safetensors and ``torch.save`` do not raise ``OSError``: safetensors names the OS error
    in its message (``"File too large (os error 27)"``) and ``torch.save`` raises a
    ``RuntimeError`` whose context is the ``OSError`` when writing through Python, and
    ``"PytorchStreamWriter failed writing file"`` / ``"unexpected pos"`` otherwise.
    """
    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _WRITE_ERRNOS:
            return f"[Errno {current.errno}] {os.strerror(current.errno)}"
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    if isinstance(error, (ValueError, TypeError, LookupError)):
        return None  # a message of ours, not the disk's
    message = str(error)
    for number in _WRITE_ERRNOS:
        if f"os error {number})" in message or os.strerror(number) in message:
            return f"[Errno {number}] {os.strerror(number)}"
    if "PytorchStreamWriter failed" in message or (
        "inline_container" in message and "unexpected pos" in message
    ):
        return "the PyTorch file writer failed (the disk is full or the file too large)"
    return None
