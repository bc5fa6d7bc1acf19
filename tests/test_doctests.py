"""The examples in jdl's docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import jdl


def _modules() -> list[str]:
    names = ["jdl"]
    for info in pkgutil.walk_packages(jdl.__path__, prefix="jdl."):
        names.append(info.name)
    return sorted(names)


def _modules_with_examples() -> list[str]:
    found = []
    for name in _modules():
        module = importlib.import_module(name)
        if doctest.DocTestFinder().find(module) and any(
            test.examples for test in doctest.DocTestFinder().find(module)
        ):
            found.append(name)
    return found


MODULES_WITH_EXAMPLES = _modules_with_examples()


def test_core_modules_have_examples():
    # The modules a newcomer reads first must show their use, not only describe it.
    for name in ("jdl.losses", "jdl.metrics", "jdl.config", "jdl.optim", "jdl.state"):
        assert name in MODULES_WITH_EXAMPLES, f"{name} has no docstring example"


@pytest.mark.parametrize("name", MODULES_WITH_EXAMPLES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False
    )
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def _public_api() -> dict[str, object]:
    """Every function and class of the public API, by dotted name, with their public methods."""
    found: dict[str, object] = {}
    packages = [jdl, jdl.data, jdl.models, jdl.techniques]
    packages += [jdl.parallel, jdl.precision, jdl.compiler]
    techniques = [f"jdl.techniques.{name}" for name in jdl.techniques.__all__]
    packages += [importlib.import_module(name) for name in techniques]
    for package in packages:
        names = getattr(package, "__all__", None) or [
            name for name in vars(package) if not name.startswith("_")
        ]
        for name in names:
            obj = getattr(package, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not getattr(obj, "__module__", "").startswith("jdl"):
                continue  # re-exported from another library
            found[f"{package.__name__}.{name}"] = obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(member):
                        found[f"{package.__name__}.{name}.{attr}"] = getattr(obj, attr)
    return found


def test_every_public_function_and_class_has_a_docstring():
    api = _public_api()
    assert len(api) > 150
    missing = sorted(name for name, obj in api.items() if not inspect.getdoc(obj))
    assert missing == [], f"public names without a docstring: {missing}"
