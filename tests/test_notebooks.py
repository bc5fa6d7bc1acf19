"""Every notebook runs top to bottom in a real Jupyter kernel, in its small mode, on CPU.

Each notebook checks its own results in its last cell (an `assert`), so a notebook that runs
but learns nothing fails here. Notebooks are stored without outputs.
"""

from __future__ import annotations

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# The quickstart runs with every test run; the others (30-90 s each on 2 cores) with -m slow.
FAST_NOTEBOOKS = {"01_quickstart"}


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} has stored outputs; clear them before committing"
            )


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(path, marks=[] if path.stem in FAST_NOTEBOOKS else [pytest.mark.slow])
        for path in NOTEBOOKS
    ],
    ids=lambda p: p.stem,
)
def test_notebook_runs_and_checks_itself(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    last_code = [cell for cell in notebook.cells if cell.cell_type == "code"][-1]
    assert "assert" in last_code.source, f"{path.name}: the last cell must check results"
    monkeypatch.setenv("JDL_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "agg")
    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "data"))  # nothing cached, nothing fetched
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=dict(os.environ))  # raises CellExecutionError naming the failing cell
