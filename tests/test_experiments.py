"""Every experiment runs end to end for two steps and ends with a FINAL json line."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

EXPERIMENTS = ["iris_mlp", "mnist_mlp", "mnist_cnn"]
OFFLINE_ARGS = {"mnist_mlp": ["--config.download=false"], "mnist_cnn": ["--config.download=false"]}


@pytest.fixture(autouse=True)
def _no_real_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "no-data"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_two_step_smoke_run(name, tmp_path, capsys):
    module = importlib.import_module(f"experiments.{name}")
    assert "python -m experiments." + name in module.__doc__  # the docstring is its README
    argv = [
        "--config.duration=2",
        "--config.warmup_steps=0",
        "--config.progress=false",
        "--config.compilation_cache=false",
        "--config.steps_per_dispatch=1",
        "--workdir",
        str(tmp_path / name),
    ]
    final = module.main(argv + OFFLINE_ARGS.get(name, []))
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("FINAL ")
    assert json.loads(last_line[len("FINAL ") :]) == final
    assert final["steps"] == 2 and 0.0 <= final["test_accuracy"] <= 1.0
    for produced in ("config.json", "run.json", "metrics.jsonl", "final.json", "checkpoints"):
        assert os.path.exists(tmp_path / name / produced), produced


def test_bad_config_key_is_one_clear_line_before_compiling(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.iris_mlp",
            "--config.learning_rat=0.1",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "error: unknown config key 'learning_rat' (did you mean 'learning_rate'?)" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.learning_rate=-1", "learning_rate=-1.0 must be > 0"),
        ("--config.batch_size=0", "batch_size=0 must be >= 1"),
        ("--config.duration=0 steps", "must be positive"),
    ],
)
def test_impossible_values_are_rejected(override, message, tmp_path):
    module = importlib.import_module("experiments.iris_mlp")
    with pytest.raises(SystemExit, match=message):
        module.main([override, "--workdir", str(tmp_path)])


def test_overfitting_demo_smoke_run(tmp_path, capsys):
    from experiments import overfitting_demo

    assert "python -m experiments.overfitting_demo" in overfitting_demo.__doc__
    argv = [
        "--config.steps=20",
        "--config.eval_every=5",
        "--config.patience=1",
        "--config.hidden_sizes=(32,)",
        "--config.download=false",
        "--config.progress=false",
        "--workdir",
        str(tmp_path / "demo"),
    ]
    final = overfitting_demo.main(argv)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line[len("FINAL ") :]) == final
    for run in ("plain", "regularised"):
        assert 0.0 <= final[run]["test_accuracy"] <= 1.0
        assert final[run]["gap"] == pytest.approx(
            final[run]["train_accuracy"] - final[run]["test_accuracy"], abs=1e-3
        )
    assert final["plain"]["steps"] == 20 and final["regularised"]["steps"] <= 20
    assert os.path.exists(tmp_path / "demo" / "curves.png")
