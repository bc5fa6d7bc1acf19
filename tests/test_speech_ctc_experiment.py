"""The spoken digit-string CTC experiment: a tiny configuration through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import speech_ctc

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "fsdd"
TINY = [
    "--config.duration=3 steps",
    "--config.batch_size=8",
    "--config.num_train=16",
    "--config.num_test=6",
    "--config.steps_per_dispatch=1",
    "--config.progress=false",
    "--config.compilation_cache=false",
    "--config.conv_channels=(4,4)",
    "--config.hidden_size=8",
    "--config.n_mels=16",
    "--config.log_every=0",
    "--config.beam_width=2",
]


@pytest.mark.slow  # data, compilation and decoding in a fresh process: about a minute
def test_tiny_run_through_the_command_line_reports_digit_error_rates(tmp_path):
    assert "python -m experiments.speech_ctc" in speech_ctc.__doc__
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.speech_ctc", *TINY]
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
    assert final["steps"] == 3 and final["seconds"] > 0
    # Edit distance over reference digits: 0 is perfect; an untrained model's insertions
    # may push it above 1, but never past the longest prediction the frames allow.
    for key in ("digit_error_rate", "digit_error_rate_greedy"):
        assert 0.0 <= final[key] <= 63 / 3, final
    assert 0.0 <= final["utterance_error_rate"] <= 1.0
    assert final["test_digits"] >= 3 * 6
    assert "16 train utterances" in done.stdout and "6 test utterances" in done.stdout
    assert json.loads((workdir / "final.json").read_text())["step"] == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.max_digits=2", r"config.max_digits=2 must be >= min_digits"),
        ("--config.win_length=512", r"config.win_length=512 must be in \[1, n_fft\]"),
        ("--config.min_snr_db=50.0", r"config.max_snr_db=40.0 must be >= min_snr_db"),
        ("--config.mesh_shape=data:2", r"config.mesh_shape='data:2' is not supported"),
        ("--config.beam_width=0", r"config.beam_width=0"),
    ],
)
def test_bad_settings_are_rejected_before_anything_runs(override, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        speech_ctc.main([override, "--workdir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_a_model_with_too_few_output_frames_is_rejected_before_training(tmp_path):
    # Six stride-2 convolutions leave one output frame per 1.28 s: too few for 7 digits.
    with pytest.raises(SystemExit, match=r"labels, which need at least \d+ output frames"):
        speech_ctc.main(
            [
                *TINY,
                "--config.conv_channels=(2,2,2,2,2,2)",
                f"--config.data_dir={SHARED}",
                "--workdir",
                str(tmp_path / "run"),
            ]
        )
    assert not (tmp_path / "run").exists()
