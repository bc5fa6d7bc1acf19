"""Magnitude pruning: schedule, exact sparsity, zeros that stay zero, checkpointed masks."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl.techniques import prune


def test_polynomial_schedule_matches_zhu_and_gupta():
    schedule = prune.polynomial_sparsity(
        0.9, begin_step=10, end_step=50, initial_sparsity=0.1, frequency=10
    )
    for step in [10, 20, 30, 40, 50, 80]:
        progress = min((step - 10) / 40, 1.0)
        expected = 0.9 + (0.1 - 0.9) * (1 - progress) ** 3
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)
    assert float(schedule(9)) == 0.0  # nothing pruned before the window
    pruning = [s for s in range(70) if bool(schedule.pruning_steps(s))]
    assert pruning == [10, 20, 30, 40, 50]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"final_sparsity": 1.0}, "final_sparsity"),
        ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity"),
        ({"final_sparsity": 0.5, "begin_step": 5, "end_step": 2}, "begin_step"),
        ({"final_sparsity": 0.5, "frequency": 0}, "frequency"),
    ],
)
def test_schedule_rejects_bad_values(kwargs, message):
    args = {"begin_step": 0, "end_step": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        prune.polynomial_sparsity(args.pop("final_sparsity"), **args)


def _setup(final=0.8, begin=2, end=10, frequency=2, lr=1e-2):
    model = jdl.models.MLP(20, (30,), 5, rngs=nnx.Rngs(0))
    schedule = prune.polynomial_sparsity(final, begin_step=begin, end_step=end, frequency=frequency)
    state = jdl.TrainState.create(model, prune.magnitude_prune(optax.adam(lr), schedule), seed=0)
    step = jax.jit(jdl.make_train_step(jdl.classification_loss()))
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 20))
    batch = {"x": x, "y": jnp.arange(32) % 5}
    return state, step, batch, schedule


def _kernels(params):
    return [leaf for leaf in jax.tree.leaves(params) if leaf.ndim >= 2]


def test_achieved_sparsity_follows_the_schedule_exactly():
    state, step, batch, schedule = _setup()
    last_update = None
    for t in range(16):
        state, _ = step(state, batch)
        if bool(schedule.pruning_steps(t)):
            last_update = t
        target = 0.0 if last_update is None else float(schedule(last_update))
        for kernel in _kernels(state.params):
            zeros = int(np.sum(np.asarray(kernel) == 0))
            expected = int(np.round(np.float32(target) * np.float32(kernel.size)))  # as float32
            assert zeros == expected, (t, kernel.shape)
    report = prune.sparsity_report(state.params)
    assert report["total"] == pytest.approx(0.8, abs=1e-3)
    assert set(report) == {"total", "head/kernel", "hidden/0/kernel"}
    biases = [leaf for leaf in jax.tree.leaves(state.params) if leaf.ndim == 1]
    assert all(np.all(np.asarray(b) != 0) for b in biases)  # not chosen by the mask fn


def test_pruned_weights_stay_exactly_zero_under_further_updates():
    state, step, batch, _ = _setup(end=4, lr=0.1)
    for _ in range(5):
        state, _ = step(state, batch)
    zero_masks = [np.asarray(k) == 0 for k in _kernels(state.params)]
    kept_before = [np.asarray(k).copy() for k in _kernels(state.params)]
    for _ in range(20):  # large Adam steps: every gradient entry is non-zero
        state, _ = step(state, batch)
    for mask, before, kernel in zip(zero_masks, kept_before, _kernels(state.params), strict=True):
        kernel = np.asarray(kernel)
        assert np.all(kernel[mask] == 0.0)
        assert not np.allclose(kernel[~mask], before[~mask])  # the rest still trains


def test_smallest_magnitudes_are_pruned_first():
    weights = jnp.array([[0.5, -0.1, 3.0], [-2.0, 0.05, 1.0]])
    mask = prune._prune_smallest(weights, jnp.float32(0.5))
    np.testing.assert_array_equal(mask, [[False, False, True], [True, False, True]])


def test_custom_mask_fn_selects_what_is_pruned():
    model = jdl.models.MLP(20, (30,), 5, rngs=nnx.Rngs(0))
    only_hidden = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, leaf: leaf.ndim >= 2 and "hidden" in jax.tree_util.keystr(path), params
    )
    schedule = prune.polynomial_sparsity(0.5, begin_step=0, end_step=0)
    tx = prune.magnitude_prune(optax.sgd(0.1), schedule, mask_fn=only_hidden)
    state = jdl.TrainState.create(model, tx, seed=0)
    batch = {"x": jnp.ones((4, 20)), "y": jnp.zeros(4, jnp.int32)}
    state, _ = jax.jit(jdl.make_train_step(jdl.classification_loss()))(state, batch)
    report = prune.sparsity_report(state.params, mask_fn=only_hidden)
    assert report == {"total": 0.5, "hidden/0/kernel": 0.5}
    assert prune.sparsity_report(state.params)["head/kernel"] == 0.0


def test_masks_survive_a_checkpoint_round_trip(tmp_path):
    state, step, batch, _ = _setup(end=6)
    for _ in range(8):
        state, _ = step(state, batch)
    checkpointer = jdl.Checkpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(8, state)
    checkpointer.wait()
    fresh, *_ = _setup(end=6)
    restored = checkpointer.restore(fresh).state
    checkpointer.close()
    saved_masks = jax.tree.leaves(state.opt_state.masks)
    restored_masks = jax.tree.leaves(restored.opt_state.masks)
    assert any(not np.all(m) for m in saved_masks)
    for a, b in zip(saved_masks, restored_masks, strict=True):
        assert b.dtype == jnp.bool_
        np.testing.assert_array_equal(a, b)
    assert int(restored.opt_state.count) == 8
    # training on from the restored state keeps the pruned weights at zero
    restored, _ = step(restored, batch)
    for mask, kernel in zip(
        [m for m in restored_masks if m.ndim], _kernels(restored.params), strict=True
    ):
        assert np.all(np.asarray(kernel)[~np.asarray(mask)] == 0.0)


def test_update_without_params_is_a_clear_error():
    tx = prune.magnitude_prune(
        optax.sgd(0.1), prune.polynomial_sparsity(0.5, begin_step=0, end_step=1)
    )
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


def test_experiment_smoke(tmp_path, capsys, monkeypatch):
    from experiments import prune_mnist

    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "no-data"))
    assert "python -m experiments.prune_mnist" in prune_mnist.__doc__
    final = prune_mnist.main(
        [
            "--config.duration=4",
            "--config.sparsities=(0.9,)",
            "--config.prune_every=1",
            "--config.hidden_sizes=(16,)",
            "--config.steps_per_dispatch=2",
            "--config.compilation_cache=false",
            "--config.download=false",
            "--workdir",
            str(tmp_path / "run"),
        ]
    )
    out = capsys.readouterr().out
    assert "| target sparsity | measured sparsity | test accuracy |" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("FINAL ") and json.loads(last[6:]) == final
    assert final["measured_sparsity"] == [pytest.approx(0.9, abs=1e-3)]


def test_experiment_rejects_bad_sparsity(tmp_path):
    from experiments import prune_mnist

    with pytest.raises(SystemExit, match="config.sparsities"):
        prune_mnist.main(["--config.sparsities=(0.5, 1.0)", "--workdir", str(tmp_path)])
