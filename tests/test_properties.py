"""Property-based tests: config overrides round-trip typed values, durations, IDX files
round-trip any shape and dtype (and any truncation is caught), in-memory batches cover
each example once per epoch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jdl
from jdl.config import ConfigError, apply_overrides, flatten, parse_command_line, parse_duration
from jdl.data import IdxFormatError, read_idx, write_idx


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.learning_rate = 1e-3
    c.use_bias = True
    c.sizes = (128, 64)
    c.optim = ml_collections.ConfigDict({"momentum": 0.9, "betas": (0.9, 0.999)})
    return c


# --- config ----------------------------------------------------------------------------

finite_floats = st.floats(allow_nan=False, allow_infinity=False)


@given(value=finite_floats)
def test_float_override_round_trips_through_its_repr(value):
    config, _ = parse_command_line([f"--config.learning_rate={value!r}"], get_config)
    assert config.learning_rate == value and isinstance(config.learning_rate, float)


@given(value=st.booleans(), spelling=st.integers(0, 3), data=st.data())
def test_bool_override_accepts_every_documented_spelling_in_any_case(value, spelling, data):
    word = [["false", "0", "no", "off"], ["true", "1", "yes", "on"]][value][spelling]
    text = "".join(data.draw(st.sampled_from([c.lower(), c.upper()])) for c in word)
    config, _ = parse_command_line([f"--config.use_bias={text}"], get_config)
    assert config.use_bias is value


@given(sizes=st.lists(st.integers(-(10**9), 10**9), min_size=1, max_size=6))
def test_tuple_override_round_trips(sizes):
    config, _ = parse_command_line([f"--config.sizes={tuple(sizes)!r}"], get_config)
    assert config.sizes == tuple(sizes)


@given(momentum=finite_floats, betas=st.tuples(finite_floats, finite_floats))
def test_nested_overrides_round_trip_and_leave_other_keys(momentum, betas):
    config = get_config()
    before = flatten(config)
    apply_overrides(config, [("optim.momentum", repr(momentum)), ("optim.betas", repr(betas))])
    after = flatten(config)
    assert after["optim.momentum"] == momentum and after["optim.betas"] == betas
    assert {k: v for k, v in after.items() if not k.startswith("optim.")} == {
        k: v for k, v in before.items() if not k.startswith("optim.")
    }


@settings(max_examples=40)
@given(key=st.from_regex(r"[a-z_][a-z0-9_.]{0,20}", fullmatch=True))
def test_any_unknown_key_is_a_config_error(key):
    if key in flatten(get_config()):
        return
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_command_line([f"--config.{key}=1"], get_config)


@given(text=st.text(max_size=12))
def test_an_int_key_takes_only_integers(text):
    try:
        expected = int(text)
    except ValueError:
        with pytest.raises(ConfigError, match="config key 'seed' expects a int"):
            parse_command_line([f"--config.seed={text}"], get_config)
    else:
        assert parse_command_line([f"--config.seed={text}"], get_config)[0].seed == expected


# --- durations -------------------------------------------------------------------------


@given(
    epochs=st.floats(0.001, 1000, allow_nan=False),
    steps_per_epoch=st.integers(1, 1000),
    batch_size=st.integers(1, 512),
)
def test_fractional_epochs_round_up_to_whole_steps(epochs, steps_per_epoch, batch_size):
    steps = parse_duration(
        f"{epochs!r} epochs", steps_per_epoch=steps_per_epoch, batch_size=batch_size
    )
    assert steps == max(1, math.ceil(epochs * steps_per_epoch))


@given(amount=st.floats(-1e6, 0, allow_nan=False), unit=st.sampled_from(["steps", "epochs"]))
def test_non_positive_durations_are_rejected(amount, unit):
    with pytest.raises(ConfigError, match="must be positive"):
        parse_duration(f"{amount!r} {unit}", steps_per_epoch=10, batch_size=8)


# --- IDX files -------------------------------------------------------------------------

IDX_DTYPES = st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
IDX_ARRAYS = IDX_DTYPES.flatmap(
    lambda dtype: hnp.arrays(
        dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
    )
)


@settings(max_examples=60, deadline=None)
@given(array=IDX_ARRAYS, gzip=st.booleans())
def test_idx_round_trip_any_shape_and_dtype(tmp_path_factory, array, gzip):
    path = tmp_path_factory.mktemp("idx") / ("a.idx.gz" if gzip else "a.idx")
    write_idx(path, array)
    loaded = read_idx(path)
    assert loaded.dtype == array.dtype and loaded.shape == array.shape
    np.testing.assert_array_equal(loaded, array)  # NaNs compare equal here


@settings(max_examples=40, deadline=None)
@given(array=IDX_ARRAYS, data=st.data())
def test_idx_any_truncation_is_a_format_error(tmp_path_factory, array, data):
    path = tmp_path_factory.mktemp("idx") / "a.idx"
    write_idx(path, array)
    raw = path.read_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    path.write_bytes(raw[:cut])
    if cut < len(raw):
        with pytest.raises(IdxFormatError, match="truncated"):
            read_idx(path)


# --- in-memory batches -----------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    num_examples=st.integers(1, 40),
    batch_fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
    first_step=st.integers(0, 500),
    length=st.integers(1, 12),
)
def test_chunk_indices_are_the_batches_of_each_step(
    num_examples, batch_fraction, seed, first_step, length
):
    # The chunk program draws its batches from `chunk_indices` (computed before its loop);
    # they must be each step's slice of its epoch's permutation, across epoch boundaries
    # and for epochs shorter than the chunk.
    batch_size = max(1, int(num_examples * batch_fraction))
    data = jdl.InMemoryData(
        {"i": np.arange(num_examples, dtype=np.int32)}, batch_size=batch_size, seed=seed
    )
    rows = np.asarray(jax.jit(data.sampler.chunk_indices, static_argnums=1)(first_step, length))
    assert rows.shape == (length, batch_size)
    for k in range(length):
        step = first_step + k
        order = np.asarray(data.sampler.epoch_permutation(step // data.steps_per_epoch))
        position = (step % data.steps_per_epoch) * batch_size
        np.testing.assert_array_equal(rows[k], order[position : position + batch_size])


@settings(max_examples=8, deadline=None)
@given(
    num_examples=st.integers(1, 40),
    batch_fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
    epoch=st.integers(0, 1000),
)
def test_each_epoch_visits_each_example_at_most_once(num_examples, batch_fraction, seed, epoch):
    batch_size = max(1, int(num_examples * batch_fraction))
    data = jdl.InMemoryData(
        {"i": np.arange(num_examples, dtype=np.int32)}, batch_size=batch_size, seed=seed
    )
    order = data.sampler.epoch_permutation(jnp.int32(epoch))
    rows = data.sampler.chunk_indices(jnp.int32(epoch * data.steps_per_epoch), data.steps_per_epoch)
    seen = np.concatenate(
        [np.asarray(data.sampler.take_batch(data.arrays, row)["i"]) for row in rows]
    )
    # Full batches only: every example once, except the dropped remainder (< one batch).
    assert len(seen) == len(set(seen.tolist())) == data.steps_per_epoch * batch_size
    assert num_examples - len(seen) < batch_size
    assert sorted(np.asarray(order).tolist()) == list(range(num_examples))
