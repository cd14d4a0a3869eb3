"""Building a config section's ``_component_``, with its failures reported as the section's.

A component the user configured (a tokenizer, a dataset, an optimizer) that fails while
it is built failed because of its settings or of the files they name: a garbage
``tokenizer.model``, a dataset file that is not JSON, ``optimizer.betas`` out of range.
:func:`instantiate_section` reports such a failure as a one-line
:class:`~qalora_tune.errors.UserValueError` naming the section, the component and the
file; errors that mean a bug (``AttributeError``, ``NameError``, ...) keep their traceback.
"""

from typing import Any

from omegaconf import DictConfig
from torchtune import config

from qalora_tune.errors import UserError, UserValueError

__all__ = ["instantiate_section"]

# exceptions that mean a bug in code, never a bad setting or file
_BUGS = (
    AttributeError,
    NameError,
    ImportError,
    AssertionError,
    NotImplementedError,
    RecursionError,
    MemoryError,
    SyntaxError,
)


def instantiate_section(section: DictConfig, setting: str, *args: Any, **kwargs: Any) -> Any:
    """``config.instantiate(section, *args, **kwargs)``, failures named after ``setting``.

    Args:
        section (DictConfig): the config section with a ``_component_``.
        setting (str): its key in the config (``tokenizer``, ``dataset``, ...).
        *args, **kwargs: passed to the component, as ``config.instantiate`` does.

    Raises:
        UserValueError: if the component fails to build for a reason other than a bug.
    """
    try:
        return config.instantiate(section, *args, **kwargs)
    except UserError:
        raise
    except _BUGS:
        raise
    except Exception as error:  # noqa: BLE001 - third-party code raises anything
        component = section.get("_component_", "?") if isinstance(section, DictConfig) else "?"
        files = [
            f"{setting}.{key}={section.get(key)}"
            for key in ("path", "data_files", "source")
            if isinstance(section, DictConfig) and isinstance(section.get(key), str)
        ]
        named = f" ({', '.join(files)})" if files else ""
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        advice = (
            f"check that {files[0].split('=')[0]} names a valid file for {component}"
            if files
            else f"check the settings of {setting}"
        )
        raise UserValueError(
            f"{setting}: {component}{named} failed: {type(error).__name__}: {reason}; {advice}"
        ) from error
