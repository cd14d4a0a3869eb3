"""Reading the small files a checkpoint directory holds, with one-line errors naming them.

Nothing read here is ever executed: JSON is parsed as data, and files copied out of a
directory are checked to be regular files inside it (:func:`is_regular_file_inside`).
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

from qalora_tune.errors import (
    UserFileNotFoundError,
    UserPermissionError,
    UserValueError,
)

__all__ = ["is_regular_file_inside", "read_json", "read_text"]


def read_text(path: Union[str, Path], what: str = "file", fix: str = "") -> str:
    """The UTF-8 text of ``path``.

    Args:
        path (str or Path): the file.
        what (str): what the file is, for the messages (e.g. ``"dataset.path"``).
        fix (str): what to do about a bad file, appended to the messages.

    Raises:
        UserFileNotFoundError: if it does not exist or is a directory.
        UserPermissionError: if it cannot be read.
        UserValueError: if it is not UTF-8 text.
    """
    path = Path(path)
    suffix = f"; {fix}" if fix else ""
    if path.is_dir():
        raise UserFileNotFoundError(f"{what} {path} is a directory, not a file{suffix}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserFileNotFoundError(f"{what} {path} not found{suffix}") from None
    except PermissionError:
        raise UserPermissionError(f"{what} {path} cannot be read (permission denied){suffix}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserValueError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}){suffix or '; convert it to UTF-8'}"
        ) from None


def read_json(
    path: Union[str, Path], what: str = "file", fix: str = "", required: bool = True
) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path`` (``None`` when absent and not ``required``).

    Raises:
        UserFileNotFoundError: if a required file is absent.
        UserValueError: if it is not UTF-8, not valid JSON, or not a JSON object.
    """
    path = Path(path)
    if not required and not path.exists():
        return None
    text = read_text(path, what, fix)
    suffix = f"; {fix}" if fix else ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserValueError(
            f"{what} {path} is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno}){suffix}"
        ) from None
    if not isinstance(value, dict):
        raise UserValueError(
            f"{what} {path} holds a JSON {type(value).__name__}, not an object{suffix}"
        )
    return value


def is_regular_file_inside(path: Union[str, Path], directory: Union[str, Path]) -> bool:
    """Whether ``path`` is a regular file that really lies inside ``directory``.

    A symbolic link counts only when its target is inside ``directory`` too, or, for a
    Hugging Face cache snapshot (``.../models--org--name/snapshots/<revision>``), inside
    that model's ``blobs/`` folder, where the hub keeps the files its snapshots link to.
    Anything else (a link to ``/etc/passwd``, a FIFO, a device) is not copied out of a
    checkpoint directory.
    """
    path, directory = Path(path), Path(directory)
    if not path.is_file():  # follows links: a dangling link or a FIFO is not a file
        return False
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(directory))]
    if roots[0].parent.name == "snapshots" and roots[0].parent.parent.name.startswith("models--"):
        roots.append(roots[0].parent.parent / "blobs")
    return any(real == root or root in real.parents for root in roots)
