"""Installing jdl as a user does: the notebooks' install cell, the wheel's contents, the floors.

The slow test builds a fresh virtual environment and installs into it (a few minutes, most of
it pip fetching JAX); the others build a wheel or read files.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _install_cell(path: pathlib.Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    return next(cell.source for cell in notebook.cells if cell.cell_type == "code")


def _copy_checkout(destination: pathlib.Path) -> pathlib.Path:
    """The checkout's files as a clone would have them (plus uncommitted edits), no builds."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def _clean_env() -> dict[str, str]:
    """This process's environment without the test venv's activation or import paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_every_notebook_has_the_same_install_cell():
    cells = {path.name: _install_cell(path) for path in NOTEBOOKS}
    first = cells[NOTEBOOKS[0].name]
    assert "JDL_SOURCE = " in first and "pip" in first
    assert all(cell == first for cell in cells.values()), sorted(cells)


def test_wheel_holds_only_the_jdl_package(tmp_path):
    # experiments/ and benchmarks/ run from a checkout; installed they would claim two very
    # generic top-level names in every user's site-packages.
    source = _copy_checkout(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source), "-w", "wheels"],
        cwd=tmp_path,
        env=_clean_env(),
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "wheels").glob("jdl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"jdl", wheel.name.split("-py3")[0] + ".dist-info"}, top_level
    assert "jdl/models/__init__.py" in names and "jdl/data/__init__.py" in names


def test_floors_pin_every_runtime_dependency():
    done = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "floors.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    pins = done.stdout.split()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert len(pins) == len(dependencies)
    for pin, requirement in zip(pins, dependencies, strict=True):
        name, version = pin.split("==")
        assert requirement.startswith(name) and f">={version}" in requirement, (pin, requirement)


def test_accelerator_extras_pull_jax_with_its_floor():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (jax_floor,) = [r.split(">=")[1] for r in project["dependencies"] if r.startswith("jax>=")]
    extras = project["optional-dependencies"]
    assert extras["cuda12"] == [f"jax[cuda12]>={jax_floor}"]
    assert extras["tpu"] == [f"jax[tpu]>={jax_floor}"]


_FIT_TWO_STEPS = textwrap.dedent(
    """
    import importlib.util
    import pathlib
    import sys

    import numpy as np
    from flax import nnx

    import jdl

    site_packages = pathlib.Path(sys.prefix).resolve()
    assert pathlib.Path(jdl.__file__).resolve().is_relative_to(site_packages), jdl.__file__
    for name in ("experiments", "benchmarks"):
        assert importlib.util.find_spec(name) is None, name
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(64, 4)).astype(np.float32), "y": rng.integers(0, 3, 64)}
    data["y"] = data["y"].astype(np.int32)
    model = jdl.models.MLP(4, (16,), 3, rngs=nnx.Rngs(0))
    tx, _ = jdl.make_optimizer("adam", learning_rate=1e-2)
    result = jdl.fit(
        jdl.TrainState.create(model, tx, seed=0),
        train_step=jdl.make_train_step(jdl.classification_loss()),
        train_data=jdl.InMemoryData(data, batch_size=16, seed=0),
        num_steps=2,
        progress=False,
    )
    assert int(result.state.step) == 2
    print("FIT OK", result.train_metrics["loss"])
    """
)


@pytest.mark.slow
def test_notebook_install_cell_installs_jdl_from_the_checkout_into_a_fresh_venv(tmp_path):
    """The cell itself, run by a new environment's Python from notebooks/ of a checkout."""
    checkout = _copy_checkout(tmp_path / "jdl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    env = _clean_env()
    cell = _install_cell(ROOT / "notebooks" / "01_quickstart.ipynb")
    installed = subprocess.run(
        [python, "-c", cell],
        cwd=checkout / "notebooks",
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert installed.stdout.strip().splitlines()[-1].startswith("jdl ")
    # From a folder outside the checkout: the installed package, not the source tree.
    fitted = subprocess.run(
        [python, "-c", _FIT_TWO_STEPS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fitted.returncode == 0, fitted.stdout + fitted.stderr
    assert "FIT OK" in fitted.stdout
    # Run again where no checkout can be found: jdl is installed, so the cell installs
    # nothing (were it to try, it would stop on the missing source).
    again = subprocess.run(
        [python, "-c", cell],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == installed.stdout.strip().splitlines()[-1]
