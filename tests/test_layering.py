"""The package's layers (docs/design.md, Architecture): every import, at module level or
inside a function, goes to the same layer or one below; recipes never import each other."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qalora_tune"

# low to high; a module may import its own layer and the ones before it
LAYERS = [
    {"_compat", "errors", "_files", "_version", "_memory", "_progress"},
    {"quantization", "data"},
    {"ops"},
    {"modules"},
    {"models"},
    {"checkpointing"},
    {"tasks"},
    {"recipe_utils"},
    {"export", "tiny", "demo", "_cli", "__init__", "__main__", "configs"},
]
RANK = {name: index for index, names in enumerate(LAYERS) for name in names}


def _layer(module: str) -> str:
    """``qalora_tune.ops.int4_linear`` -> ``ops``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
            for alias in node.names:  # `from qalora_tune import tiny`
                if node.module == "qalora_tune":
                    yield f"qalora_tune.{alias.name}", node.lineno


def _package_files():
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_a_layer_above_its_own(path):
    relative = path.relative_to(PACKAGE)
    own = "__init__" if relative.parts == ("__init__.py",) else relative.parts[0].removesuffix(".py")
    assert own in RANK, f"{relative}: add its package to LAYERS"
    for module, line in _imports(path):
        if module != "qalora_tune" and not module.startswith("qalora_tune."):
            continue
        target = _layer(module)
        if target == "__init__" and module == "qalora_tune":
            target = "__init__"
        assert target in RANK, f"{relative}:{line} imports {module}, which is in no layer"
        assert RANK[target] <= RANK[own], (
            f"{relative}:{line} imports {module}: layer {target!r} is above {own!r}"
        )


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.py")), ids=lambda p: p.name)
def test_recipes_never_import_each_other(path):
    others = {p.stem for p in (ROOT / "recipes").glob("*.py")} - {path.stem}
    for module, line in _imports(path):
        assert module.split(".")[0] not in others, f"{path.name}:{line} imports the recipe {module}"
