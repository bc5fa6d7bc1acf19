"""experiments.mnist_gan through its real command line, scored by a tiny classifier."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image
from support import OFFLINE, one_error_line
from support import run_module as run

TINY_GAN = [
    "--config.duration=2",
    "--config.latent_dim=4",
    "--config.channels=(2, 4)",
    "--config.hidden_size=8",
    "--config.label_dim=2",
    "--config.r1_gamma=1.0",
    "--config.steps_per_dispatch=1",
    "--config.log_every=1",
]


def _final(result) -> dict:
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("FINAL ")
    return json.loads(last[len("FINAL ") :])


@pytest.mark.slow
def test_tiny_conditional_run_reports_fid_coverage_and_pictures(mnist_classifier, tmp_path):
    workdir = tmp_path / "gan"
    command = ["--workdir", str(workdir), f"--config.classifier_workdir={mnist_classifier}"]
    final = _final(run("experiments.mnist_gan", *command, *TINY_GAN, *OFFLINE, cwd=tmp_path))
    assert set(final) == {
        "fid", "fid_floor", "class_coverage_min", "class_accuracy", "steps", "seconds",
        "cpu_seconds",
    }  # fmt: skip
    assert final["steps"] == 2
    # Two steps of a tiny generator make no digits; two sets of real digits are close.
    assert 0 <= final["fid_floor"] < final["fid"] and math.isfinite(final["fid"])
    assert 0.0 <= final["class_coverage_min"] <= 0.1
    assert 0.0 <= final["class_accuracy"] <= 1.0
    recorded = json.loads((workdir / "final.json").read_text())
    assert recorded["fid"] == final["fid"] and len(recorded["class_shares"]) == 10
    assert sum(recorded["class_shares"]) == pytest.approx(1.0, abs=1e-3)
    assert min(recorded["class_shares"]) == pytest.approx(final["class_coverage_min"], abs=1e-3)
    assert set(recorded["train"]) >= {"d_loss", "g_loss", "r1", "d_real", "d_fake"}
    assert recorded["train"]["r1"] > 0.0  # the penalty was on
    with Image.open(workdir / "samples.png") as image:
        assert image.size == (10 * 29 + 1, 10 * 29 + 1)  # 10 x 10 digits, 1-pixel pad
    events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").iterdir())
    assert b"gan/samples" in events and b"test/fid" in events
    # The same command on the finished workdir trains nothing and repeats the result.
    again = _final(run("experiments.mnist_gan", *command, *TINY_GAN, *OFFLINE, cwd=tmp_path))
    assert again == final


@pytest.mark.slow
def test_tiny_unconditional_run_has_no_class_accuracy(mnist_classifier, tmp_path):
    result = run(
        "experiments.mnist_gan",
        "--workdir",
        str(tmp_path / "gan"),
        f"--config.classifier_workdir={mnist_classifier}",
        "--config.conditional=false",
        *TINY_GAN,
        *OFFLINE,
        cwd=tmp_path,
    )
    final = _final(result)
    assert "class_accuracy" not in final and final["steps"] == 2
    assert 0 <= final["fid_floor"] < final["fid"]
    assert 0.0 <= final["class_coverage_min"] <= 0.1


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--config.r1_gamma=-1.0", "config.r1_gamma=-1.0 must be >= 0"),
        ("--config=wide", "unknown preset 'wide' of mnist_gan"),
        ("--config.precision=bf16", "config.precision='bf16' is not supported"),
    ],
)
def test_bad_settings_are_one_line_before_anything_runs(tmp_path, argument, message):
    result = run(
        "experiments.mnist_gan",
        "--workdir",
        str(tmp_path / "gan"),
        *TINY_GAN,
        *OFFLINE,
        argument,  # last: it overrides TINY_GAN's value
        cwd=tmp_path,
    )
    assert message in one_error_line(result)
    assert not (tmp_path / "gan").exists()
