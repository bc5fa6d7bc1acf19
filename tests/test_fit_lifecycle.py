"""fit at the edges of a run's life: signals, divergence, reruns, records, bad data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl.data.dataset import EmptyDataError, NonFiniteDataError
from jdl.loop import NonFiniteLossError, UnknownMetricError

WORKER = os.path.join(os.path.dirname(__file__), "signal_worker.py")
sys.path.insert(0, os.path.dirname(__file__))
from support import blobs, mlp_state  # noqa: E402

NUM_STEPS = 1200


def _state(hidden=32, optimizer="adam", lr=1e-2, seed=0):
    tx, _ = jdl.make_optimizer(optimizer, learning_rate=lr)
    return mlp_state(hidden=(hidden,), tx=tx, seed=seed)


_LOSS = jdl.classification_loss()
_TRAIN_STEP = jdl.make_train_step(_LOSS)
_EVAL_STEP = jdl.make_eval_step(_LOSS)


def _fit(state, workdir=None, num_steps=40, **kwargs):
    options = dict(
        train_step=_TRAIN_STEP,
        train_data=jdl.InMemoryData(blobs(), batch_size=32, seed=0),
        num_steps=num_steps,
        eval_step=_EVAL_STEP,
        eval_data=blobs(n=64, seed=1),
        eval_every=10,
        log_every=10,
        workdir=None if workdir is None else str(workdir),
        checkpoint_every=10 if workdir is not None else 0,
        steps_per_dispatch=5,
        progress=False,
    )
    options.update(kwargs)
    return jdl.fit(state, **options)


def _params(state) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _listing(directory) -> dict[str, bytes]:
    """Every file under `directory` with its bytes (the lock excluded)."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


# --- signals, with real processes ----------------------------------------------------


def _run_worker(workdir, cache, *, signals=(), after_step=200, gap=0.0):
    """Runs tests/signal_worker.py; sends `signals` (`gap` seconds apart) once the run has
    logged step `after_step`. Returns (returncode, stdout, stderr)."""
    worker = subprocess.Popen(
        [sys.executable, WORKER, str(workdir), str(NUM_STEPS), str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while signals and worker.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and any(
            json.loads(line)["step"] >= after_step for line in metrics.read_text().splitlines()
        ):
            for i, signum in enumerate(signals):
                if i:
                    time.sleep(gap)
                worker.send_signal(signum)
            break
        time.sleep(0.005)
    out, err = worker.communicate(timeout=300)
    return worker.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Final parameters of the worker's run without any signal, and the shared XLA cache."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cache = root / "xla-cache"
    code, out, err = _run_worker(root / "run", cache)
    assert code == 0, err[-3000:]
    return dict(np.load(root / "run" / "final_params.npz")), cache


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_exits_with_the_conventional_status_and_resumes_bitwise(
    tmp_path, uninterrupted, signum, status
):
    reference, cache = uninterrupted
    workdir = tmp_path / "run"
    code, out, err = _run_worker(workdir, cache, signals=[signum])
    name = signal.Signals(signum).name
    assert code == status, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"stopped by {name}")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    stopped_at = int(lines[0].split(" at step ")[1].split(";")[0])
    assert lines[0] == (
        f"stopped by {name} at step {stopped_at}; checkpoint saved; run the same command to resume"
    )
    assert 200 <= stopped_at < NUM_STEPS and stopped_at % 4 == 0
    checkpointer = jdl.Checkpointer(workdir / "checkpoints")
    assert checkpointer.all_steps() == [stopped_at]  # only the signal saved (checkpoint_every=0)
    checkpointer.close()
    assert not (workdir / ".lock").exists()  # released on the way out

    code, out, err = _run_worker(workdir, cache)
    assert code == 0, err[-3000:]
    assert f"resumed from the checkpoint at step {stopped_at}" in err
    assert f"done at step {NUM_STEPS}" in out
    resumed = dict(np.load(workdir / "final_params.npz"))
    assert sorted(resumed) == sorted(reference)
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_a_second_signal_exits_at_once_and_corrupts_nothing(tmp_path, uninterrupted):
    reference, cache = uninterrupted
    workdir = tmp_path / "run"
    code, _, err = _run_worker(workdir, cache, signals=[signal.SIGTERM] * 2, gap=0.01)
    assert code == 143, err[-3000:]
    code, out, err = _run_worker(workdir, cache)  # resumes from whatever is whole, if any
    assert code == 0, err[-3000:]
    resumed = dict(np.load(workdir / "final_params.npz"))
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


# --- divergence never poisons the kept checkpoints -----------------------------------


def test_a_blow_up_is_not_saved_and_a_saner_rerun_resumes_from_the_last_good_state(tmp_path):
    with pytest.raises(NonFiniteLossError) as caught:
        _fit(_state(optimizer="sgd", lr=1e12), tmp_path, num_steps=40, checkpoint_every=1)
    message = str(caught.value)
    assert "\n" not in message
    checkpointer = jdl.Checkpointer(tmp_path / "checkpoints")
    kept = checkpointer.all_steps()
    if kept:  # what remains is named, and holds no exploded weights
        assert f"checkpoint at step {max(kept)}" in message
        for step in kept:
            restored = checkpointer.restore(_state(), step=step).state
            norm = float(optax.global_norm(restored.params))
            assert np.isfinite(norm) and norm < 1e3
    else:
        assert "No checkpoint was kept" in message
    checkpointer.close()
    # The same workdir with a sane learning rate trains to the end.
    result = _fit(_state(optimizer="sgd", lr=1e-2), tmp_path, num_steps=40)
    assert result.step == 40 and np.isfinite(result.train_metrics["loss"])


def test_the_norm_guard_refuses_an_exploded_but_finite_state(tmp_path):
    def explode_after_step_14(state, batch):  # finite, but the weights jump 10,000-fold
        state, metrics = _TRAIN_STEP(state, batch)
        params = jax.tree.map(lambda p: jnp.where(state.step == 15, p * 1e4, p), state.params)
        metrics["param_norm"] = optax.global_norm(params)
        return state.replace(params=params), metrics

    with pytest.raises(NonFiniteLossError) as caught:
        _fit(_state(), tmp_path, num_steps=40, train_step=explode_after_step_14)
    message = str(caught.value)
    assert message.startswith("the parameters exploded at step 20")
    assert "checkpoint at step 10" in message and "\n" not in message
    checkpointer = jdl.Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps() == [10]
    checkpointer.close()


# --- reruns and records --------------------------------------------------------------


def test_rerunning_a_finished_workdir_reports_the_recorded_run(tmp_path):
    first = _fit(_state(), tmp_path, best_metric="accuracy")
    final = json.loads((tmp_path / "final.json").read_text())
    again = _fit(_state(), tmp_path, best_metric="accuracy")
    assert again.was_finished and not first.was_finished
    assert again.eval_history == first.eval_history and len(again.eval_history) == 4
    assert again.best == first.best and again.train_metrics == first.train_metrics
    assert json.loads((tmp_path / "final.json").read_text()) == final
    assert final["step"] == 40 and final["best"]["step"] == first.best["step"]
    print(again.eval_history[-1])  # the README's line works the second time too


def test_a_resumed_run_returns_the_whole_eval_history(tmp_path):
    _fit(_state(), tmp_path, num_steps=20)
    resumed = _fit(_state(), tmp_path, num_steps=40)
    assert [e["step"] for e in resumed.eval_history] == [10, 20, 30, 40]


def test_fit_writes_the_run_records_of_its_readme(tmp_path):
    _fit(_state(), tmp_path, run_config={"learning_rate": 0.01, "width": 32})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"learning_rate": 0.01, "width": 32}
    run = json.loads((tmp_path / "run.json").read_text())
    assert "versions" in run and "devices" in run
    final = json.loads((tmp_path / "final.json").read_text())
    assert set(final) >= {"step", "train", "eval", "best", "stopped_early"}
    # Without run_config, fit records its own settings.
    _fit(_state(), tmp_path / "api")
    assert json.loads((tmp_path / "api" / "config.json").read_text())["num_steps"] == 40


def test_a_refused_resume_leaves_every_record_untouched(tmp_path):
    _fit(_state(), tmp_path, run_config={"width": 32})
    before = {k: v for k, v in _listing(tmp_path).items() if not k.startswith("checkpoints")}
    with pytest.raises(jdl.CheckpointMismatchError):
        _fit(_state(hidden=64), tmp_path, run_config={"width": 64})
    after = {k: v for k, v in _listing(tmp_path).items() if not k.startswith("checkpoints")}
    assert after == before


def test_no_json_record_holds_nan(tmp_path):
    def nan_loss(model, batch):
        loss = jdl.losses.softmax_xent(logits=model(batch["x"]), labels=batch["y"])
        return {"loss": loss + jnp.nan}

    _fit(
        _state(),
        tmp_path,
        num_steps=10,
        train_step=jdl.make_train_step(nan_loss, skip_nonfinite=True),
    )
    for name in ("final.json", "config.json", "run.json"):
        json.loads((tmp_path / name).read_text(), parse_constant=pytest.fail)
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["train"]["loss"] is None and final["nonfinite"]["train.loss"] == "nan"


# --- the best checkpoint: one name, the same step ------------------------------------


def test_best_metric_has_one_name_and_ties_keep_the_first_step(tmp_path):
    def constant_accuracy(model, batch):
        per_example = _LOSS(model, batch)
        return {**per_example, "flat": jnp.zeros_like(per_example["loss"])}

    result = _fit(
        _state(),
        tmp_path,
        eval_step=jdl.make_eval_step(constant_accuracy),
        best_metric="flat",  # every evaluation ties
    )
    assert result.best["step"] == 10
    checkpointer = jdl.Checkpointer(tmp_path / "checkpoints", best_metric="flat")
    assert checkpointer.best_step() == 10 and 10 in checkpointer.all_steps()
    restored = checkpointer.restore(_state(), step=result.best["step"])
    assert restored.step == 10
    checkpointer.close()


def test_an_unknown_best_metric_lists_the_available_ones(tmp_path):
    with pytest.raises(UnknownMetricError, match=r"'acuracy'.*\['accuracy', 'loss'\]"):
        _fit(_state(), tmp_path, best_metric="acuracy")


# --- bad data: one clear error before anything runs ----------------------------------


@pytest.mark.parametrize("split", ["train", "eval"])
def test_labels_outside_the_models_classes_are_refused_before_training(tmp_path, split):
    data = blobs()
    data["y"] = data["y"] + 1  # 1-based labels: 4 is outside the model's 4 classes
    kwargs = {"train_data": jdl.InMemoryData(data, batch_size=32, seed=0)}
    if split == "eval":
        kwargs = {"eval_data": data}
    with pytest.raises(jdl.UserError, match="label") as caught:
        _fit(_state(), tmp_path / "run", **kwargs)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_or_nonfinite_eval_data_is_refused_before_training(tmp_path):
    empty = {"x": np.zeros((0, 8), np.float32), "y": np.zeros((0,), np.int32)}
    with pytest.raises(EmptyDataError, match="no examples"):
        _fit(_state(), eval_data=empty)
    bad = blobs(n=64, seed=1)
    bad["x"][3, 2] = np.nan
    with pytest.raises(NonFiniteDataError, match="eval_data"):
        _fit(_state(), eval_data=bad)


# --- traps ---------------------------------------------------------------------------


def test_a_run_longer_than_its_schedule_warns(capsys):
    tx, schedule = jdl.make_optimizer("adam", learning_rate=1e-2, schedule="cosine", total_steps=20)
    model = jdl.models.MLP(8, (32,), 4, rngs=nnx.Rngs(0))
    state = jdl.TrainState.create(model, tx, seed=0)
    _fit(state, train_step=jdl.make_train_step(_LOSS, lr_schedule=schedule), num_steps=40)
    assert "the learning-rate schedule spans 20 steps but the run has 40" in capsys.readouterr().err


def test_result_model_is_in_eval_mode():
    result = _fit(_state(), num_steps=10)
    model = result.model()
    x = jnp.asarray(blobs(n=16, seed=3)["x"])
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))  # no dropout
