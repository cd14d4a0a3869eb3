"""Types and ranges of a recipe's scalar settings, checked before anything runs.

A YAML value or a ``key=value`` override arrives as whatever YAML makes of it
(``batch_size=abc`` is a string, ``epochs=0`` an integer that cannot work). Each recipe
declares a schema, ``{"dotted.key": Setting}``, and :func:`check_settings` returns one
message per bad value, naming the key, the value, what it must be and an example.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from qalora_tune.checkpointing._safetensors_io import parse_size

__all__ = [
    "Setting",
    "SettingsSchema",
    "boolean",
    "check_settings",
    "device_name",
    "fraction",
    "join_problems",
    "non_negative_int",
    "non_negative_number",
    "one_of",
    "positive_int",
    "positive_number",
    "prompt_text",
    "text",
]

_ABSENT = object()


@dataclass(frozen=True)
class Setting:
    """One setting's rule.

    Args:
        accepts (Callable[[Any], bool]): whether a (non-null) value is valid.
        description (str): what the value must be, e.g. ``"a positive integer"``.
        example (str): a valid value, shown as ``set KEY to e.g. EXAMPLE``.
        nullable (bool): whether ``null`` is allowed.
        required (bool): whether the key must be present.
    """

    accepts: Callable[[Any], bool]
    description: str
    example: str
    nullable: bool = False
    required: bool = False

    def optional(self) -> "Setting":
        """The same rule, ``null`` allowed."""
        return Setting(self.accepts, f"{self.description} or null", self.example, True, self.required)

    def needed(self) -> "Setting":
        """The same rule, the key required."""
        return Setting(self.accepts, self.description, self.example, self.nullable, True)

    def problem(self, key: str, value: Any) -> Optional[str]:
        if value is _ABSENT:
            return f"{key} is not set; set {key} to {self.description}, e.g. {key}={self.example}" if self.required else None
        if value is None:
            return None if self.nullable else (
                f"{key} is null; set {key} to {self.description}, e.g. {key}={self.example}"
            )
        if self.accepts(value):
            return None
        return (
            f"{key}={_show(value)} is not {self.description}; set {key} to e.g. {self.example}"
        )


SettingsSchema = Dict[str, "Setting"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def positive_int(example: str = "1") -> Setting:
    return Setting(lambda v: _is_int(v) and v >= 1, "a positive integer", example)


def non_negative_int(example: str = "0") -> Setting:
    return Setting(lambda v: _is_int(v) and v >= 0, "a non-negative integer", example)


def positive_number(example: str = "1.0") -> Setting:
    return Setting(lambda v: _is_number(v) and v > 0, "a positive number", example)


def non_negative_number(example: str = "0.0") -> Setting:
    return Setting(lambda v: _is_number(v) and v >= 0, "a non-negative number", example)


def fraction(example: str = "0.1") -> Setting:
    """A number in ``[0, 1]`` (a ratio of another setting)."""
    return Setting(lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]", example)


def boolean() -> Setting:
    return Setting(lambda v: isinstance(v, bool), "True or False", "True")


def text(example: str) -> Setting:
    return Setting(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty text", example)


def one_of(*values: str) -> Setting:
    """One of ``values`` (texts)."""
    return Setting(lambda v: v in values, f"one of {', '.join(values)}", values[0])


def byte_size(example: str = "5GB") -> Setting:
    """A positive size: bytes as an integer, or a text such as ``"5GB"`` or ``"500MB"``."""

    def accepts(value: Any) -> bool:
        try:
            parse_size(value)
        except ValueError:
            return False
        return isinstance(value, (int, str)) and not isinstance(value, bool)

    return Setting(accepts, "a size in bytes or a text such as 5GB or 500MB", example)


def device_name() -> Setting:
    """``cpu``, ``cuda`` or ``cuda:N`` (availability is checked by ``check_device``)."""

    def accepts(value: Any) -> bool:
        if not isinstance(value, str):
            return False
        kind, _, index = value.partition(":")
        return (kind == "cpu" and not index) or (kind == "cuda" and (not index or index.isdigit()))

    return Setting(accepts, "a device: cpu, cuda or cuda:N", "cpu")


def prompt_text() -> Setting:
    """A prompt: a text, or a non-empty list of texts."""

    def accepts(value: Any) -> bool:
        if isinstance(value, str):
            return True
        return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)

    return Setting(accepts, "a text or a non-empty list of texts", '"Once upon a time"')


def check_settings(cfg: DictConfig, schema: Mapping[str, Setting]) -> List[str]:
    """One message per setting of ``schema`` whose value in ``cfg`` breaks its rule.

    Keys are dotted (``optimizer.lr``); a key under a section the config lacks (no
    ``lr_scheduler``) is absent, and absent keys are fine unless ``required``.
    """
    problems = []
    for key, setting in schema.items():
        message = setting.problem(key, _lookup(cfg, key))
        if message is not None:
            problems.append(message)
    return problems


def _lookup(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return _ABSENT
        node = node[part]
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _show(value: Any) -> str:
    text_value = repr(value) if isinstance(value, str) else str(value)
    return text_value if len(text_value) <= 60 else text_value[:57] + "..."


def join_problems(problems: Sequence[str]) -> str:
    """One line for one or several problems: ``"2 problems: (1) ...; (2) ..."``."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + "; ".join(
        f"({index}) {problem}" for index, problem in enumerate(problems, 1)
    )

