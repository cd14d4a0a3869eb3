"""The command line of a recipe: ``--config NAME_OR_PATH`` and ``key=value`` overrides.

torchtune's own parser splits an override at every ``=`` (so ``prompt="a=b"`` is refused)
and reports a broken YAML file with a traceback. :func:`parse_recipe_config` reads the same
command line, with torchtune's conventions (a packaged name or a path, ``key=value``,
``~key`` to remove an entry, ``model=dotted.path`` for a component's ``_component_``), and
turns every problem into one :class:`~qalora_tune.errors.UserError` naming what to change.
"""

import re
import weakref
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qalora_tune._files import read_text
from qalora_tune.errors import UserValueError

__all__ = [
    "config_variables",
    "interpolated_names",
    "packaged_config_names",
    "parse_recipe_config",
    "resolve_config",
    "resolve_config_argv",
]

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_0-9][A-Za-z0-9_]*)*$")


def _config_root() -> Path:
    return Path(str(resources.files("qalora_tune.configs")))


def packaged_config_names() -> List[str]:
    """Names accepted by ``--config`` without a path, e.g. ``llama2_7B_qalora``."""
    return sorted(p.stem for p in _config_root().glob("*.yaml"))


def resolve_config(name_or_path: str) -> str:
    """A config file path for ``name_or_path``: an existing file, or a packaged name.

    Raises:
        UserValueError: if it is neither, listing the packaged names.
    """
    if Path(name_or_path).is_file():
        return name_or_path
    name = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    packaged = _config_root() / f"{name}.yaml"
    if name and "/" not in name and packaged.is_file():
        return str(packaged)
    raise UserValueError(
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


def parse_recipe_config(argv: Sequence[str], recipe: str) -> DictConfig:
    """The config a recipe runs with: the YAML of ``--config`` with the overrides applied,
    every interpolation resolvable.

    Args:
        argv (Sequence[str]): the arguments after the program name.
        recipe (str): the recipe's name, for the messages.

    Raises:
        UserValueError: for a missing or unknown ``--config``, a file that is not UTF-8,
            not YAML or not a mapping, a malformed override, or an interpolation that
            cannot be resolved.
    """
    config_arg, overrides = _split_arguments(list(argv), recipe)
    path = resolve_config(config_arg)
    cfg = _load_yaml(Path(path))
    variables = interpolated_names(OmegaConf.to_container(cfg, resolve=False))
    for override in overrides:
        cfg = _apply_override(cfg, override)
    _VARIABLES[id(cfg)] = (weakref.ref(cfg), variables)
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        where = f" in {key}" if key else ""
        raise UserValueError(
            f"the config {path} cannot be resolved{where}: {_one_line(error)}; fix the "
            "${...} reference (it must name another setting of the config)"
        ) from None
    return cfg


# top-level names the config FILE interpolates (``${run_dir}``), by parsed config: such a
# helper key stays allowed after overrides replaced every use of it
_VARIABLES: Dict[int, Tuple[Any, Set[str]]] = {}
_INTERPOLATION = re.compile(r"\$\{\s*([A-Za-z_][A-Za-z0-9_]*)")


def interpolated_names(node: Any) -> Set[str]:
    """The first names of every ``${...}`` interpolation in a config tree."""
    if isinstance(node, dict):
        return set().union(*(interpolated_names(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(interpolated_names(v) for v in node))
    return set(_INTERPOLATION.findall(node)) if isinstance(node, str) else set()


def config_variables(cfg: DictConfig) -> Set[str]:
    """The names the config file of ``cfg`` interpolated (empty for a config not made by
    :func:`parse_recipe_config`)."""
    entry = _VARIABLES.get(id(cfg))
    return entry[1] if entry is not None and entry[0]() is cfg else set()


def _split_arguments(args: List[str], recipe: str):
    config_arg: Optional[str] = None
    overrides: List[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--config":
            if index + 1 >= len(args):
                raise UserValueError(f"--config needs a value: tune run {recipe} --config NAME_OR_PATH")
            config_arg = args[index + 1]
            index += 2
            continue
        if arg.startswith("--config="):
            config_arg = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            raise UserValueError(
                f"unknown option {arg}; {recipe} takes --config NAME_OR_PATH and key=value overrides"
            )
        else:
            overrides.append(arg)
        index += 1
    if not config_arg:
        raise UserValueError(
            f"no --config given; run tune run {recipe} --config NAME_OR_PATH (packaged configs: "
            f"{', '.join(packaged_config_names())})"
        )
    return config_arg, overrides


def _load_yaml(path: Path) -> DictConfig:
    text = read_text(path, "--config", "pass a YAML config file")
    try:
        data = yaml.safe_load(text)  # the structure; values are read by OmegaConf below
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or _one_line(error)
        raise UserValueError(
            f"--config {path} is not valid YAML{where} ({problem}); fix the file (qalora-tune "
            "cp NAME my.yaml gives a valid one to start from)"
        ) from None
    if data is None:
        raise UserValueError(f"--config {path} is empty; it must map settings to values")
    if not isinstance(data, dict):
        raise UserValueError(
            f"--config {path} holds a YAML {type(data).__name__}, not a mapping of settings; "
            "write it as key: value lines"
        )
    bad = [key for key in data if not isinstance(key, str)]
    if bad:
        raise UserValueError(f"--config {path} has a non-text key {bad[0]!r}; settings are names")
    if "config" in data:
        raise UserValueError(f"--config {path} must not set 'config'; remove that entry")
    try:
        # OmegaConf's YAML loader, as torchtune's: it also reads 1e-3 as a float
        return OmegaConf.create(text)
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise UserValueError(f"--config {path} cannot be read: {_one_line(error)}") from None


def _apply_override(cfg: DictConfig, override: str) -> DictConfig:
    if override.startswith("~"):
        key = override[1:].split("=", 1)[0]
        if not _KEY.match(key) or "_component_" in key:
            raise UserValueError(
                f"cannot remove {key!r}: ~KEY removes one setting by its dotted name (not a "
                "_component_)"
            )
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig) or name not in parent:
            raise UserValueError(f"cannot remove {key}: the config has no such setting")
        del parent[name]
        return cfg
    if "=" not in override:
        raise UserValueError(
            f"the argument {override!r} is not an override; write key=value (quote values "
            "with spaces, e.g. prompt=\"Once upon a time\")"
        )
    key, value = override.split("=", 1)
    if not _KEY.match(key):
        raise UserValueError(
            f"the override {override!r} does not start with a setting name; write key=value "
            "with a dotted key such as model.lora_rank=16"
        )
    node = OmegaConf.select(cfg, key, throw_on_missing=False) if _parent_is_mapping(cfg, key) else None
    if isinstance(node, DictConfig) and "_component_" in node:
        key = f"{key}._component_"  # torchtune's shortcut: model=qalora_tune.models.x
    try:
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
        return OmegaConf.merge(cfg, parsed)
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise UserValueError(f"the override {override!r} cannot be applied: {_one_line(error)}") from None


def _parent_is_mapping(cfg: DictConfig, key: str) -> bool:
    node: Any = cfg
    for part in key.split(".")[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
        node = node._value() if hasattr(node, "_value") else node
    return isinstance(node, DictConfig)


def _one_line(error: BaseException) -> str:
    text = str(error).split("\n    full_key")[0]
    return " ".join(text.split())
