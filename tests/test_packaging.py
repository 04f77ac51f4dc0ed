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


def test_the_command_and_the_demo_model_are_where_the_package_says() -> None:
    """The ``stream-lstm`` script names a function that exists, and the model a worker serves
    when none is set is package data (a plain ``pip install``, as the image does, carries it)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, _, function = pyproject["project"]["scripts"]["stream-lstm"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))

    from workers.settings import DEMO_MODEL

    package_data = pyproject["tool"]["setuptools"]["package-data"]
    owner = next(
        p for p in package_data if DEMO_MODEL.parent.parent == ROOT.joinpath(*p.split("."))
    )
    assert DEMO_MODEL.relative_to(ROOT.joinpath(*owner.split("."))).match(package_data[owner][0])
    assert DEMO_MODEL.is_file()
