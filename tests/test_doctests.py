"""The examples in jdl's docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib
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
