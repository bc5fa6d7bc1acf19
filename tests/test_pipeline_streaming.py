"""StreamingData: a grain pipeline (shard, shuffle, augment, batch) prefetched to the device."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import mlp_state

import jdl
from jdl.data.pipeline import BatchSizeError
from jdl.errors import UserError


def _arrays(n=100, dim=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int32)
    x = rng.normal(0, 1, (n, dim)).astype(np.float32) + y[:, None]
    # Column 0 of "i" identifies the example, so tests can see which examples a batch holds.
    return {"x": x, "y": y, "i": np.arange(n, dtype=np.int32)}


def _ids(data, steps):
    return [np.asarray(data.next_batch()[0]["i"]) for _ in range(steps)]


def test_batches_are_deterministic_and_reshuffled_every_epoch():
    a = jdl.StreamingData(_arrays(), batch_size=16, seed=3)
    b = jdl.StreamingData(_arrays(), batch_size=16, seed=3)
    other = jdl.StreamingData(_arrays(), batch_size=16, seed=4)
    assert a.steps_per_epoch == 6  # 100 // 16: the tail of 4 is dropped each epoch
    ids_a, ids_b, ids_other = _ids(a, 12), _ids(b, 12), _ids(other, 12)
    for x, y in zip(ids_a, ids_b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(ids_a, ids_other, strict=True))
    epoch0, epoch1 = np.concatenate(ids_a[:6]), np.concatenate(ids_a[6:])
    for epoch in (epoch0, epoch1):  # no example twice in an epoch, only 4 left out
        assert len(set(epoch.tolist())) == 96 and epoch.max() < 100
    assert not np.array_equal(epoch0, epoch1), "the second epoch must be a new permutation"
    batch = a.next_batch()[0]
    assert batch["x"].shape == (16, 4) and batch["x"].dtype == jnp.float32
    assert isinstance(batch["x"], jax.Array)
    for data in (a, b, other):
        data.close()


def test_each_process_reads_its_own_shard():
    arrays = _arrays(n=101)  # cut to 100 so both shards have 50 examples
    shards = [
        jdl.StreamingData(
            arrays, batch_size=10, seed=0, process_index=index, process_count=2, prefetch=1
        )
        for index in (0, 1)
    ]
    seen = []
    for index, shard in enumerate(shards):
        assert shard.local_batch_size == 5 and shard.steps_per_epoch == 10
        ids = np.concatenate(_ids(shard, 10))  # one epoch of this shard
        assert sorted(ids.tolist()) == list(range(index, 100, 2))
        seen.append(set(ids.tolist()))
        shard.close()
    assert not seen[0] & seen[1]


def test_transforms_run_on_the_host_per_example_and_are_reproducible():
    def add_noise(example, rng):
        return {**example, "x": example["x"] + rng.normal(size=example["x"].shape)}

    def negate(example, rng):
        del rng
        return {**example, "x": -example["x"]}

    arrays = _arrays()
    runs = []
    for _ in range(2):
        data = jdl.StreamingData(arrays, batch_size=20, seed=1, transforms=[add_noise, negate])
        runs.append([jax.device_get(data.next_batch()[0]) for _ in range(10)])  # 2 epochs
        data.close()
    for x, y in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(x["x"], y["x"])
    first = runs[0][0]
    noise = -first["x"] - arrays["x"][first["i"]]
    assert 0.5 < noise.std() < 1.5  # the noise was added, then the sum negated
    # The same example gets different noise in different epochs.
    by_example = {}
    for batch in runs[0]:
        for i, x in zip(batch["i"], batch["x"], strict=True):
            by_example.setdefault(int(i), []).append(x)
    twice = [xs for xs in by_example.values() if len(xs) == 2]
    assert twice and all(not np.array_equal(xs[0], xs[1]) for xs in twice)


def test_iterator_state_round_trips_through_json():
    data = jdl.StreamingData(_arrays(), batch_size=16, seed=2)
    _ids(data, 4)
    saved = json.loads(json.dumps(data.data_state(4)))
    expected = _ids(data, 5)
    data.close()
    fresh = jdl.StreamingData(_arrays(), batch_size=16, seed=2)
    fresh.restore_data_state(saved)
    for x, y in zip(expected, _ids(fresh, 5), strict=True):
        np.testing.assert_array_equal(x, y)
    fresh.close()


def test_close_rewinds_past_prefetched_batches():
    data = jdl.StreamingData(_arrays(), batch_size=16, seed=0, prefetch=3)
    reference = _ids(jdl.StreamingData(_arrays(), batch_size=16, seed=0), 6)
    first = _ids(data, 2)
    deadline = time.time() + 10
    while data._prefetcher._queue.qsize() < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert data._prefetcher._queue.qsize() == 3, "the thread must read ahead of the consumer"
    data.close()  # drops the 3 prefetched batches; the stream goes on after batch 2
    rest = _ids(data, 4)
    for x, y in zip(reference, first + rest, strict=True):
        np.testing.assert_array_equal(x, y)
    data.close()


def test_chunk_inputs_pad_with_the_last_batch():
    data = jdl.StreamingData(_arrays(), batch_size=16, seed=0)
    batches = data.chunk_inputs(2, 5)
    assert len(batches) == 5 and all(b is batches[1] for b in batches[2:])
    assert data.data_state(2)["iterator"] == {"next_index": 2}  # 2 used, not 5
    with pytest.raises(ValueError, match="count"):
        data.chunk_inputs(6, 5)
    data.close()


def test_batch_larger_than_the_data_names_both_numbers():
    with pytest.raises(BatchSizeError) as caught:
        jdl.StreamingData(_arrays(n=10), batch_size=16, seed=0)
    message = str(caught.value)
    assert "batch_size 16" in message and "(10 examples)" in message
    assert "at most 10" in message and "\n" not in message
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert jdl.StreamingData(_arrays(n=16), batch_size=16, seed=0).steps_per_epoch == 1


def test_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of the process count"):
        jdl.StreamingData(_arrays(), batch_size=5, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        jdl.StreamingData(_arrays(n=10), batch_size=16, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="agree in length"):
        jdl.StreamingData({"x": np.zeros(4), "y": np.zeros(5)}, batch_size=2, seed=0)
    data = jdl.StreamingData(_arrays(), batch_size=16, seed=0)
    with pytest.raises(ValueError, match="kind"):
        data.restore_data_state(jdl.InMemoryData(_arrays(), batch_size=16, seed=0).data_state(3))
    with pytest.raises(ValueError, match="seed=1"):
        data.restore_data_state({**data.data_state(0), "seed": 1})


def test_a_failing_transform_raises_in_the_training_thread():
    def broken(example, rng):
        raise KeyError("no such field")

    data = jdl.StreamingData(_arrays(), batch_size=16, seed=0, transforms=[broken])
    with pytest.raises(RuntimeError, match="reading the next training batch failed"):
        data.next_batch()
    data.close()


# fit with a stream -------------------------------------------------------------------------


def _state(seed=0):
    return mlp_state(4, (16,), 3, tx=_TX, seed=seed)


# One optimizer and one step function for all fits: they are static parts of the compiled
# program, so new objects would compile again.
_TX, _ = jdl.make_optimizer("adam", learning_rate=1e-2)


def _fit(workdir=None, num_steps=30, **kwargs):
    def jitter(example, rng):
        return {**example, "x": example["x"] + 0.1 * rng.normal(size=example["x"].shape)}

    options = dict(
        train_step=_TRAIN_STEP,
        train_data=jdl.StreamingData(_arrays(n=200), batch_size=16, seed=0, transforms=[jitter]),
        num_steps=num_steps,
        log_every=10,
        workdir=workdir,
        steps_per_dispatch=4,
        progress=False,
    )
    options.update(kwargs)
    return jdl.fit(_state(), **options)


_TRAIN_STEP = jdl.make_train_step(jdl.classification_loss())


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_fit_trains_on_a_stream_and_compiles_once():
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = _fit(num_steps=9)  # chunks of 4, 4, 1: a short, padded last chunk
        before = len(compiles)
        result = _fit(num_steps=60, log_every=7)  # many chunks cut short at log boundaries
    finally:
        jax.monitoring.clear_event_listeners()
    assert first.step == 9 and result.step == 60
    assert len(compiles) == before, "the streaming chunk program recompiled"
    assert result.train_metrics["loss"] < 0.9 * np.log(3)


def test_rolled_stream_chunks_do_not_depend_on_where_chunks_are_cut():
    # unroll=1: a while loop over the steps before the stop; cut chunks run the same body.
    uncut = _fit(num_steps=24, unroll=1)
    cut = _fit(num_steps=24, unroll=1, log_every=5)
    written_out = _fit(num_steps=24)
    for a, b, c in zip(
        _leaves(uncut.state), _leaves(cut.state), _leaves(written_out.state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_resume_mid_epoch_sees_the_same_batches(tmp_path):
    # 200 examples in batches of 16: 12 steps per epoch; stop at 17, in the middle of the
    # second epoch and of a chunk, then resume with a fresh stream.
    straight = _fit(num_steps=30)
    first = _fit(workdir=str(tmp_path), num_steps=17, checkpoint_every=5)
    assert first.step == 17
    saved = jdl.Checkpointer(str(tmp_path / "checkpoints")).restore(_state()).data_state
    assert saved["kind"] == "streaming" and saved["iterator"] == {"next_index": 17}
    resumed = _fit(workdir=str(tmp_path), num_steps=30, checkpoint_every=5)
    assert resumed.step == 30
    for x, y in zip(_leaves(straight.state), _leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(x, y)
