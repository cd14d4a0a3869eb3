"""Check a recipe's config before anything runs: unknown keys, components, arguments.

torchtune ignores a top-level key no recipe reads and fails late, with a traceback, on a
misspelled ``_component_`` or argument. :func:`check_config` turns each into one
``ValueError`` that names the setting and, where one is close, the intended spelling.
"""

import difflib
import inspect
import pkgutil
from typing import Any, Dict, Iterable, List, Optional, Set

from omegaconf import DictConfig, OmegaConf

from qalora_tune._compat import get_component_from_path
from qalora_tune.errors import UserValueError
from qalora_tune.models import MOVED_BUILDERS
from qalora_tune.recipe_utils._configs import config_variables, interpolated_names
from qalora_tune.recipe_utils._settings import join_problems

__all__ = ["check_config", "config_problems"]

_COMPONENT = "_component_"


def check_config(cfg: DictConfig, known_keys: Iterable[str], recipe: str) -> None:
    """Refuse unknown top-level keys, components that do not import, unknown arguments.

    See :func:`config_problems`; every problem found is reported in one error.

    Raises:
        UserValueError: naming each problem and, when one is close, what was meant.
    """
    problems = config_problems(cfg, known_keys, recipe)
    if problems:
        raise UserValueError(join_problems(problems))


def config_problems(cfg: DictConfig, known_keys: Iterable[str], recipe: str) -> List[str]:
    """Every unknown key, component that does not import, and unknown argument of ``cfg``.

    - A top-level key that is not in ``known_keys`` is an error, unless an interpolation
      elsewhere in the config uses it (``base: /models/x`` with ``${base}/tokenizer``).
      A known key written ``"section.name"`` also makes ``section``'s own keys checked
      (for sections that are not components, such as ``validation``).
    - Every ``_component_``, at any depth, must import.
    - Every other key beside a ``_component_`` must be an argument of it, unless it takes
      ``**kwargs``. Arguments the recipe passes positionally (the optimizer's parameters,
      the dataset's tokenizer, ...) are never in the config, so they are not required.

    Args:
        cfg (DictConfig): the parsed config, command-line overrides included.
        known_keys (Iterable[str]): the top-level keys the recipe reads.
        recipe (str): the recipe's name, for the messages.

    Returns:
        List[str]: one message per problem, naming the key and, when one is close, what
        was probably meant.
    """
    known = set(known_keys)
    tree = OmegaConf.to_container(cfg, resolve=False)
    problems: List[str] = []
    allowed = _top_level(known) | interpolated_names(tree) | config_variables(cfg)
    _check_keys(tree, allowed, "", recipe, problems)
    for section in sorted({key.split(".", 1)[0] for key in known if "." in key}):
        value = tree.get(section)
        if isinstance(value, dict) and _COMPONENT not in value:
            prefix = f"{section}."
            names = {key[len(prefix):] for key in known if key.startswith(prefix)}
            _check_keys(value, names, prefix, recipe, problems)
    _check_components(tree, "", problems)
    return problems


def _top_level(known: Set[str]) -> Set[str]:
    return {key.split(".", 1)[0] for key in known}


def _check_keys(
    tree: Dict[str, Any], known: Set[str], prefix: str, recipe: str, problems: List[str]
) -> None:
    for key in tree:
        if key in known:
            continue
        hint = _did_you_mean(str(key), known)
        problems.append(
            f"unknown config key {prefix}{key}: {recipe} does not read it"
            + (f"; did you mean {prefix}{hint}?" if hint else f"; remove it (known keys: "
               f"{', '.join(sorted(known))})")
        )


def _check_components(node: Any, path: str, problems: List[str]) -> None:
    if isinstance(node, list):
        for index, item in enumerate(node):
            _check_components(item, f"{path}[{index}]", problems)
        return
    if not isinstance(node, dict):
        return
    if _COMPONENT in node:
        try:
            _check_component(node, path)
        except UserValueError as error:
            problems.append(str(error))
    for key, value in node.items():
        _check_components(value, f"{path}.{key}" if path else str(key), problems)


def _check_component(node: Dict[str, Any], path: str) -> None:
    where = f"{path}.{_COMPONENT}" if path else _COMPONENT
    dotted = node[_COMPONENT]
    if not isinstance(dotted, str) or not dotted:
        removal = (
            f", or remove {path} from the YAML (torchtune cannot drop a component from the "
            "command line)"
            if path
            else ""
        )
        raise UserValueError(
            f"{where} must be a dotted import path, got {dotted!r}; set it to one{removal}"
        )
    if "${" in dotted:
        return  # an interpolation: torchtune resolves and reports it
    if dotted in MOVED_BUILDERS:
        raise UserValueError(
            f"{where}={dotted!r} has moved to {MOVED_BUILDERS[dotted]}; set "
            f"{where}={MOVED_BUILDERS[dotted]}"
        )
    try:
        component = get_component_from_path(dotted)
    except Exception:  # torchtune's InstantiationError, or any error importing the module
        hint = _closest_path(dotted)
        raise UserValueError(
            f"{where}={dotted!r} cannot be imported"
            + (f"; did you mean {hint}?" if hint else "; check the spelling and that its package is installed")
        ) from None
    accepted = _accepted_arguments(component)
    if accepted is None:
        return
    name = getattr(component, "__name__", dotted.rsplit(".", 1)[-1])
    for key in node:
        if key == _COMPONENT or key in accepted:
            continue
        setting = f"{path}.{key}" if path else str(key)
        hint = _did_you_mean(str(key), accepted)
        raise UserValueError(
            f"{setting} is not an argument of {name}"
            + (f"; did you mean {hint}?" if hint else f"; its arguments: {', '.join(sorted(accepted))}")
        )


def _accepted_arguments(component: Any) -> Optional[Set[str]]:
    """The keyword arguments ``component`` takes, or None when it takes any (``**kwargs``)
    or its signature cannot be read."""
    if not callable(component):
        return None
    try:
        signature = inspect.signature(component)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _did_you_mean(word: str, candidates: Iterable[str]) -> Optional[str]:
    matches = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _closest_path(dotted: str) -> Optional[str]:
    """The importable dotted path closest to ``dotted``: the longest prefix that imports,
    then the nearest name in it for the first part that does not."""
    parts = dotted.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent = _import_or_none(".".join(parts[:depth])) if depth else None
        if depth and parent is None:
            continue
        names = _names_in(parent) if depth else _top_level_modules()
        guess = _did_you_mean(parts[depth], names)
        if guess is None:
            return None
        candidate = ".".join(parts[:depth] + [guess] + parts[depth + 1:])
        if _import_or_none(candidate) is not None:
            return candidate
        return ".".join(parts[:depth] + [guess])
    return None


def _import_or_none(dotted: str) -> Any:
    try:
        return get_component_from_path(dotted)
    except Exception:
        return None


def _names_in(obj: Any) -> List[str]:
    names = [n for n in dir(obj) if not n.startswith("_")]
    if inspect.ismodule(obj) and hasattr(obj, "__path__"):
        names += [info.name for info in pkgutil.iter_modules(obj.__path__)]
    return names


def _top_level_modules() -> List[str]:
    return [info.name for info in pkgutil.iter_modules()]
