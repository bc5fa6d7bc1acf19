"""Real life, end to end, as a user meets it: `python -m experiments.mnist_mlp` runs that are
preempted, whose checkpoint gets a flipped bit, that blow up and are restarted, that are
rerun when finished, plus the traps of the first hour (a schedule without its horizon,
1-based labels, `--help`). Every scenario is a real process on the offline MNIST digits.

Run alone with `python -m pytest -m slow tests/test_real_life.py -n 0`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import jdl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--config.download=false", "--config.progress=false", "--config.log_every=50"]


def _start(workdir, *overrides):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.mnist_mlp", "--workdir", str(workdir)]
        + COMMON
        + list(overrides),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JDL_COMPILATION_CACHE": str(Path(workdir).parent / "xla")},
    )


def _run(workdir, *overrides):
    process = _start(workdir, *overrides)
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def _final(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("FINAL ")]
    assert len(lines) == 1, out
    return json.loads(lines[0][len("FINAL ") :])


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_preempted_run_resumes_to_the_uninterrupted_result(tmp_path):
    steps = ["--config.duration=2000 steps"]
    code, out, err = _run(tmp_path / "straight", *steps)
    assert code == 0, err[-3000:]
    straight = _final(out)

    workdir = tmp_path / "preempted"
    process = _start(workdir, *steps)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and any(
            json.loads(line)["step"] >= 300 for line in metrics.read_text().splitlines()
        ):
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1 and stopped[0].endswith(
        "checkpoint saved; run the same command to resume"
    )
    assert not (workdir / ".lock").exists()

    code, out, err = _run(workdir, *steps)  # the same command
    assert code == 0, err[-3000:]
    resumed = _final(out)
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    assert resumed["test_loss"] == straight["test_loss"]


def test_a_flipped_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path):
    workdir = tmp_path / "run"
    args = ["--config.duration=300 steps", "--config.checkpoint_every=100"]
    code, out, err = _run(workdir, *args)
    assert code == 0, err[-3000:]
    state_dir = workdir / "checkpoints" / "300" / "state"
    largest = max((f for f in state_dir.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    largest.write_bytes(bytes(data))

    code, out, err = _run(workdir, "--config.duration=400 steps", "--config.checkpoint_every=100")
    assert code == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "step 300" in line and "using step" in line]
    assert len(warnings) == 1, err[-3000:]
    assert "resumed from the checkpoint at step 200" in err
    assert (workdir / "checkpoints" / "300.corrupt").is_dir()
    assert _final(out)["steps"] == 400


def test_a_blow_up_keeps_no_exploded_checkpoint_and_a_saner_rerun_finishes(tmp_path):
    workdir = tmp_path / "run"
    blow_up = ["--config.optimizer=sgd", "--config.learning_rate=1e12"]
    args = ["--config.duration=60 steps", "--config.checkpoint_every=1", "--config.log_every=1"]
    code, out, err = _run(workdir, *args, *blow_up)
    assert code == 1
    errors = _error_lines(err)
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "lower the learning rate" in errors[0]
    code, out, err = _run(workdir, *args, "--config.optimizer=sgd", "--config.learning_rate=0.05")
    assert code == 0, err[-3000:]
    assert _final(out)["test_accuracy"] > 0.5


def test_a_finished_run_rerun_reports_the_same_final_line(tmp_path):
    workdir = tmp_path / "run"
    code, first, err = _run(workdir, "--config.duration=100 steps")
    assert code == 0, err[-3000:]
    code, second, err = _run(workdir, "--config.duration=100 steps")
    assert code == 0, err[-3000:]
    assert _final(second) == _final(first)
    json.loads((workdir / "final.json").read_text(), parse_constant=pytest.fail)  # no NaN


def test_help_lists_every_key_with_its_type_default_and_choices():
    result = subprocess.run(
        [sys.executable, "-m", "experiments.mnist_mlp", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert "784-128-10" in result.stdout  # the docstring
    line = next(line for line in result.stdout.splitlines() if "optimizer" in line)
    assert "adam" in line and "sgd" in line


def test_first_hour_traps_are_one_clear_error():
    with pytest.raises(jdl.UserError, match="total_steps"):
        jdl.make_optimizer("adam", learning_rate=1e-3, schedule="cosine")
    digits = jdl.data.load_digits()
    train = dict(digits["train"])
    train["y"] = train["y"] + 1  # 1-based labels
    model = jdl.models.MLP(64, (32,), 10, rngs=nnx.Rngs(0))
    tx, _ = jdl.make_optimizer("adam", learning_rate=1e-3)
    with pytest.raises(jdl.LabelRangeError, match="1-based") as caught:
        jdl.fit(
            jdl.TrainState.create(model, tx),
            train_step=jdl.make_train_step(jdl.classification_loss()),
            train_data=jdl.InMemoryData(train, batch_size=32, seed=0),
            num_steps=10,
            progress=False,
        )
    assert "\n" not in str(caught.value)
    assert np.max(train["y"]) == 10
