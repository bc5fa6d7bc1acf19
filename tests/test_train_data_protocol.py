"""The `TrainData` protocol: a user's own source and `IterableData` train with `fit` and resume
exactly; a resume with another data set-up is refused the same way for every implementation."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import mlp_state

import jdl
from jdl import parallel
from jdl.data.pipeline import (
    IterableData,
    IterableDataError,
    TrainData,
    TrainDataError,
    check_same_setup,
)
from jdl.data.text import RandomWindows
from jdl.errors import UserError

# One optimizer and one step function for all fits: they are static parts of the compiled
# program, so new objects would compile again.
_TX, _ = jdl.make_optimizer("adam", learning_rate=1e-2)
_TRAIN_STEP = jdl.make_train_step(jdl.classification_loss())
_DIM, _CLASSES = 4, 3


def _state(seed=0):
    return mlp_state(_DIM, (16,), _CLASSES, tx=_TX, seed=seed)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _host_batch(seed: int, index: int, rows: int) -> dict[str, np.ndarray]:
    """Batch `index` of a seeded stream: three blobs, a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    y = rng.integers(0, _CLASSES, rows).astype(np.int32)
    x = rng.normal(0, 1, (rows, _DIM)).astype(np.float32) + 2 * y[:, None]
    return {"x": x, "y": y}


# A user's own source: implements the protocol directly, no jdl base class (the example of
# docs/concepts/data.md) -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StackedBatches:
    """The traced part: a chunk's argument is its batches stacked, (length, B, ...)."""

    def step_inputs(self, first_step, stacked, length):
        return stacked  # row i is the batch of step first_step + i

    def step_batch(self, stacked, row):
        return row


class SeededRows:
    """Batch s holds rows of a host table (e.g. an np.memmap) drawn by a (seed, s) generator."""

    program = StackedBatches()

    def __init__(self, table, *, batch_size, seed):
        self.table, self.batch_size, self.seed = table, batch_size, seed
        self.num_rows = len(table["x"])
        self.next_step = 0  # the position: the step of the next batch
        self.sharding = None

    def batch(self, step):
        rng = np.random.default_rng([self.seed, step])
        rows = np.sort(rng.choice(self.num_rows, self.batch_size, replace=False))
        return {name: values[rows] for name, values in self.table.items()}

    def chunk_inputs(self, count, length):
        batches = [self.batch(self.next_step + i) for i in range(count)]
        batches += [batches[-1]] * (length - count)  # padding: those steps do not train
        self.next_step += count
        stacked = {name: np.stack([b[name] for b in batches]) for name in batches[0]}
        return jax.device_put(stacked, self.sharding)

    def data_state(self, step):
        return {
            "kind": "seeded_rows",
            "next_step": self.next_step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_rows": self.num_rows,
        }

    def restore_data_state(self, data_state):
        check_same_setup(
            data_state, self.data_state(0), keys=("kind", "seed", "batch_size", "num_rows")
        )
        self.next_step = data_state["next_step"]

    def place_on_mesh(self, placement):
        # (length, B, ...): the rows of every batch split over the mesh's batch axes
        spec = jax.sharding.PartitionSpec(None, *placement.batch_sharding.spec)
        self.sharding = jax.sharding.NamedSharding(placement.mesh, spec)

    def close(self):
        pass


_TABLE = _host_batch(7, 0, 256)


def _seeded_rows(seed=0, batch_size=16):
    return SeededRows(_TABLE, batch_size=batch_size, seed=seed)


def _generator_data(seed=0, batch_size=16, **kwargs):
    def batches():
        index = 0
        while True:  # as many batches as the run takes
            yield _host_batch(seed, index, batch_size)
            index += 1

    return IterableData(batches, batch_size=batch_size, setup={"seed": seed}, **kwargs)


def _fit(data, workdir=None, num_steps=24, **kwargs):
    options = dict(
        train_step=_TRAIN_STEP,
        train_data=data,
        num_steps=num_steps,
        log_every=6,
        workdir=workdir,
        checkpoint_every=4,
        steps_per_dispatch=5,
        progress=False,
    )
    options.update(kwargs)
    return jdl.fit(_state(), **options)


def _stop_and_resume(make_data, tmp_path):
    """fit to 12 steps with a workdir, then on to 24 with fresh data; and 24 straight."""
    straight = _fit(make_data())
    first = _fit(make_data(), workdir=str(tmp_path), num_steps=12)
    assert first.step == 12
    saved = jdl.Checkpointer(str(tmp_path / "checkpoints")).restore(_state()).data_state
    resumed = _fit(make_data(), workdir=str(tmp_path), num_steps=24)
    assert resumed.step == 24 and not resumed.was_finished
    for x, y in zip(_leaves(straight.state), _leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(x, y)
    return saved


def test_implementations_satisfy_the_protocol():
    arrays = _host_batch(0, 0, 32)
    implementations = [
        jdl.InMemoryData(arrays, batch_size=8, seed=0),
        jdl.StreamingData(arrays, batch_size=8, seed=0),
        RandomWindows(np.arange(100), batch_size=4, seq_len=8, seed=0),
        _generator_data(),
        _seeded_rows(batch_size=8),
    ]
    for data in implementations:
        assert isinstance(data, TrainData), type(data).__name__
        hash(data.program)
        data.close()
    assert not isinstance(arrays, TrainData)


def test_a_users_own_source_trains_and_resumes_bitwise(tmp_path):
    saved = _stop_and_resume(_seeded_rows, tmp_path)
    assert saved == {
        "kind": "seeded_rows",
        "next_step": 12,
        "seed": 0,
        "batch_size": 16,
        "num_rows": 256,
    }


def test_iterable_data_over_a_generator_trains_and_resumes_bitwise(tmp_path):
    saved = _stop_and_resume(_generator_data, tmp_path)
    assert saved["kind"] == "iterable" and saved["batches"] == 12
    assert saved["setup"] == {"seed": 0}


def _other_setups():
    """(name, data that wrote the checkpoint, data of another set-up, words of the message)."""
    arrays, other = _host_batch(0, 0, 64), _host_batch(0, 1, 64)
    ids = np.arange(200) % 7
    return [
        (
            "in_memory",
            lambda: jdl.InMemoryData(arrays, batch_size=16, seed=0),
            lambda: jdl.InMemoryData(arrays, batch_size=16, seed=1),
            "seed=0",
        ),
        (
            "streaming",
            lambda: jdl.StreamingData(arrays, batch_size=16, seed=0),
            lambda: jdl.StreamingData(other, batch_size=8, seed=0),
            "batch_size=16",
        ),
        (
            "random_windows",
            lambda: RandomWindows(ids, batch_size=4, seq_len=8, seed=0),
            lambda: RandomWindows(ids, batch_size=4, seq_len=9, seed=0),
            "seq_len=8",
        ),
        ("iterable", _generator_data, lambda: _generator_data(seed=5), "setup={'seed': 0}"),
        ("user", _seeded_rows, lambda: _seeded_rows(seed=2), "seed=0"),
        (
            "kind",
            lambda: jdl.InMemoryData(arrays, batch_size=16, seed=0),
            _generator_data,
            "kind 'in_memory'",
        ),
    ]


@pytest.mark.parametrize(
    "writer,other,words",
    [case[1:] for case in _other_setups()],
    ids=[case[0] for case in _other_setups()],
)
def test_a_resume_with_another_setup_is_refused(tmp_path, writer, other, words):
    # The checkpoint a run of `writer` would leave at step 4, then fit with another set-up:
    # refused before anything compiles or changes in the workdir.
    checkpointer = jdl.Checkpointer(str(tmp_path / "checkpoints"))
    position = writer()
    position.chunk_inputs(4, 4)
    checkpointer.save(4, _state(), data_state=json.loads(json.dumps(position.data_state(4))))
    checkpointer.close()
    position.close()
    data = other()
    with pytest.raises(jdl.DataSetupMismatchError) as caught:
        _fit(data, workdir=str(tmp_path), num_steps=8)
    message = str(caught.value)
    assert words in message and "new workdir" in message and "\n" not in message
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert not (tmp_path / "run.json").exists()  # refused before the workdir changed
    data.close()


def test_check_same_setup_compares_json_values_and_names_missing_keys():
    expected = {"kind": "k", "shape": (2, 3), "seed": np.int64(4)}
    check_same_setup(
        {"kind": "k", "shape": [2, 3], "seed": 4}, expected, keys=("kind", "shape", "seed")
    )
    with pytest.raises(jdl.DataSetupMismatchError, match=r"records no seed \(this run uses 4\)"):
        check_same_setup({"kind": "k"}, expected, keys=("kind", "seed"))
    with pytest.raises(jdl.DataSetupMismatchError, match=r"shape=\[2, 4\], but this run uses"):
        check_same_setup({"kind": "k", "shape": [2, 4]}, expected, keys=("shape",))


def test_equal_programs_share_one_compiled_chunk():
    step = jdl.make_train_step(jdl.classification_loss())
    arrays = _host_batch(0, 0, 64)
    ids = np.arange(300) % 5

    def runner(data):
        return jdl.make_chunk_runner(step, data, 4)

    same = runner(jdl.InMemoryData(arrays, batch_size=16, seed=0))
    assert runner(jdl.InMemoryData(_host_batch(1, 0, 64), batch_size=16, seed=0)) is same
    assert runner(jdl.InMemoryData(arrays, batch_size=16, seed=1)) is not same
    windows = runner(RandomWindows(ids, batch_size=4, seq_len=8, seed=0))
    assert runner(RandomWindows(ids + 1, batch_size=4, seq_len=8, seed=0)) is windows
    assert runner(RandomWindows(ids, batch_size=4, seq_len=8, seed=3)) is not windows
    streamed = runner(jdl.StreamingData(arrays, batch_size=16, seed=0))
    assert runner(_generator_data()) is streamed  # both host-fed: one program


def test_an_object_that_is_not_train_data_is_one_clear_error():
    class Incomplete:
        batch_size = 8
        program = StackedBatches()

        def chunk_inputs(self, count, length):
            raise AssertionError("never called")

    with pytest.raises(TrainDataError) as caught:
        _fit(Incomplete())
    message = str(caught.value)
    assert "lacks data_state, restore_data_state, place_on_mesh, close" in message
    assert isinstance(caught.value, UserError) and isinstance(caught.value, TypeError)

    class Unhashable(SeededRows):
        program = {"not": "hashable"}

    with pytest.raises(TrainDataError, match="program .* is not hashable"):
        jdl.make_chunk_runner(_TRAIN_STEP, Unhashable(_TABLE, batch_size=8, seed=0), 4)


# IterableData --------------------------------------------------------------------------------


class _CountingSource:
    """`make_iterator` over batches whose "i" column numbers them; counts its calls."""

    def __init__(self, num_batches=1000, rows=4, fault=None):
        self.calls, self.num_batches, self.rows, self.fault = 0, num_batches, rows, fault

    def __call__(self):
        self.calls += 1
        for index in range(self.num_batches):
            batch = {"i": np.full(self.rows, index, np.int32)}
            if self.fault is not None:
                batch = self.fault(index, batch)
            yield batch


def _numbers(data, count):
    return [int(np.asarray(data.next_batch()[0]["i"])[0]) for _ in range(count)]


def test_iterable_data_close_keeps_read_ahead_batches():
    source = _CountingSource()
    data = IterableData(source, batch_size=4, prefetch=3)
    assert _numbers(data, 2) == [0, 1]
    data.close()  # the thread had read batches 2.. ahead: they come next, nothing is lost
    assert _numbers(data, 5) == [2, 3, 4, 5, 6]
    assert data.data_state(7)["batches"] == 7 and source.calls == 1
    data.close()


def test_iterable_data_restore_skips_the_batches_trained_on():
    source = _CountingSource()
    data = IterableData(source, batch_size=4, setup={"name": "numbers"})
    _numbers(data, 3)
    saved = json.loads(json.dumps(data.data_state(3)))
    data.close()
    fresh = IterableData(source, batch_size=4, setup={"name": "numbers"})
    fresh.restore_data_state(saved)
    assert _numbers(fresh, 2) == [3, 4] and source.calls == 2  # a new iterator, 3 skipped
    fresh.close()
    short = IterableData(_CountingSource(num_batches=2), batch_size=4, setup={"name": "numbers"})
    short.restore_data_state(saved)
    with pytest.raises(IterableDataError, match="ended after 2 batches while skipping the 3"):
        short.next_batch()


def _faulty(index, batch):
    if index == 1:
        return {"i": np.zeros(3, np.int32)}  # one row short
    return batch


@pytest.mark.parametrize(
    "source,words",
    [
        (_CountingSource(num_batches=5), "ended after 5 batches, but the run needs more"),
        (_CountingSource(fault=_faulty), "batch 1: array 'i' has shape (3,), but every batch"),
        (
            _CountingSource(fault=lambda index, batch: {"i": batch["i"], "j": batch["i"]}),
            "batch 0: array 'i' has shape (4,), but every batch needs 8 rows",
        ),
        (
            _CountingSource(fault=lambda index, batch: {"i": np.array(["a"] * 4)}),
            "dtype <U1, which cannot go on the device",
        ),
        (
            _CountingSource(fault=lambda i, b: b if i < 2 else {"i": b["i"].astype(np.int64)}),
            "batch 2 has arrays",
        ),
        (_CountingSource(fault=lambda index, batch: [batch]), "not a non-empty dict of arrays"),
    ],
    ids=["ends", "short", "rows", "strings", "layout", "not_a_dict"],
)
def test_iterable_data_bad_batches_are_one_clear_error(source, words):
    rows = 8 if "8 rows" in words else 4
    data = IterableData(source, batch_size=rows, prefetch=1)
    with pytest.raises(IterableDataError) as caught:
        _numbers(data, 10)
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, UserError)
    data.close()


def test_iterable_data_running_out_stops_fit_with_the_users_error():
    data = IterableData(lambda: (_host_batch(0, i, 16) for i in range(3)), batch_size=16)
    with pytest.raises(IterableDataError, match="ended after 3 batches"):
        _fit(data, num_steps=8, checkpoint_every=0, steps_per_dispatch=1)


def test_iterable_data_arguments_are_checked():
    with pytest.raises(IterableDataError, match="make_iterator must be a function"):
        IterableData([{"x": np.zeros(2)}], batch_size=2)
    with pytest.raises(IterableDataError, match="setup must be a dict of JSON values"):
        IterableData(_CountingSource(), batch_size=2, setup={"when": object()})
    with pytest.raises(ValueError, match="multiple of the process count 2"):
        IterableData(_CountingSource(), batch_size=3, process_count=2)


@pytest.mark.parametrize("make_data", [_generator_data, _seeded_rows], ids=["iterable", "user"])
def test_host_fed_batches_follow_the_mesh(make_data):
    # fit places the data through the protocol: each batch's rows split over the batch axes.
    reference = _fit(make_data(batch_size=32), num_steps=6, checkpoint_every=0, unroll=1)
    mesh = parallel.make_mesh("data:8")
    data = make_data(batch_size=32)
    result = _fit(data, num_steps=6, checkpoint_every=0, unroll=1, mesh=mesh)
    assert data.sharding.mesh == mesh and "data" in data.sharding.spec
    for got, want in zip(_leaves(result.state), _leaves(reference.state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rolled_and_written_out_chunks_are_separate_programs():
    # unroll=True == 1 in Python: the cache must still tell a rolled loop from written-out steps.
    step = jdl.make_train_step(jdl.classification_loss())
    data = jdl.InMemoryData(_host_batch(0, 0, 64), batch_size=16, seed=0)
    written_out = jdl.make_chunk_runner(step, data, 4, True)
    assert jdl.make_chunk_runner(step, data, 4, 1) is not written_out
    assert jdl.make_chunk_runner(step, data, 4, 4) is written_out  # a block as long as the chunk
    assert (
        "while"
        in jdl.make_chunk_runner(step, data, 4, 1)
        .lower(_state(), data.arrays, jnp.int32(4))
        .as_text()
    )
