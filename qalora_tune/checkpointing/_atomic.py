"""Atomic writes: a checkpoint directory exists under its final name only when complete."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_directory"]


@contextlib.contextmanager
def atomic_directory(final: Union[str, Path]) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``final`` once the block succeeds.

    The directory is created next to ``final`` (same filesystem, so the rename is atomic).
    If the block raises (or the process dies), ``final`` is untouched: a previous version
    stays as it was and no partial directory carries the final name. An existing ``final``
    is moved aside, replaced, then deleted.

    Args:
        final (str or Path): where the completed directory must end up.

    Yields:
        Path: the temporary directory to write into.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
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
        retired = None
        if final.exists():
            retired = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, retired)
        os.replace(staging, final)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
