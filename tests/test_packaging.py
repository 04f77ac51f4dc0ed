"""What the packages import is what pyproject.toml declares: a module imported directly but
only installed as another library's dependency would vanish, or change under us, the day that
library stops needing it."""

from __future__ import annotations

import ast
import importlib
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stream_lstm", "state", "workers")


def imported_modules() -> set[str]:
    """Top-level modules the runtime packages import, outside the standard library and ours."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.partition(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.partition(".")[0])
    return found - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}


def test_every_module_the_packages_import_is_a_declared_dependency_with_bounds() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {
        canonicalize_name(Requirement(line).name): Requirement(line)
        for line in pyproject["project"]["dependencies"]
    }
    distributions = packages_distributions()
    for module in sorted(imported_modules()):
        names = {canonicalize_name(d) for d in distributions.get(module, [])}
        assert names, f"{module} is imported but no installed distribution provides it"
        requirement = next((declared[n] for n in names if n in declared), None)
        assert requirement is not None, f"{module} ({', '.join(names)}) is not declared"
        assert requirement.specifier, f"{requirement.name} is declared without version bounds"


def test_torch_is_a_release_with_the_weights_only_fixes() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch,) = [
        Requirement(line)
        for line in pyproject["project"]["dependencies"]
        if Requirement(line).name == "torch"
    ]
    assert not torch.specifier.contains("2.9.1"), "torch before 2.10 lacks weights_only fixes"
    assert torch.specifier.contains("2.13.0")


def test_the_command_exists_and_every_data_file_ships() -> None:
    """The ``stream-lstm`` script names a function that exists, and every file of the packages
    that is not Python (the demo model a worker serves when none is set, the store's Lua
    scripts) is package data: a plain ``pip install``, as the image does, carries it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, _, function = pyproject["project"]["scripts"]["stream-lstm"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))

    package_data = pyproject["tool"]["setuptools"]["package-data"]
    shipped = {
        path
        for package, patterns in package_data.items()
        for pattern in patterns
        for path in ROOT.joinpath(*package.split(".")).glob(pattern)
    }
    data = {
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.is_file() and path.suffix not in {".py", ".pyc"} and "__pycache__" not in path.parts
    }
    assert data, "the packages hold data files (the demo model, the Lua scripts)"
    assert data <= shipped, f"not package data: {sorted(map(str, data - shipped))}"
