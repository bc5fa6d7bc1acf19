"""Module `__all__` lists name the public API, and the experiments use only that API."""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["jdl.parallel", "jdl.precision", "jdl.hf"]


def _defined_public_names(module: types.ModuleType) -> set[str]:
    """Public names a module defines itself (not the ones it imports)."""
    names = set()
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if getattr(value, "__module__", module.__name__) == module.__name__:
            names.add(name)
    return names


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_exactly_the_public_names(name):
    module = importlib.import_module(name)
    assert sorted(module.__all__) == sorted(set(module.__all__)), "duplicates in __all__"
    assert set(module.__all__) == _defined_public_names(module)


def _jdl_references(tree: ast.AST) -> set[tuple[str, ...]]:
    """Attribute chains an experiment reaches from jdl: `jdl.a.b` and `from jdl.a import b`."""
    references = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jdl."):
            references.update((*node.module.split("."), alias.name) for alias in node.names)
        elif isinstance(node, ast.Attribute):
            chain = [node.attr]
            value = node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id == "jdl":
                references.add(("jdl", *reversed(chain)))
    return references


def _private_step(chain: tuple[str, ...]) -> str | None:
    """The first name in `chain` that its module does not export, or None."""
    module = importlib.import_module(chain[0])
    for depth, name in enumerate(chain[1:], start=1):
        public = getattr(module, "__all__", None)
        if name.startswith("_") or (public is not None and name not in public):
            if not isinstance(getattr(module, name, None), types.ModuleType):
                return ".".join(chain[: depth + 1])
        try:
            module = importlib.import_module(".".join(chain[: depth + 1]))
        except ModuleNotFoundError:
            return None  # reached a class or function: its attributes are its own API
    return None


def test_experiments_use_only_public_names():
    private = []
    for path in sorted((ROOT / "experiments").glob("*.py")):
        for chain in _jdl_references(ast.parse(path.read_text())):
            step = _private_step(chain)
            if step is not None:
                private.append(f"{path.name}: {step}")
    assert private == []
