"""`import jdl` leaves optional heavy libraries unimported; the import-time benchmark runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import import_time

# Imported only by the features that need them: each costs seconds or pulls in a framework.
OPTIONAL = ("qwix", "transformers", "torch", "tensorboard", "matplotlib")


def _modules_after(statement: str) -> set[str]:
    """Top-level names in `sys.modules` after running `statement` in a fresh interpreter."""
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    return {name.split(".")[0] for name in json.loads(result.stdout.splitlines()[-1])}


def test_import_jdl_does_not_import_optional_heavy_libraries():
    loaded = _modules_after("import jdl")
    assert "jdl" in loaded  # the probe sees what the import brought in
    assert sorted(loaded & set(OPTIONAL)) == []
    assert "jax" not in loaded  # every re-export is imported on first use


def test_lazy_names_resolve_to_the_defining_modules_and_star_import_works():
    import importlib

    import jdl

    assert jdl.fit is importlib.import_module("jdl.loop").fit
    assert "fit" in vars(jdl)  # kept after the first look-up
    namespace: dict = {}
    exec("from jdl import *", namespace)
    assert set(jdl.__all__) <= set(namespace)
    for name in jdl.__all__:
        assert getattr(jdl, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = jdl.no_such_name


def test_quantize_imports_qwix_on_first_use():
    # The probe above must not pass just because qwix is missing or never loads.
    assert "qwix" not in _modules_after("from jdl.techniques import quantize")
    assert "qwix" in _modules_after(
        "from jdl.techniques import quantize; quantize.int8_rules(activations=False)"
    )


def test_benchmark_reports_medians_and_their_ratio(capsys):
    figures = import_time.main(["--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("FINAL ")
    assert json.loads(lines[-1][len("FINAL ") :]) == figures
    assert figures["jax_s"] > 0 and figures["jdl_s"] > 0
    assert figures["ratio"] == pytest.approx(
        figures["jdl_s"] / figures["jax_s"], rel=0.01, abs=1e-3
    )
    assert [line.split()[1] for line in lines[:5]] == [
        "import=jax",
        "import=jdl",
        "import=jdl.fit",
        "jdl_over_jax=" + f"{figures['ratio']:.3f}",
        "jdl.fit_over_jax=" + f"{figures['fit_ratio']:.3f}",
    ]
    assert figures["fit_s"] > figures["jdl_s"]  # the training core is imported on first use


def test_no_reexport_is_shadowed_by_a_submodule_of_the_same_name():
    # `import jdl.X` binds jdl.X to the module, so a re-exported function named X would be
    # lost once anything imports the module. The one such name, `predict`, is a package
    # whose module object forwards calls to the function (tests/test_predict_cli.py).
    import pathlib

    import jdl

    package = pathlib.Path(jdl.__file__).parent
    clashes = sorted(
        name
        for name in jdl._EXPORTS
        if (package / f"{name}.py").exists() or (package / name).is_dir()
    )
    assert clashes == ["predict"]
    import jdl.model_summary  # noqa: F401 - the module behind jdl.summary

    assert callable(jdl.summary) and not isinstance(jdl.summary, type(jdl))
