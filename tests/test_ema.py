"""The exponential moving average of the weights: formula, step, eval, checkpoints, resume."""

from __future__ import annotations

import ast
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl.state import EmaError


class Net(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(jax.nn.relu(self.norm(self.hidden(x)))))


LOSS = jdl.classification_loss()


def _state(ema_decay=None, ema_warmup=True, tx=None):
    model = Net(nnx.Rngs(0, dropout=1))
    return jdl.TrainState.create(
        model, tx or optax.adam(0.05), seed=0, ema_decay=ema_decay, ema_warmup=ema_warmup
    )


def _batches(count, size=16):
    rng = np.random.default_rng(0)
    return [
        {
            "x": jnp.asarray(rng.normal(size=(size, 4)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 3, size), jnp.int32),
        }
        for _ in range(count)
    ]


def _numpy(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _paths(tree):
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _bits(tree):
    return [
        np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for x in jax.tree.leaves(tree)
    ]


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_after_k_steps_is_the_hand_computed_average_of_the_trajectory(warmup):
    decay, steps = 0.9, 7
    state = _state(ema_decay=decay, ema_warmup=warmup)
    train_step = jax.jit(jdl.make_train_step(LOSS))
    trajectory = [_numpy(state.params)]  # p_0, p_1, ..., p_k
    for batch in _batches(steps):
        state, _ = train_step(state, batch)
        trajectory.append(_numpy(state.params))
    expected = trajectory[0]
    for t in range(1, steps + 1):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        expected = [d * e + (1 - d) * p for e, p in zip(expected, trajectory[t], strict=True)]
    for got, want in zip(_numpy(state.ema), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    # The average really lags the parameters (with warm-up it starts close to them).
    assert not np.allclose(_numpy(state.ema)[0], trajectory[-1][0])
    assert state.ema["hidden"]["kernel"][...].dtype == jnp.float32


def test_effective_decay_formula():
    warm = _state(ema_decay=0.999)
    flat = _state(ema_decay=0.999, ema_warmup=False)
    for t in (1, 5, 100, 1000, 100_000):
        assert float(warm.ema_decay_at(t)) == pytest.approx(min(0.999, (1 + t) / (10 + t)))
        assert float(flat.ema_decay_at(t)) == pytest.approx(0.999)
    assert float(warm.ema_decay_at(1)) == pytest.approx(2 / 11)
    with pytest.raises(EmaError, match="keeps no EMA"):
        _state().ema_decay_at(1)


def test_ema_does_not_change_training_and_a_state_without_it_is_unchanged():
    # With EMA the trained leaves are bitwise those of the same run without it; without
    # EMA the state has exactly its five children (no "ema" path, None or otherwise).
    plain, averaged = _state(), _state(ema_decay=0.99)
    paths = {
        jax.tree_util.keystr(path[:1]) for path, _ in jax.tree_util.tree_leaves_with_path(plain)
    }
    assert paths == {".step", ".params", ".model_state", ".opt_state", ".rng"}
    assert plain.ema is None and plain.ema_decay is None
    train_step = jax.jit(jdl.make_train_step(LOSS))
    for batch in _batches(4):
        plain, plain_metrics = train_step(plain, batch)
        averaged, averaged_metrics = train_step(averaged, batch)
        for name in plain_metrics:
            np.testing.assert_array_equal(plain_metrics[name], averaged_metrics[name])
    without_ema = averaged.replace(ema=None, ema_decay=None)
    assert _paths(without_ema) == _paths(plain)
    for a, b in zip(_bits(plain), _bits(without_ema), strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_without_ema_keeps_its_layout(tmp_path):
    checkpointer = jdl.Checkpointer(str(tmp_path))
    checkpointer.save(0, _state())
    checkpointer.close()
    with open(tmp_path / "0" / "state" / "_METADATA") as f:
        saved = json.load(f)["tree_metadata"]
    top = {ast.literal_eval(key)[0] for key in saved}  # keys read "('params', 'layer', ...)"
    assert top == {"step", "params", "model_state", "opt_state", "rng"}


def test_checkpoint_round_trip_with_ema(tmp_path):
    state = _state(ema_decay=0.9)
    train_step = jax.jit(jdl.make_train_step(LOSS))
    for batch in _batches(3):
        state, _ = train_step(state, batch)
    checkpointer = jdl.Checkpointer(str(tmp_path))
    checkpointer.save(3, state)
    checkpointer.wait()
    restored = checkpointer.restore(_state(ema_decay=0.9)).state
    assert restored.ema_decay == 0.9 and restored.ema_warmup
    assert _paths(restored) == _paths(state)
    for a, b in zip(_bits(state), _bits(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(
        restored.ema["hidden"]["kernel"][...], restored.params["hidden"]["kernel"][...]
    )
    # A state that keeps no EMA cannot silently drop a saved one, nor invent a missing one.
    with pytest.raises(jdl.CheckpointMismatchError, match="'ema/"):
        checkpointer.restore(_state(), step=3)
    checkpointer.close()
    plain_dir = tmp_path / "plain"
    plain = jdl.Checkpointer(str(plain_dir))
    plain.save(0, _state())
    plain.wait()
    with pytest.raises(jdl.CheckpointMismatchError, match="'ema/"):
        plain.restore(_state(ema_decay=0.9), step=0)
    plain.close()


def test_skipped_nonfinite_step_leaves_the_ema_alone():
    state = _state(ema_decay=0.9)
    train_step = jax.jit(jdl.make_train_step(LOSS, skip_nonfinite=True))
    state, _ = train_step(state, _batches(1)[0])
    bad = _batches(1)[0]
    bad["x"] = bad["x"].at[0, 0].set(jnp.inf)
    skipped, metrics = train_step(state, bad)
    assert float(metrics["skipped_steps"]) == 1.0 and int(skipped.step) == 2
    for a, b in zip(_bits(state.ema), _bits(skipped.ema), strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_uses_the_ema_weights_when_asked():
    state = _state(ema_decay=0.9)
    train_step = jax.jit(jdl.make_train_step(LOSS))
    for batch in _batches(4):
        state, _ = train_step(state, batch)
    batch = _batches(1, size=32)[0]
    ema_values = jax.jit(jdl.make_eval_step(LOSS, use_ema=True))(state, batch)
    swapped = state.replace(params=state.ema)
    swapped_values = jax.jit(jdl.make_eval_step(LOSS))(swapped, batch)
    raw_values = jax.jit(jdl.make_eval_step(LOSS))(state, batch)
    np.testing.assert_array_equal(ema_values["loss"], swapped_values["loss"])
    assert not np.array_equal(ema_values["loss"], raw_values["loss"])
    # eval_model(ema=True): the averaged weights, the state's batch statistics, eval mode.
    model = state.eval_model(ema=True)
    assert model.dropout.deterministic
    np.testing.assert_array_equal(model.hidden.kernel[...], state.ema["hidden"]["kernel"][...])
    np.testing.assert_array_equal(model.norm.mean[...], state.model_state["norm"]["mean"][...])
    np.testing.assert_allclose(
        jdl.losses.softmax_xent(logits=model(batch["x"]), labels=batch["y"]),
        ema_values["loss"],
        rtol=1e-5,
    )
    np.testing.assert_array_equal(
        state.eval_model().hidden.kernel[...], state.params["hidden"]["kernel"][...]
    )


def test_ema_requests_on_a_state_without_ema_are_one_line_user_errors():
    state = _state()
    with pytest.raises(EmaError) as caught:
        jax.jit(jdl.make_eval_step(LOSS, use_ema=True))(state, _batches(1)[0])
    assert isinstance(caught.value, jdl.UserError) and isinstance(caught.value, ValueError)
    assert "ema_decay=0.999" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(EmaError):
        state.eval_model(ema=True)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, "0.9", True, float("nan")])
def test_bad_ema_decay_is_refused(decay):
    with pytest.raises(EmaError, match=r"ema_decay must be a number in \[0, 1\)"):
        _state(ema_decay=decay)


def test_ema_is_sharded_like_the_params_and_trains_under_fsdp():
    mesh = jdl.make_mesh("data:2,fsdp:4")
    model = jdl.models.MLP(64, (128,), 3, rngs=nnx.Rngs(0))
    state = jdl.TrainState.create(model, optax.adam(0.01), ema_decay=0.9)
    sharded = jdl.shard_state(state, mesh)
    kernel = lambda tree: tree["hidden"][0]["kernel"][...]  # noqa: E731 - (64, 128), split
    assert kernel(sharded.ema).sharding == kernel(sharded.params).sharding
    assert kernel(sharded.ema).sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    batch = {"x": jnp.ones((8, 64)), "y": jnp.zeros(8, jnp.int32)}
    step = jax.jit(jdl.make_train_step(LOSS))
    on_mesh, _ = step(sharded, batch)
    alone, _ = step(state, batch)
    assert kernel(on_mesh.ema).sharding == kernel(on_mesh.params).sharding
    np.testing.assert_allclose(kernel(on_mesh.ema), kernel(alone.ema), rtol=1e-5, atol=1e-6)


def _fit(workdir, num_steps):
    data = {
        "x": np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32),
        "y": np.random.default_rng(2).integers(0, 3, 64).astype(np.int32),
    }
    return jdl.fit(
        _state(ema_decay=0.95),
        train_step=jdl.make_train_step(LOSS),
        train_data=jdl.InMemoryData(data, batch_size=16, seed=0),
        num_steps=num_steps,
        eval_step=jdl.make_eval_step(LOSS, use_ema=True),
        eval_data=data,
        workdir=workdir,
        checkpoint_every=3,
        steps_per_dispatch=3,
        log_every=3,
        progress=False,
    )


def test_resume_with_ema_is_exact(tmp_path):
    straight = _fit(str(tmp_path / "straight"), 9)
    first = _fit(str(tmp_path / "resumed"), 6)
    assert first.step == 6
    resumed = _fit(str(tmp_path / "resumed"), 9)
    assert resumed.step == 9 and resumed.state.ema is not None
    for a, b in zip(_bits(straight.state), _bits(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert straight.eval_history[-1] == resumed.eval_history[-1]


def test_ema_mnist_experiment_smoke_run(tmp_path, monkeypatch, capsys):
    from experiments import ema_mnist

    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "no-data"))
    workdir = tmp_path / "ema_mnist"
    final = ema_mnist.main(
        [
            "--config.duration=3",
            "--config.num_seeds=1",
            "--config.steps_per_dispatch=3",
            "--config.download=false",
            "--config.compilation_cache=false",
            "--workdir",
            str(workdir),
        ]
    )
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("FINAL ") and json.loads(last_line[len("FINAL ") :]) == final
    assert final["steps"] == 3
    for key in ("test_accuracy", "ema_test_accuracy", "test_loss", "ema_test_loss"):
        assert len(final[key]) == 1 and np.isfinite(final[key][0])
    # The two models differ: after 3 steps the average still lags the weights.
    assert final["test_loss"] != final["ema_test_loss"]
    assert os.path.isdir(workdir / "seed0" / "checkpoints")
    assert "python -m experiments.ema_mnist" in ema_mnist.__doc__


def test_restore_weights_starts_the_average_at_the_loaded_weights(tmp_path):
    model = jdl.models.MLP(8, (16,), 4, rngs=nnx.Rngs(0))
    tx, _ = jdl.make_optimizer("adam", learning_rate=1e-2)
    saved = jdl.TrainState.create(model, tx, seed=0)
    saved = saved.replace(params=jax.tree.map(lambda p: p + 1.0, saved.params))
    checkpointer = jdl.Checkpointer(tmp_path)
    checkpointer.save(1, saved)
    checkpointer.wait()
    fresh = jdl.TrainState.create(
        jdl.models.MLP(8, (16,), 4, rngs=nnx.Rngs(5)), tx, seed=0, ema_decay=0.99
    )
    loaded = checkpointer.restore_weights(fresh)
    checkpointer.close()
    for ema, param in zip(jax.tree.leaves(loaded.ema), jax.tree.leaves(saved.params), strict=True):
        np.testing.assert_array_equal(np.asarray(ema), np.asarray(param))
