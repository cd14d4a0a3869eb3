"""Atomic writes: a checkpoint directory exists under its final name only when complete."""

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

__all__ = ["CheckpointWriteError", "atomic_directory", "atomic_write_text"]

# errno values of a write the disk or the system refused (not a bug in the writer)
_WRITE_ERRNOS = (
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM,
)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file too large, no permission, ...).

    Raised by :func:`atomic_directory` after it has removed its staging directory, so
    nothing under the final name was created or changed. The message says what to change.
    """


@contextlib.contextmanager
def atomic_directory(final: Union[str, Path], setting: str = "output_dir") -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``final`` once the block succeeds.

    The directory is created next to ``final`` (same filesystem, so the rename is atomic).
    If the block raises (or the process dies), ``final`` is untouched: a previous version
    stays as it was and no partial directory carries the final name. An existing ``final``
    is moved aside, replaced, then deleted.

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
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    except OSError as error:
        reason = _write_failure(error)
        if reason is None:
            raise
        raise _write_error(final, reason, setting) from error
    retired: Optional[Path] = None
    try:
        yield staging
        # mkdtemp (and some writers) create owner-only modes: apply the usual umask ones
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        for path in staging.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            retired = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, retired)
        os.replace(staging, final)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None and retired.exists() and not final.exists():
            os.replace(retired, final)  # the previous version goes back under its name
        reason = _write_failure(error) if isinstance(error, Exception) else None
        if reason is None:
            raise
        raise _write_error(final, reason, setting) from error


def atomic_write_text(final: Union[str, Path], text: str, setting: str = "output_dir") -> Path:
    """Write ``text`` to a temporary file beside ``final``, then rename it into place.

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
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(text)
        os.replace(staging, final)
    except OSError as error:
        staging.unlink(missing_ok=True)
        reason = _write_failure(error)
        if reason is None:
            raise
        raise _write_error(final, reason, setting) from error
    return final


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
