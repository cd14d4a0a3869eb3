"""pyproject.toml lists every package, ships the configs, and installs the recipe module."""

import importlib.util
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11+) or tomli")

ROOT = Path(__file__).resolve().parents[1]


def _setuptools():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _source_packages():
    found = set()
    for init in (ROOT / "qalora_tune").rglob("__init__.py"):
        relative = init.parent.relative_to(ROOT)
        if "__pycache__" in relative.parts:
            continue
        found.add(".".join(relative.parts))
    return found


def test_every_package_under_qalora_tune_is_listed():
    listed = set(_setuptools()["packages"])
    found = _source_packages()
    assert "qalora_tune" in found and "qalora_tune.models" in found
    missing = sorted(found - listed)
    assert not missing, f"packages missing from [tool.setuptools] packages: {missing}"


def test_listed_packages_exist():
    setuptools = _setuptools()
    package_dir = setuptools.get("package-dir", {})
    for package in setuptools["packages"]:
        if package in package_dir:
            directory = ROOT / package_dir[package]
        else:
            directory = ROOT.joinpath(*package.split("."))
        assert (directory / "__init__.py").is_file(), f"{package} -> {directory}"


def test_configs_ship_as_qalora_tune_configs():
    setuptools = _setuptools()
    assert "qalora_tune.configs" in setuptools["packages"]
    assert setuptools["package-dir"]["qalora_tune.configs"] == "configs"
    assert "*.yaml" in setuptools["package-data"]["qalora_tune.configs"]
    assert (ROOT / "configs" / "__init__.py").is_file()
    assert list((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize(
    "recipe", ["qalora_finetune", "qalora_merge", "qalora_generate", "qalora_eval"]
)
def test_recipe_is_an_importable_top_level_module(recipe):
    setuptools = _setuptools()
    assert recipe in setuptools["py-modules"]
    recipe_dir = setuptools["package-dir"][""]
    assert (ROOT / recipe_dir / f"{recipe}.py").is_file()
    spec = importlib.util.find_spec(recipe)
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).name == f"{recipe}.py"
