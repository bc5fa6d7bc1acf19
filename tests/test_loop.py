"""fit(): training progress, compile-once, exact resume, determinism, non-finite stops."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from support import blobs, mlp_state

import jdl
from jdl.loop import NonFiniteLossError


def _state(seed=0, dropout=0.1, lr=1e-2):
    tx = None if lr == 1e-2 else jdl.make_optimizer("adam", learning_rate=lr)[0]
    return mlp_state(dropout=dropout, seed=seed, tx=tx)


def _fit(state, workdir=None, num_steps=60, **kwargs):
    loss = jdl.classification_loss()
    options = dict(
        train_step=jdl.make_train_step(loss),
        train_data=jdl.InMemoryData(blobs(512), batch_size=32, seed=0),
        num_steps=num_steps,
        eval_step=jdl.make_eval_step(loss),
        eval_data=blobs(seed=1, n=100),
        log_every=10,
        workdir=workdir,
        steps_per_dispatch=8,
        progress=False,
    )
    options.update(kwargs)
    return jdl.fit(state, **options)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_fit_learns_and_logs(tmp_path):
    result = _fit(_state(), workdir=str(tmp_path), eval_every=20, num_steps=60)
    assert result.step == 60
    assert result.eval_history[-1]["accuracy"] > 0.9
    assert [e["step"] for e in result.eval_history] == [20, 40, 60]
    records = jdl.read_metrics(str(tmp_path / "metrics.jsonl"))
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [10, 20, 30, 40, 50, 60]
    first, last = records[0]["train/loss"], [r for r in records if "train/loss" in r][-1]
    assert last["train/loss"] < first
    assert os.path.exists(tmp_path / "curves.png")
    assert os.listdir(tmp_path / "tensorboard")


def test_train_chunk_compiles_once():
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # 7 chunks of 8 steps, some cut short by log boundaries every 10 steps, and a
        # ragged last chunk: all must reuse the first compiled program.
        state = _state()
        loss = jdl.classification_loss()
        data = jdl.InMemoryData(blobs(512), batch_size=32, seed=0)
        runner = jdl.make_chunk_runner(jdl.make_train_step(loss), data, 8)
        state, _ = runner(state, data.arrays, jnp.int32(8))
        after_first = len(compiles)
        for stop in (10, 18, 20, 28, 30, 37):
            state, metrics = runner(state, data.arrays, jnp.int32(stop))
        jax.block_until_ready(state)
    finally:
        jax.monitoring.clear_event_listeners()
    assert after_first >= 1
    assert len(compiles) == after_first, "the chunk program recompiled"
    assert int(state.step) == 37


def test_fit_compiles_train_chunk_once():
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: (
            compiles.append(event)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    try:
        _fit(_state(), num_steps=8)  # warms up the process-wide caches of small ops
        before = len(compiles)
        _fit(_state(), num_steps=8)  # one chunk, one eval: the programs a fit needs
        per_fit = len(compiles) - before
        before = len(compiles)
        _fit(_state(seed=3), num_steps=67, eval_every=20)  # 10+ chunks, 4 evals
        many_chunks = len(compiles) - before
    finally:
        jax.monitoring.clear_event_listeners()
    assert per_fit >= 2
    assert many_chunks == per_fit, "more chunks or evals must not compile anything new"


def test_repeated_fit_reuses_compiled_programs(capsys):
    # A second fit with the same step functions and data set-up (new objects with equal
    # settings and a new state) must not trace or compile anything.
    loss = jdl.classification_loss()
    steps = dict(train_step=jdl.make_train_step(loss), eval_step=jdl.make_eval_step(loss))
    first = _fit(_state(), num_steps=16, eval_every=8, **steps)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: (
            compiles.append(event)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    try:
        # Starts where the first stopped, without a workdir: no "resumed" claim either.
        again = _fit(first.state, num_steps=32, eval_every=8, **steps)
    finally:
        jax.monitoring.clear_event_listeners()
    assert again.step == 32
    assert compiles == [], "a repeated fit compiled again"
    assert "resumed" not in capsys.readouterr().err


def test_same_seed_same_result_and_different_seed_differs():
    a = _fit(_state(seed=0), num_steps=30)
    b = _fit(_state(seed=0), num_steps=30)
    c = _fit(_state(seed=1), num_steps=30)
    for x, y in zip(_leaves(a.state), _leaves(b.state), strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(
        not np.array_equal(x, y) for x, y in zip(_leaves(a.state), _leaves(c.state), strict=True)
    )


def test_resume_is_bitwise_exact(tmp_path):
    straight = _fit(_state(), num_steps=50)
    # A run stopped after 20 steps (its last checkpoint), then restarted to 50.
    first = _fit(_state(), workdir=str(tmp_path), num_steps=20, checkpoint_every=10)
    assert first.step == 20
    resumed = _fit(_state(), workdir=str(tmp_path), num_steps=50, checkpoint_every=10)
    assert resumed.step == 50
    for x, y in zip(_leaves(straight.state), _leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(x, y)
    # The metrics file reads as one run: no duplicated steps.
    steps = [
        r["step"] for r in jdl.read_metrics(str(tmp_path / "metrics.jsonl")) if "train/loss" in r
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 50


def test_resume_mid_epoch_across_dispatch_sizes(tmp_path):
    # The data position is a function of the step: resuming at a step that is not an
    # epoch boundary, with a different dispatch size, still gives identical parameters.
    straight = _fit(_state(), num_steps=40, steps_per_dispatch=5)
    _fit(_state(), workdir=str(tmp_path), num_steps=13, steps_per_dispatch=8)
    resumed = _fit(_state(), workdir=str(tmp_path), num_steps=40, steps_per_dispatch=8)
    for x, y in zip(_leaves(straight.state), _leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("log_every", [8, 3])
def test_rolled_loop_runs_only_the_steps_it_should(tmp_path, log_every):
    # unroll=1 runs a while loop with a traced trip count (no select). Cut chunks (logs
    # every 3 steps, chunks of 8) run the same compiled body as full ones, so the result
    # does not depend on the chunking, and a stop-and-resume is exact.
    rolled = dict(steps_per_dispatch=8, unroll=1, log_every=log_every)
    straight = _fit(_state(), num_steps=40, **rolled)
    uncut = _fit(_state(), num_steps=40, steps_per_dispatch=8, unroll=1, log_every=8)
    first = _fit(_state(), workdir=str(tmp_path), num_steps=13, **rolled)
    assert first.step == 13
    resumed = _fit(_state(), workdir=str(tmp_path), num_steps=40, **rolled)
    for a, b, c in zip(
        _leaves(straight.state), _leaves(uncut.state), _leaves(resumed.state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # The same steps as straight-line chunks (a different program: equal up to rounding).
    written_out = _fit(_state(), num_steps=40, steps_per_dispatch=8, log_every=log_every)
    for a, b in zip(_leaves(straight.state), _leaves(written_out.state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert straight.train_metrics["loss"] == pytest.approx(
        written_out.train_metrics["loss"], rel=1e-5
    )


@pytest.mark.parametrize("unroll", [3, 5])
def test_rolled_blocks_train_the_same_steps(unroll):
    # Blocks of `unroll` steps per loop iteration, single steps for the rest of a cut
    # chunk: the same training as one step per iteration, up to rounding.
    reference = _fit(_state(), num_steps=30, steps_per_dispatch=8, unroll=1)
    blocks = _fit(_state(), num_steps=30, steps_per_dispatch=8, unroll=unroll)
    assert blocks.step == 30
    for a, b in zip(_leaves(reference.state), _leaves(blocks.state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_rolled_chunk_metrics_are_zero_past_the_stop():
    data = jdl.InMemoryData(blobs(512), batch_size=32, seed=0)
    runner = jdl.make_chunk_runner(jdl.make_train_step(jdl.classification_loss()), data, 8, 3)
    state, metrics = runner(_state(), data.arrays, jnp.int32(5))  # a block of 3, then 2 steps
    assert int(state.step) == 5
    losses = np.asarray(metrics["loss"])
    assert losses.shape == (8,) and np.all(losses[:5] > 0) and np.all(losses[5:] == 0)
    state, metrics = runner(state, data.arrays, jnp.int32(5))  # nothing left to run
    assert int(state.step) == 5 and not np.asarray(metrics["loss"]).any()


def test_finished_run_returns_immediately(tmp_path):
    _fit(_state(), workdir=str(tmp_path), num_steps=20)
    again = _fit(_state(), workdir=str(tmp_path), num_steps=20)
    assert again.step == 20


def test_nonfinite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    def squared_logits(model, batch):  # grows without bound under a too-large step size
        return {"loss": jnp.sum(model(batch["x"]) ** 2, axis=-1)}

    model = jdl.models.MLP(8, (32,), 4, rngs=nnx.Rngs(0))
    state = jdl.TrainState.create(model, optax.sgd(10.0), seed=0)
    diverged = r"(train (loss|grad_norm) is .*|the parameters (exploded|are not finite))"
    diverged += r" at step \d+"
    with pytest.raises(NonFiniteLossError, match=diverged):
        _fit(
            state,
            workdir=str(tmp_path),
            num_steps=400,
            checkpoint_every=1,
            train_step=jdl.make_train_step(squared_logits),
        )
    saved = jdl.Checkpointer(tmp_path / "checkpoints")
    steps = saved.all_steps()
    assert steps, "checkpoints before the blow-up must be kept"
    restored = saved.restore(state, step=max(steps))
    assert all(np.isfinite(leaf).all() for leaf in _leaves(restored.state))
    saved.close()


def test_skip_nonfinite_counts_and_keeps_params_finite():
    def nan_on_odd_batches(model, batch):
        loss = jdl.losses.softmax_xent(logits=model(batch["x"]), labels=batch["y"])
        poison = jnp.where(batch["y"][0] % 2 == 1, jnp.nan, 0.0)
        return {"loss": loss + poison}

    result = _fit(
        _state(),
        num_steps=20,
        train_step=jdl.make_train_step(nan_on_odd_batches, skip_nonfinite=True),
    )
    assert result.train_metrics["skipped_steps"] > 0
    assert all(np.isfinite(leaf).all() for leaf in _leaves(result.state))


def test_early_stopping_and_best_checkpoint(tmp_path):
    result = _fit(
        _state(),
        workdir=str(tmp_path),
        num_steps=2000,
        eval_every=10,
        best_metric="loss",
        best_mode="min",
        early_stopping_patience=3,
    )
    assert result.stopped_early
    assert result.step < 2000
    assert result.best is not None and result.best["step"] <= result.step - 30
    checkpointer = jdl.Checkpointer(tmp_path / "checkpoints", best_metric="loss", best_mode="min")
    assert checkpointer.best_step() == result.best["step"]
    assert result.best["step"] in checkpointer.all_steps()
    checkpointer.close()


def test_eval_masks_the_padded_tail():
    state = _state()
    data = blobs(n=37, seed=2)
    evaluate = jdl.make_evaluator(jdl.make_eval_step(jdl.classification_loss()), 10)
    metrics = evaluate(state, data)
    model = state.model()
    model.eval()
    logits = np.asarray(model(jnp.asarray(data["x"])))
    expected = np.mean(logits.argmax(-1) == data["y"])
    assert metrics["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_invalid_fit_arguments():
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        _fit(_state(), num_steps=0)
    with pytest.raises(ValueError, match="steps_per_dispatch"):
        _fit(_state(), steps_per_dispatch=0)
    for unroll in (False, 0, 2.5):  # False once divided by zero inside the rolled loop
        with pytest.raises(jdl.UserError, match="unroll must be True .* or an integer >= 1"):
            _fit(_state(), unroll=unroll)
    with pytest.raises(jdl.loop.FitArgumentError, match="log_every"):
        _fit(_state(), log_every=True)


def test_run_record_written(tmp_path):
    config = jdl.config.ml_collections.ConfigDict({"seed": 3, "lr": 0.1})
    jdl.write_run_record(str(tmp_path), config, ["--config.seed=3"])
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.1, "seed": 3}
    run = json.loads((tmp_path / "run.json").read_text())
    assert set(run["versions"]) >= {"jax", "flax", "optax", "orbax-checkpoint"}
    assert run["devices"] and run["argv"] == ["--config.seed=3"]
    assert "commit" in run["git"]
    assert run["compiler_options"] == jdl.compiler.compiler_options()


def test_a_written_out_chunk_is_a_fully_unrolled_scan_with_no_loop_left():
    # lax.scan(unroll=True): XLA drops the one-trip loop, so the compiled chunk holds its
    # steps as straight-line code (what convolutions need on XLA:CPU), while a rolled
    # chunk (unroll=1) keeps a while loop over the steps. (Loops inside a step, such as
    # the CPU's random-bits kernels, are the step's own and not counted.)
    import re

    data = jdl.InMemoryData(blobs(512), batch_size=32, seed=0)
    train_step = jdl.make_train_step(jdl.classification_loss())
    state = _state()
    inputs = jax.device_put(data.arrays)

    def step_loops(unroll):
        runner = jdl.make_chunk_runner(train_step, data, 4, unroll=unroll)
        text = runner.lower(state, inputs, jnp.int32(4)).compile().as_text()
        names = [
            re.search(r'op_name="([^"]*)"', line).group(1)
            for line in text.splitlines()
            if re.search(r"\swhile\(", line)
        ]
        return [name for name in names if re.fullmatch(r"jit\(run_chunk\)/(while|scan)", name)]

    assert step_loops(True) == []
    assert step_loops(1) != []
