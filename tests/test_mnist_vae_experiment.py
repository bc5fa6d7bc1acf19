"""experiments.mnist_vae through its real command line, scored by a tiny classifier."""

from __future__ import annotations

import json
import math

import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image
from support import OFFLINE, one_error_line
from support import run_module as run

import jdl

TINY_VAE = [
    "--config.duration=2",
    "--config.latent_dim=2",
    "--config.channels=(2, 4)",
    "--config.hidden_size=8",
    "--config.kl_warmup_steps=1",
    "--config.iw_samples=2",
    "--config.eval_batch_size=500",
    "--config.num_pictures=2",
    "--config.steps_per_dispatch=1",
    "--config.log_every=1",
]


@pytest.mark.slow
def test_tiny_run_reports_bounds_fid_and_pictures(mnist_classifier, tmp_path):
    workdir = tmp_path / "vae"
    result = run(
        "experiments.mnist_vae",
        "--workdir",
        str(workdir),
        f"--config.classifier_workdir={mnist_classifier}",
        *TINY_VAE,
        *OFFLINE,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("FINAL ")
    final = json.loads(last[len("FINAL ") :])
    assert {"test_nelbo", "test_nll_iw", "fid", "fid_floor", "coverage_min"} <= set(final)
    assert final["steps"] == 2
    # An untrained 784-pixel Bernoulli model: about 784 log 2 = 543 nats per digit or worse
    # than a trained one (~100); IWAE(2) is a tighter bound than the ELBO on average.
    assert 100 < final["test_nelbo"] < 5000 and math.isfinite(final["test_nll_iw"])
    assert final["test_nll_iw"] <= final["test_nelbo"] + 1.0
    # Samples of an untrained decoder are far from digits; two sets of real digits are not.
    assert 0 <= final["fid_floor"] < final["fid"]
    assert 0.0 <= final["coverage_min"] <= 0.1
    recorded = json.loads((workdir / "final.json").read_text())
    assert recorded["fid"] == final["fid"] and len(recorded["class_shares"]) == 10
    assert sum(recorded["class_shares"]) == pytest.approx(1.0, abs=1e-3)
    for name in ("samples", "reconstructions", "interpolations"):
        with Image.open(workdir / f"{name}.png") as image:
            assert image.size == (2 * 29 + 1, 2 * 29 + 1), name  # 2 x 2 digits, 1-pixel pad
    events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").iterdir())
    assert b"vae/samples" in events and b"test/test_nll_iw" in events


def test_missing_classifier_is_one_line_with_the_command_that_makes_it(tmp_path):
    missing = tmp_path / "no_classifier"
    result = run(
        "experiments.mnist_vae",
        "--workdir",
        str(tmp_path / "vae"),
        f"--config.classifier_workdir={missing}",
        *TINY_VAE,
        *OFFLINE,
        cwd=tmp_path,
    )
    error = one_error_line(result)
    assert "no classifier checkpoint" in error
    assert f"python -m experiments.mnist_cnn --workdir {missing}" in error
    assert not (tmp_path / "vae").exists()  # refused before anything was written


def test_classifier_of_another_image_shape_is_one_clear_line(tmp_path):
    """A CNN trained on 16x16 images, recorded like a mnist_cnn run, cannot score digits."""
    other = tmp_path / "cnn16"
    model = jdl.models.CNN(
        1, 10, input_shape=(16, 16), conv_channels=(4,), dense_sizes=(8,), rngs=nnx.Rngs(0)
    )
    data = {"x": np.zeros((8, 16, 16, 1), np.float32), "y": np.arange(8, dtype=np.int32)}
    jdl.fit(
        jdl.TrainState.create(model, optax.sgd(0.1)),
        train_step=jdl.make_train_step(jdl.classification_loss()),
        train_data=jdl.InMemoryData(data, batch_size=8, seed=0),
        num_steps=1,
        workdir=str(other),
        progress=False,
        run_config={"conv_channels": [4], "dense_sizes": [8]},
    )
    result = run(
        "experiments.mnist_vae",
        "--workdir",
        str(tmp_path / "vae"),
        f"--config.classifier_workdir={other}",
        *TINY_VAE,
        *OFFLINE,
        cwd=tmp_path,
    )
    error = one_error_line(result)
    assert "does not take 28x28x1 digit images" in error
    assert "python -m experiments.mnist_cnn" in error
    assert not (tmp_path / "vae").exists()
