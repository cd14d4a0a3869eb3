"""Errors a user fixes by changing a setting, a file or the machine, not the code.

Every recipe (``tune run qalora_*``) prints an error of these types as one line,
``<recipe>: error: <message>``, and exits with status 1; any other exception is a bug
and keeps its traceback (set ``QALORA_TUNE_TRACEBACK=1`` to see the traceback of a user
error too). Each message names the setting or file and what to change.

The classes also derive from the built-in exception a caller would expect
(``UserValueError`` is a ``ValueError``, ``UserFileNotFoundError`` a
``FileNotFoundError``, ...), so library code can be used without knowing this module.
"""

__all__ = [
    "UserError",
    "UserFileNotFoundError",
    "UserPermissionError",
    "UserTypeError",
    "UserValueError",
]


class UserError(Exception):
    """Base class: the message says what to change; recipes print it on one line."""


class UserValueError(UserError, ValueError):
    """A setting or a file's content has a value that cannot work."""


class UserTypeError(UserError, TypeError):
    """A setting or an argument has the wrong type (e.g. ``batch_size=abc``)."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or directory a setting names does not exist."""


class UserPermissionError(UserError, PermissionError):
    """A file or directory a setting names cannot be read or written."""
