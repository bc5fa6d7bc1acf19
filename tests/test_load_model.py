"""jdl.deploy.load_model: the model of a real workdir, weights and model state, no optimizer.

Workdirs come from real runs: `python -m experiments.mnist_mlp` in a subprocess (the model
is rebuilt by the experiment's own build_model) and `jdl.fit` in this process with a
`run_config` naming a zoo model, or with a model of the user's own passed as `model=`.
"""

import json
import os
import subprocess
import sys

import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl.deploy import ModelLoadError, NoCheckpointError, load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fit(workdir, model, data, *, num_steps=6, run_config=None, eval_data=None, **kwargs):
    state = jdl.TrainState.create(model, optax.adam(1e-2), seed=0)
    return jdl.fit(
        state,
        train_step=jdl.make_train_step(jdl.classification_loss()),
        train_data=jdl.InMemoryData(data, batch_size=16, seed=0),
        num_steps=num_steps,
        eval_step=jdl.make_eval_step(jdl.classification_loss()) if eval_data else None,
        eval_data=eval_data,
        workdir=str(workdir),
        progress=False,
        log_every=0,
        run_config=run_config,
        **kwargs,
    )


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.random((n, 28, 28, 1), dtype=np.float32),
        "y": rng.integers(0, 10, n).astype(np.int32),
    }


class BatchNormNet(nnx.Module):
    """A user's own model with batch-norm statistics (model state) and dropout."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(nnx.relu(self.norm(self.dense(x)))))


@pytest.fixture(scope="module")
def experiment_workdir(tmp_path_factory):
    """A real `python -m experiments.mnist_mlp` run with a validation split (so a best
    checkpoint) and checkpoints at steps 10 and 20; returns (workdir, FINAL dict)."""
    workdir = tmp_path_factory.mktemp("mnist_mlp") / "run"
    command = [
        sys.executable,
        "-m",
        "experiments.mnist_mlp",
        f"--workdir={workdir}",
        "--config.duration=20 steps",
        "--config.validation_fraction=0.1",
        "--config.eval_every=10",
        "--config.checkpoint_every=10",
        "--config.hidden_sizes=(32,)",
        "--config.progress=False",
        "--config.download=False",
        "--config.compilation_cache=False",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("FINAL "))
    return workdir, final


@pytest.mark.slow
def test_experiment_workdir_gives_the_runs_test_accuracy(experiment_workdir):
    workdir, final = experiment_workdir
    model = load_model(workdir)
    assert isinstance(model, jdl.models.MLP)
    test = jdl.data.load_mnist(download=False)["test"]
    accuracy = float(np.mean(jdl.predict(model, test["x"]).argmax(-1) == test["y"]))
    # The experiment scored its trained state on the same test split.
    assert round(accuracy, 4) == final["test_accuracy"]


@pytest.mark.slow
def test_experiment_steps_best_latest_and_a_number(experiment_workdir):
    workdir, _ = experiment_workdir
    x = jdl.data.load_mnist(download=False)["test"]["x"][:50]
    record = json.loads((workdir / "final.json").read_text())
    best_step = record["best"]["step"]
    by_step = {step: jdl.predict(load_model(workdir, step), x) for step in (10, 20)}
    assert not np.array_equal(by_step[10], by_step[20])
    np.testing.assert_array_equal(jdl.predict(load_model(workdir, "latest"), x), by_step[20])
    np.testing.assert_array_equal(jdl.predict(load_model(workdir, "best"), x), by_step[best_step])


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    """`jdl.fit` of a small zoo CNN whose run_config names it; checkpoints at 2 and 4."""
    workdir = tmp_path_factory.mktemp("zoo") / "run"
    data = _images(64)
    config = {"model": "mnist_cnn", "model_kwargs": {"conv_channels": [4], "dense_sizes": [8]}}
    model = jdl.models.MODELS["mnist_cnn"](conv_channels=(4,), dense_sizes=(8,), rngs=nnx.Rngs(0))
    result = _fit(workdir, model, data, num_steps=4, checkpoint_every=2, run_config=config)
    return workdir, data, result


def test_zoo_model_named_in_run_config_predicts_bitwise_like_the_run(zoo_run):
    workdir, data, result = zoo_run
    loaded = load_model(workdir)
    assert isinstance(loaded, jdl.models.CNN)
    np.testing.assert_array_equal(
        jdl.predict(loaded, data["x"]), jdl.predict(result.model(), data["x"])
    )
    earlier = jdl.predict(load_model(workdir, 2), data["x"])
    assert not np.array_equal(earlier, jdl.predict(loaded, data["x"]))


def test_model_state_and_eval_mode_with_a_users_model(tmp_path):
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(3.0, 2.0, (64, 8)).astype(np.float32), "y": rng.integers(0, 3, 64)}
    result = _fit(tmp_path, BatchNormNet(nnx.Rngs(0)), data)
    template = BatchNormNet(nnx.Rngs(7))
    loaded = load_model(tmp_path, model=template)
    assert loaded.drop.deterministic and loaded.norm.use_running_average  # eval mode
    assert not template.drop.deterministic  # the template is not changed
    trained_mean = np.asarray(result.state.model_state["norm"]["mean"][...])
    assert np.abs(trained_mean).max() > 0.1  # the statistics moved during training
    np.testing.assert_array_equal(np.asarray(loaded.norm.mean[...]), trained_mean)
    # Direct calls equal the run's eval-mode model (dropout off, running statistics).
    np.testing.assert_array_equal(np.asarray(loaded(data["x"])), result.model()(data["x"]))


def test_errors_are_one_line_user_errors(tmp_path, zoo_run):
    workdir = zoo_run[0]
    cases = [
        (lambda: load_model(tmp_path / "missing"), NoCheckpointError, "no workdir"),
        (lambda: load_model(tmp_path), NoCheckpointError, "no checkpoint in"),
        (lambda: load_model(workdir, 7), NoCheckpointError, r"no checkpoint at step 7.*\[2, 4\]"),
        (lambda: load_model(workdir, "first"), ModelLoadError, "'latest', 'best' or a step"),
    ]
    for call, kind, match in cases:
        with pytest.raises(kind, match=match) as info:
            call()
        assert isinstance(info.value, jdl.UserError) and "\n" not in str(info.value)


def test_best_without_a_best_metric_and_unknown_or_unrecorded_models(tmp_path):
    data = _images(32)
    cnn = lambda: jdl.models.MODELS["mnist_cnn"](  # noqa: E731
        conv_channels=(4,), dense_sizes=(8,), rngs=nnx.Rngs(0)
    )
    named = tmp_path / "named"
    _fit(named, cnn(), data, num_steps=2, run_config={"model": "mnist_cnn_v9", "seed": 0})
    with pytest.raises(ModelLoadError, match="unknown model 'mnist_cnn_v9'.*mnist_cnn") as info:
        load_model(named)
    assert isinstance(info.value, jdl.UserError) and "\n" not in str(info.value)
    unnamed = tmp_path / "unnamed"
    _fit(unnamed, cnn(), data, num_steps=2)
    with pytest.raises(ModelLoadError, match="does not say which model.*pass model="):
        load_model(unnamed)
    with pytest.raises(ModelLoadError, match="no best evaluation"):
        load_model(unnamed, "best", model=cnn())
    assert isinstance(load_model(unnamed, model=cnn()), jdl.models.CNN)
