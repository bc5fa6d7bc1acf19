"""Checkpointer: round trip, keep-N plus best, clear errors on a different model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support import mlp_state

import jdl
from jdl.checkpoint import CheckpointMismatchError


def _state(hidden=16, seed=0):
    return mlp_state(4, (hidden,), 3, dropout=0.5, tx=optax.adam(1e-3), seed=seed)


def test_round_trip_restores_every_leaf_with_dtype(tmp_path):
    state = _state()
    checkpointer = jdl.Checkpointer(tmp_path, async_save=True)
    checkpointer.save(7, state, data_state={"epoch": 2, "position": 3})
    checkpointer.wait()
    restored = checkpointer.restore(_state(seed=5))
    checkpointer.close()
    assert restored.step == 7
    assert restored.data_state == {"epoch": 2, "position": 3}
    original, loaded = jax.tree.leaves(state), jax.tree.leaves(restored.state)
    assert len(original) == len(loaded)
    for a, b in zip(original, loaded, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_latest_n_and_the_best(tmp_path):
    checkpointer = jdl.Checkpointer(tmp_path, max_to_keep=2, best_metric="eval/accuracy")
    tree = {"w": jnp.zeros(3)}
    for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, 0.8)]:
        checkpointer.save(step, tree, metrics={"eval/accuracy": accuracy})
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 4, 5]
    assert checkpointer.best_step() == 2
    assert checkpointer.latest_step() == 5
    checkpointer.close()


def test_restore_into_a_different_model_names_path_and_shapes(tmp_path):
    checkpointer = jdl.Checkpointer(tmp_path)
    checkpointer.save(1, _state(hidden=16))
    checkpointer.wait()
    with pytest.raises(
        CheckpointMismatchError,
        match=r"'params/head/kernel' has shape \(16, 3\) but the model "
        r"expects \(32, 3\)",
    ):
        checkpointer.restore(_state(hidden=32))
    checkpointer.close()


def test_restore_without_checkpoint_is_clear(tmp_path):
    checkpointer = jdl.Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpointer.restore(_state())
    checkpointer.close()


def test_invalid_options():
    with pytest.raises(ValueError, match="max_to_keep"):
        jdl.Checkpointer("/tmp/unused-jdl-ckpt", max_to_keep=0)
    with pytest.raises(ValueError, match="best_mode"):
        jdl.Checkpointer("/tmp/unused-jdl-ckpt", best_mode="up")
