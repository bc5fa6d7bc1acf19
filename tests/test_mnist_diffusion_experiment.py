"""experiments.mnist_diffusion through its real command line, scored by a tiny classifier."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from support import OFFLINE, one_error_line
from support import run_module as run

TINY_DIFFUSION = [
    "--config.duration=2",
    "--config.warmup_steps=0",
    "--config.channels=(8, 16)",
    "--config.attention_heads=2",
    "--config.samples_per_class=2",
    "--config.sample_steps=2",
    "--config.trajectory_frames=3",
    "--config.steps_per_dispatch=1",
    "--config.log_every=1",
]


def final_of(result) -> dict:
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("FINAL ")
    return json.loads(last[len("FINAL ") :])


@pytest.mark.slow
def test_tiny_run_reports_fid_accuracy_pictures_and_resamples_bitwise(mnist_classifier, tmp_path):
    workdir = tmp_path / "diffusion"
    args = [
        "experiments.mnist_diffusion",
        "--workdir",
        str(workdir),
        f"--config.classifier_workdir={mnist_classifier}",
        *TINY_DIFFUSION,
        *OFFLINE,
    ]
    final = final_of(run(*args, cwd=tmp_path))
    assert {"fid", "fid_floor", "class_accuracy", "coverage_min", "cpu_seconds"} <= set(final)
    assert final["steps"] == 2
    # Two training steps make noise, not digits: far from the real digits, which are
    # close to each other; the 20 samples land in the ten classes about at random.
    assert 0 <= final["fid_floor"] < final["fid"]
    assert 0.0 <= final["class_accuracy"] <= 0.5
    assert 0.0 <= final["coverage_min"] <= 0.1
    assert 0 < final["cpu_seconds"]
    recorded = json.loads((workdir / "final.json").read_text())
    assert recorded["num_samples"] == 20 and len(recorded["class_shares"]) == 10
    assert sum(recorded["class_shares"]) == pytest.approx(1.0, abs=1e-3)
    with Image.open(workdir / "samples.png") as image:
        assert image.size == (2 * 29 + 1, 10 * 29 + 1)  # 2 samples of each of 10 classes
    with Image.open(workdir / "trajectory.png") as image:
        assert image.size == (3 * 29 + 1, 10 * 29 + 1)  # 3 frames of one digit per class
    events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").iterdir())
    assert b"diffusion/samples" in events and b"diffusion/trajectory" in events
    assert b"test/class_accuracy" in events
    # Run again on the finished workdir: nothing trains, the samples are drawn again
    # from the restored EMA weights with the same seed, and come out bitwise the same.
    pictures = {n: (workdir / f"{n}.png").read_bytes() for n in ("samples", "trajectory")}
    again = final_of(run(*args, cwd=tmp_path))
    assert again == final
    for name, data in pictures.items():
        assert (workdir / f"{name}.png").read_bytes() == data, name


def test_missing_classifier_is_one_line_with_the_command_that_makes_it(tmp_path):
    missing = tmp_path / "no_classifier"
    result = run(
        "experiments.mnist_diffusion",
        "--workdir",
        str(tmp_path / "diffusion"),
        f"--config.classifier_workdir={missing}",
        *TINY_DIFFUSION,
        *OFFLINE,
        cwd=tmp_path,
    )
    error = one_error_line(result)
    assert "no classifier checkpoint" in error
    assert f"python -m experiments.mnist_cnn --workdir {missing}" in error
    assert not (tmp_path / "diffusion").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "override, words",
    [
        ("--config.noise_schedule=quadratic", "noise_schedule"),
        ("--config.sampler=euler", "sampler"),
        ("--config.prediction=x0", "prediction"),
        ("--config.label_dropout=0.0", "label_dropout"),
        ("--config.sample_steps=2000", "sample_steps"),
        ("--config.patch_size=0", "patch_size"),
    ],
)
def test_bad_settings_are_one_line_before_anything_runs(override, words, tmp_path):
    result = run(
        "experiments.mnist_diffusion",
        "--workdir",
        str(tmp_path / "diffusion"),
        *TINY_DIFFUSION,
        *OFFLINE,
        override,
        cwd=tmp_path,
    )
    assert words in one_error_line(result)
    assert not (tmp_path / "diffusion").exists()
