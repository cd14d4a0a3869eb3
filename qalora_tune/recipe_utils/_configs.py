"""Resolve ``--config NAME`` to a YAML shipped in the package (or keep a path)."""

from importlib import resources
from pathlib import Path
from typing import List

__all__ = ["packaged_config_names", "resolve_config", "resolve_config_argv"]


def _config_root() -> Path:
    return Path(str(resources.files("qalora_tune.configs")))


def packaged_config_names() -> List[str]:
    """Names accepted by ``--config`` without a path, e.g. ``llama2_7B_qalora``."""
    return sorted(p.stem for p in _config_root().glob("*.yaml"))


def resolve_config(name_or_path: str) -> str:
    """A config file path for ``name_or_path``: an existing file, or a packaged name.

    Raises:
        ValueError: if it is neither, listing the packaged names.
    """
    if Path(name_or_path).is_file():
        return name_or_path
    name = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    packaged = _config_root() / f"{name}.yaml"
    if packaged.is_file():
        return str(packaged)
    raise ValueError(
        f"--config {name_or_path!r} is neither a file nor a packaged config; "
        f"packaged configs: {', '.join(packaged_config_names())}"
    )


def resolve_config_argv(argv: List[str]) -> List[str]:
    """``argv`` with the value after ``--config`` resolved by :func:`resolve_config`."""
    argv = list(argv)
    for index, arg in enumerate(argv[:-1]):
        if arg == "--config":
            argv[index + 1] = resolve_config(argv[index + 1])
    return argv
