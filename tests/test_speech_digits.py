"""The spoken-digit experiment: a tiny configuration through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import speech_digits

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "fsdd"
TINY = [
    "--config.duration=3 steps",
    "--config.batch_size=32",
    "--config.steps_per_dispatch=1",
    "--config.progress=false",
    "--config.compilation_cache=false",
    "--config.conv_channels=(4,)",
    "--config.dense_sizes=(8,)",
    "--config.speaker_folds=1",
    "--config.n_mels=16",
    "--config.log_every=0",
]


@pytest.mark.slow  # two trainings and their compilation in a fresh process: about a minute
def test_tiny_run_through_the_command_line_reports_both_accuracies(tmp_path):
    assert "python -m experiments.speech_digits" in speech_digits.__doc__
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.speech_digits", *TINY]
        + [f"--config.data_dir={SHARED}", "--workdir", str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JDL_DATA_DIR": str(tmp_path / "no-data")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("FINAL ")
    final = json.loads(last.removeprefix("FINAL "))
    assert 0.0 <= final["test_accuracy"] <= 1.0
    assert list(final["speaker_accuracies"]) == ["george"]  # one fold: the first speaker
    assert final["speaker_heldout_accuracy"] == final["speaker_accuracies"]["george"]
    assert "20 recordings cropped (0.67%)" in done.stdout
    for run in ("official", "heldout_george"):
        assert json.loads((workdir / run / "final.json").read_text())["step"] == 3
    assert (
        json.loads((workdir / "final.json").read_text())["test_accuracy"] == final["test_accuracy"]
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.speaker_folds=7", r"config.speaker_folds=7 must be in \[0, 6\]"),
        ("--config.win_length=512", r"config.win_length=512 must be in \[1, n_fft\]"),
        ("--config.min_snr_db=50.0", r"config.max_snr_db=40.0 must be >= min_snr_db"),
        ("--config.mesh_shape=data:2", r"config.mesh_shape='data:2' is not supported"),
        ("--config.conv_channels=(0,)", r"config.conv_channels=\(0,\)"),
    ],
)
def test_bad_settings_are_rejected_before_anything_runs(override, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        speech_digits.main([override, "--workdir", str(tmp_path)])
    assert not list(tmp_path.iterdir())
