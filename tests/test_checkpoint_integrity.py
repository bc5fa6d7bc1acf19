"""Checkpoints that cannot lie: checksums of every array, fallback past corrupt steps,
quiet failures, run state, the best-metric name, weights-only restore, a full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from support import mlp_state

import jdl
from jdl.checkpoint import (
    CHECKSUM_ALGORITHM,
    BestMetricError,
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointWriteError,
    tree_checksums,
)

TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _state(hidden=256, tx=None, seed=0):
    return mlp_state(64, (hidden,), 10, tx=tx or optax.adam(1e-3), seed=seed)


def _scaled(state, factor):
    """`state` with other parameter values and step: a later checkpoint."""
    params = jax.tree.map(lambda x: x * factor, state.params)
    return state.replace(params=params, step=state.step + factor)


def _arrays(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def _assert_bitwise_equal(a, b):
    a, b = _arrays(a), _arrays(b)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _data_files(step_dir: Path) -> list[Path]:
    """The array data files of a checkpoint (as tests/test_faults.py finds them)."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    return files


def _flip_middle_of_largest_data_file(step_dir: Path, num_bytes: int):
    largest = max(_data_files(step_dir), key=lambda f: f.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + num_bytes):
        data[i] ^= 0xFF
    largest.write_bytes(bytes(data))


def _save_two(directory, **options):
    """Checkpoints at steps 1 and 2 of different states; returns both states."""
    first, second = _state(), _scaled(_state(), 2)
    checkpointer = jdl.Checkpointer(directory, **options)
    checkpointer.save(1, first, data_state={"s": 1})
    checkpointer.save(2, second, data_state={"s": 2})
    checkpointer.close()
    return first, second


def _jdl_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "jdl.checkpoint"]


# --- checksums -------------------------------------------------------------------------


def test_checksums_do_not_depend_on_sharding_devices_or_host():
    assert len(jax.devices()) == 8  # tests/conftest.py's fake CPU devices
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.normal(size=(16, 24)).astype(np.float32),
        "bf16": rng.normal(size=(8, 12)).astype(ml_dtypes.bfloat16),
        "i8": rng.integers(-128, 127, size=(40,)).astype(np.int8),
        "u32": rng.integers(0, 2**32, size=(8, 3), dtype=np.uint32),
        "bool": rng.integers(0, 2, size=(5, 8)).astype(bool),
        "scalar": np.float32(3.5),
    }
    on_host = tree_checksums(arrays)
    one_device = tree_checksums(jax.tree.map(jnp.asarray, arrays))
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    specs = {"f32": P("a", "b"), "bf16": P("b", "a"), "i8": P(("a", "b")), "u32": P("a")}
    sharded = {
        k: jax.device_put(v, NamedSharding(mesh, specs.get(k, P()))) for k, v in arrays.items()
    }
    assert len(sharded["f32"].sharding.device_set) == 8
    assert tree_checksums(sharded) == one_device == on_host
    assert on_host["f32"][0] == "float32" and on_host["bf16"][0] == "bfloat16"


def test_checksums_see_a_change_of_one_bit_and_a_swap_of_two_values():
    x = np.arange(1000, dtype=np.float32)
    flipped = x.copy()
    flipped.view(np.uint32)[500] ^= 1
    swapped = x.copy()
    swapped[[3, 7]] = swapped[[7, 3]]
    sums = [tree_checksums({"x": jnp.asarray(a)})["x"] for a in (x, flipped, swapped)]
    assert sums[0][1] != sums[1][1]  # the plain sum sees the flipped bit
    assert sums[0][1] == sums[2][1] and sums[0][2] != sums[2][2]  # the weighted one the swap


def test_checksums_of_a_train_state_cover_every_leaf_including_keys():
    state = _state(hidden=8)
    sums = tree_checksums(state)
    assert len(sums) == len(jax.tree.leaves(state))
    assert sums["model_state/dropout/rngs/key"][0].startswith("key")
    assert all(len(entry) == 3 for entry in sums.values())


@pytest.mark.parametrize("num_bytes", [1, 64])
def test_flipped_bytes_fall_back_to_the_older_checkpoint(tmp_path, caplog, num_bytes):
    first, second = _save_two(tmp_path)
    _flip_middle_of_largest_data_file(tmp_path / "2", num_bytes)

    if num_bytes == 1:
        # Without verification a flip restores silently into other values: the case to
        # catch. (64 flipped bytes may also hit the file's own framing, which the reader
        # notices by itself, depending on where the write put the arrays.)
        unverified = jdl.Checkpointer(tmp_path, checksums=False)
        silently = unverified.restore(_state(seed=5))
        unverified.close()
        assert silently.step == 2
        assert not np.array_equal(
            silently.state.params["hidden"][0]["kernel"][...],
            second.params["hidden"][0]["kernel"][...],
        )

    checkpointer = jdl.Checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="jdl.checkpoint"):
        restored = checkpointer.restore(_state(seed=5))
    assert restored.step == 1 and restored.data_state == {"s": 1}
    _assert_bitwise_equal(restored.state, first)
    warnings = _jdl_warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"checkpoint at step 2 in {tmp_path} is unreadable" in warnings[0]
    assert "'params/hidden/0/kernel'" in warnings[0] and "checksum" in warnings[0]
    assert "using step 1 instead" in warnings[0]
    assert (tmp_path / "2.corrupt").is_dir() and checkpointer.all_steps() == [1]
    checkpointer.close()


def test_an_explicit_corrupt_step_raises(tmp_path):
    _save_two(tmp_path)
    _flip_middle_of_largest_data_file(tmp_path / "2", 64)
    checkpointer = jdl.Checkpointer(tmp_path)
    with pytest.raises(
        CheckpointCorruptError,
        match=r"array 'params/hidden/0/kernel' of the checkpoint at step 2 does not match "
        r"the checksum saved with it",
    ):
        checkpointer.restore(_state(), step=2)
    assert checkpointer.all_steps() == [1, 2]  # an explicit step is not set aside
    assert checkpointer.restore(_state(), step=1).step == 1
    checkpointer.close()


def test_every_checkpoint_corrupt_is_one_error_listing_each_step_once(tmp_path, caplog):
    _save_two(tmp_path)
    for step in (1, 2):
        _flip_middle_of_largest_data_file(tmp_path / str(step), 64)
    checkpointer = jdl.Checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="jdl.checkpoint"):
        with pytest.raises(CheckpointCorruptError) as caught:
            checkpointer.restore(_state())
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"no checkpoint in {tmp_path} could")
    assert message.count("step 2:") == 1 and message.count("step 1:") == 1
    assert caught.value.__cause__ is None  # no Orbax traceback under the one message
    warnings = _jdl_warnings(caplog)
    assert len(warnings) == 2
    assert "at step 2" in warnings[0] and "at step 1" in warnings[1]
    assert checkpointer.all_steps() == [1, 2]  # nothing is set aside without a fallback
    checkpointer.close()


def _save_in_an_older_layout(directory, states, *, four_items):
    """Writes `states` (step: state) as jdl wrote checkpoints before the manifest: one
    Orbax item per part. Two items ("state", "data") as before checksums and run state
    existed; four ("state", "data", "run", "checksums") as before they became one item."""
    json = ocp.JsonCheckpointHandler
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": json(),
            "run": json(),
            "checksums": json(),
        },
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
    )
    for step, state in states.items():
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave({"s": step})}
        if four_items:
            items["run"] = ocp.args.JsonSave({"eval_history": [{"step": step}]})
            items["checksums"] = ocp.args.JsonSave(
                {"algorithm": CHECKSUM_ALGORITHM, "arrays": tree_checksums(state)}
            )
        manager.save(step, args=ocp.args.Composite(**items))
    manager.close()
    expected = {"state", "data", "run", "checksums"} if four_items else {"state", "data"}
    assert {p.name for p in (Path(directory) / "2").iterdir() if p.is_dir()} == expected


def test_two_item_checkpoints_restore_unverified_without_run_state(tmp_path):
    first, second = _state(), _scaled(_state(), 2)
    _save_in_an_older_layout(tmp_path, {1: first, 2: second}, four_items=False)
    checkpointer = jdl.Checkpointer(tmp_path)
    restored = checkpointer.restore(_state(seed=3))
    assert restored.step == 2 and restored.data_state == {"s": 2} and restored.run_state == {}
    _assert_bitwise_equal(restored.state, second)
    _assert_bitwise_equal(checkpointer.restore_weights(_state(seed=3)).params, second.params)
    # Nothing to verify against: a flipped byte restores silently, as it always did. (One
    # byte in the middle lands in array data; more may hit the file's framing, which the
    # reader notices by itself.)
    _flip_middle_of_largest_data_file(tmp_path / "2", 1)
    assert checkpointer.restore(_state(seed=3)).step == 2
    checkpointer.close()


def test_four_item_checkpoints_restore_with_run_state_and_are_verified(tmp_path, caplog):
    first, second = _state(), _scaled(_state(), 2)
    _save_in_an_older_layout(tmp_path, {1: first, 2: second}, four_items=True)
    checkpointer = jdl.Checkpointer(tmp_path)
    restored = checkpointer.restore(_state(seed=3))
    assert restored.step == 2 and restored.data_state == {"s": 2}
    assert restored.run_state == {"eval_history": [{"step": 2}]}
    _assert_bitwise_equal(restored.state, second)

    _flip_middle_of_largest_data_file(tmp_path / "2", 1)
    with pytest.raises(CheckpointCorruptError, match="'params/hidden/0/kernel'"):
        checkpointer.restore_weights(_state(tx=optax.sgd(0.1)), step=2)
    with caplog.at_level(logging.WARNING, logger="jdl.checkpoint"):
        restored = checkpointer.restore(_state(seed=3))
    assert restored.step == 1 and restored.run_state == {"eval_history": [{"step": 1}]}
    _assert_bitwise_equal(restored.state, first)
    warnings = _jdl_warnings(caplog)
    assert len(warnings) == 1 and "'params/hidden/0/kernel'" in warnings[0]

    # A run resumed from an older checkpoint goes on in the new layout beside it.
    checkpointer.save(3, second, data_state={"s": 3}, run_state={"r": 3})
    checkpointer.wait()
    assert checkpointer.all_steps() == [1, 3]
    assert checkpointer.restore(_state(seed=3)).run_state == {"r": 3}
    assert checkpointer.restore(_state(seed=3), step=1).data_state == {"s": 1}
    checkpointer.close()


def _manifest(step_dir: Path) -> dict:
    return json.loads((step_dir / "manifest" / "metadata").read_text())


@pytest.mark.parametrize("checksums", [True, False])
def test_a_checkpoint_is_its_arrays_and_one_json_manifest(tmp_path, checksums):
    """Data position, run state and checksums are one Orbax item: on a small model each
    item costs more to write and read than the checksums themselves."""
    state = _state(hidden=8)
    checkpointer = jdl.Checkpointer(tmp_path, checksums=checksums)
    checkpointer.save(3, state, data_state={"epoch": 1}, run_state={"since_best": 2})
    checkpointer.close()
    assert {p.name for p in (tmp_path / "3").iterdir() if p.is_dir()} == {"state", "manifest"}
    manifest = _manifest(tmp_path / "3")
    assert manifest["data"] == {"epoch": 1} and manifest["run"] == {"since_best": 2}
    if checksums:  # the same layout either way; only the checksums entry differs
        assert sorted(manifest) == ["checksums", "data", "run"]
        assert manifest["checksums"] == {
            "algorithm": CHECKSUM_ALGORITHM,
            "arrays": json.loads(json.dumps(tree_checksums(state))),
        }
    else:
        assert sorted(manifest) == ["data", "run"]


def test_a_manifest_without_its_entries_is_corrupt(tmp_path, caplog):
    first, _ = _save_two(tmp_path)
    (tmp_path / "2" / "manifest" / "metadata").write_text(json.dumps({"checksums": {}}))
    checkpointer = jdl.Checkpointer(tmp_path)
    with pytest.raises(
        CheckpointCorruptError,
        match=r"^the manifest of the checkpoint at step 2 in .* lacks its data or run entry",
    ):
        checkpointer.restore(_state(), step=2)
    with caplog.at_level(logging.WARNING, logger="jdl.checkpoint"):
        restored = checkpointer.restore(_state())
    assert restored.step == 1 and restored.data_state == {"s": 1}
    _assert_bitwise_equal(restored.state, first)
    assert len(_jdl_warnings(caplog)) == 1 and (tmp_path / "2.corrupt").is_dir()
    checkpointer.close()


def test_restoring_into_another_dtype_is_not_taken_for_corruption(tmp_path):
    checkpointer = jdl.Checkpointer(tmp_path)
    checkpointer.save(1, {"w": jnp.arange(10, dtype=jnp.float32)})
    checkpointer.wait()
    restored = checkpointer.restore({"w": jnp.zeros(10, jnp.bfloat16)})
    assert restored.state["w"].dtype == jnp.bfloat16 and float(restored.state["w"][9]) == 9.0
    checkpointer.close()


# --- quiet failures --------------------------------------------------------------------

_ALL_CORRUPT = """
import os, sys
from pathlib import Path
from types import SimpleNamespace
import optax
from flax import nnx
import jdl

directory = Path(sys.argv[1])
model = jdl.models.MLP(64, (256,), 10, rngs=nnx.Rngs(0))
state = jdl.TrainState.create(model, optax.adam(1e-3))
checkpointer = jdl.Checkpointer(directory)
for step in (1, 2, 3):
    checkpointer.save(step, state)
checkpointer.close()
for step in (1, 2, 3):
    for f in (directory / str(step) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            os.truncate(f, f.stat().st_size // 2)
jdl.Checkpointer(directory).restore(state)
"""


def test_every_checkpoint_corrupt_prints_one_line_per_step_and_one_error(tmp_path):
    script = tmp_path / "all_corrupt.py"
    script.write_text(textwrap.dedent(_ALL_CORRUPT))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    unreadable = [line for line in lines if "is unreadable" in line]
    assert [line.split(" step ")[1].split()[0] for line in unreadable] == ["3", "2", "1"]
    assert done.stderr.count("Traceback") == 1, done.stderr  # the final error's alone
    assert lines[-1].startswith("jdl.checkpoint.CheckpointCorruptError: no checkpoint in")
    assert len(lines) < 25, done.stderr


def test_closed_event_loop_reports_of_a_failed_restore_are_dropped_others_kept(
    tmp_path, monkeypatch
):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    _save_two(tmp_path)
    _flip_middle_of_largest_data_file(tmp_path / "2", 64)
    checkpointer = jdl.Checkpointer(tmp_path)
    assert checkpointer.restore(_state()).step == 1
    checkpointer.close()
    hook = sys.unraisablehook
    assert hook is not seen.append  # restore installed the filter

    def report(error):
        try:
            raise error
        except Exception as raised:  # noqa: BLE001
            hook(SimpleNamespace(exc_type=type(raised), exc_value=raised, exc_traceback=None))

    report(RuntimeError("Event loop is closed"))
    report(RuntimeError("something else"))
    assert [str(u.exc_value) for u in seen] == ["something else"]


def test_unretrieved_task_errors_of_failed_reads_are_dropped_others_kept(tmp_path, caplog):
    _save_two(tmp_path)
    _flip_middle_of_largest_data_file(tmp_path / "2", 64)
    checkpointer = jdl.Checkpointer(tmp_path)
    assert checkpointer.restore(_state()).step == 1  # installs the filter
    checkpointer.close()
    asyncio_logger = logging.getLogger("asyncio")
    read_error = ValueError("OUT_OF_RANGE: Error reading \"w/.zarray\" [tensorstore_spec='{}']")
    other_error = ValueError("a task of the user failed")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for error in (read_error, other_error):
            asyncio_logger.error(
                "Task exception was never retrieved\nfuture: <Task finished>",
                exc_info=(ValueError, error, None),
            )
        asyncio_logger.error(
            "Unhandled exception in event loop", exc_info=(ValueError, read_error, None)
        )
    kept = [r.getMessage().splitlines()[0] for r in caplog.records if r.name == "asyncio"]
    assert kept == ["Task exception was never retrieved", "Unhandled exception in event loop"]
    assert caplog.text.count("a task of the user failed") == 1
    assert caplog.text.count("tensorstore_spec") == 1  # from the other message only


def test_library_error_logs_are_silenced_while_trying_candidates_then_restored(
    tmp_path, monkeypatch, caplog
):
    _save_two(tmp_path)
    _flip_middle_of_largest_data_file(tmp_path / "2", 64)
    original = ocp.CheckpointManager.restore

    def noisy_restore(self, *args, **kwargs):
        absl_logging.error("internal noise with a traceback")
        logging.getLogger("orbax").error("more internal noise")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", noisy_restore)
    checkpointer = jdl.Checkpointer(tmp_path)
    with caplog.at_level(logging.INFO):
        assert checkpointer.restore(_state()).step == 1
    assert "noise" not in caplog.text
    assert len(_jdl_warnings(caplog)) == 1
    assert not logging.getLogger("absl").disabled and not logging.getLogger("orbax").disabled
    caplog.clear()
    with caplog.at_level(logging.INFO):
        absl_logging.error("visible again")
    assert "visible again" in caplog.text
    checkpointer.close()


# --- run state -------------------------------------------------------------------------


def test_run_state_round_trips_in_the_manifest(tmp_path):
    run_state = {
        "best_tracker": {"best": {"step": 4, "accuracy": 0.75}, "since_best": 1},
        "eval_history": [{"step": 2, "accuracy": 0.5}, {"step": 4, "accuracy": 0.75}],
        "train_metrics": {"loss": 0.25},
    }
    checkpointer = jdl.Checkpointer(tmp_path)
    checkpointer.save(4, {"w": jnp.ones(3)}, data_state={"epoch": 1}, run_state=run_state)
    checkpointer.save(5, {"w": jnp.ones(3)})
    checkpointer.wait()
    assert _manifest(tmp_path / "4")["run"] == run_state
    restored = checkpointer.restore({"w": jnp.zeros(3)}, step=4)
    assert restored.run_state == run_state and restored.data_state == {"epoch": 1}
    assert checkpointer.restore({"w": jnp.zeros(3)}).run_state == {}
    checkpointer.close()


# --- best metric -----------------------------------------------------------------------


def test_best_metric_must_be_a_saved_metric_name(tmp_path):
    checkpointer = jdl.Checkpointer(tmp_path, best_metric="accuracy")
    with pytest.raises(
        BestMetricError,
        match=r"best_metric 'accuracy' is not among the metrics saved with the checkpoint at "
        r"step 1 \(\['eval/accuracy', 'eval/loss'\]\)",
    ):
        checkpointer.save(1, {"w": jnp.ones(2)}, metrics={"eval/accuracy": 1, "eval/loss": 2})
    checkpointer.save(2, {"w": jnp.ones(2)})  # no metrics at this step: fine
    checkpointer.save(3, {"w": jnp.ones(2)}, metrics={"accuracy": 0.5, "loss": 1.0})
    checkpointer.close()
    assert jdl.Checkpointer(tmp_path, best_metric="accuracy").best_step() == 3
    with pytest.raises(BestMetricError, match=r"'loss_x' .* \(\['accuracy', 'loss'\]\)"):
        jdl.Checkpointer(tmp_path, best_metric="loss_x").best_step()


def test_on_a_tie_the_first_best_step_is_kept_and_reported(tmp_path):
    checkpointer = jdl.Checkpointer(tmp_path, max_to_keep=1, best_metric="accuracy")
    for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.9), (4, 0.7), (5, 0.9), (6, 0.6)]:
        checkpointer.save(step, {"w": jnp.zeros(3)}, metrics={"accuracy": accuracy})
    checkpointer.wait()
    assert checkpointer.best_step() == 2
    assert checkpointer.all_steps() == [2, 6]
    checkpointer.close()
    minimum = jdl.Checkpointer(tmp_path / "min", max_to_keep=1, best_metric="loss", best_mode="min")
    for step, loss in [(1, 0.5), (2, 0.2), (3, 0.2), (4, 0.3)]:
        minimum.save(step, {"w": jnp.zeros(3)}, metrics={"loss": loss})
    minimum.wait()
    assert minimum.best_step() == 2 and minimum.all_steps() == [2, 4]
    minimum.close()


# --- weights only ----------------------------------------------------------------------


def test_restore_weights_keeps_the_targets_optimizer_step_and_rng(tmp_path):
    saved = _scaled(_state(), 3)
    checkpointer = jdl.Checkpointer(tmp_path)
    checkpointer.save(7, saved)
    checkpointer.wait()
    target = _state(tx=optax.sgd(0.1, momentum=0.9), seed=4)
    loaded = checkpointer.restore_weights(target)
    _assert_bitwise_equal(loaded.params, saved.params)
    _assert_bitwise_equal(loaded.model_state, saved.model_state)
    _assert_bitwise_equal(loaded.opt_state, target.opt_state)
    assert int(loaded.step) == int(target.step) == 0
    _assert_bitwise_equal(loaded.rng, target.rng)
    assert loaded.tx is target.tx
    checkpointer.close()


def test_full_restore_with_another_optimizer_suggests_restore_weights(tmp_path):
    checkpointer = jdl.Checkpointer(tmp_path)
    checkpointer.save(1, _state())
    checkpointer.wait()
    with pytest.raises(
        CheckpointMismatchError,
        match=r"holds a different optimizer state \(first difference 'opt_state/.*another "
        r"optimizer or other optimizer settings.*--config.init_from=WORKDIR\[:STEP\] "
        r"\(experiments\) or Checkpointer.restore_weights \(API\)",
    ) as caught:
        checkpointer.restore(_state(tx=optax.sgd(0.1, momentum=0.9)))
    assert "the model lacks" not in str(caught.value)
    checkpointer.close()


def test_restore_weights_into_another_model_is_a_clear_mismatch(tmp_path):
    checkpointer = jdl.Checkpointer(tmp_path)
    checkpointer.save(1, _state(hidden=256))
    checkpointer.wait()
    with pytest.raises(
        CheckpointMismatchError,
        match=r"'params/head/kernel' has shape \(256, 10\) but the model expects \(32, 10\)",
    ):
        checkpointer.restore_weights(_state(hidden=32, tx=optax.sgd(0.1)))
    checkpointer.close()


def test_restore_weights_verifies_checksums_and_falls_back(tmp_path, caplog):
    first, _ = _save_two(tmp_path)
    _flip_middle_of_largest_data_file(tmp_path / "2", 1)
    checkpointer = jdl.Checkpointer(tmp_path)
    with pytest.raises(CheckpointCorruptError, match="'params/hidden/0/kernel'"):
        checkpointer.restore_weights(_state(tx=optax.sgd(0.1)), step=2)
    with caplog.at_level(logging.WARNING, logger="jdl.checkpoint"):
        loaded = checkpointer.restore_weights(_state(tx=optax.sgd(0.1), seed=9))
    _assert_bitwise_equal(loaded.params, first.params)
    warnings = _jdl_warnings(caplog)
    assert len(warnings) == 1 and "step 2" in warnings[0] and "using step 1" in warnings[0]
    checkpointer.close()


# --- full disk -------------------------------------------------------------------------


def _disk_full_at(monkeypatch, step):
    """Makes every JSON item of `step`'s checkpoint fail as on a full disk, inside
    Orbax's (background) file writing."""
    original = ocp.JsonCheckpointHandler._save_fn

    async def disk_full(self, item, directory):
        if f"{os.sep}{step}{TMP_SUFFIX}" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_full_disk_is_one_line_naming_the_intact_steps(tmp_path, monkeypatch, async_save):
    _disk_full_at(monkeypatch, 3)
    checkpointer = jdl.Checkpointer(tmp_path, async_save=async_save)
    checkpointer.save(1, {"w": jnp.ones(4)})
    checkpointer.save(2, {"w": jnp.ones(4)})
    with pytest.raises(CheckpointWriteError) as caught:
        checkpointer.save(3, {"w": jnp.ones(4)})
        checkpointer.close()  # an asynchronous write reports its failure here
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "\n" not in message
    assert "checkpoint at step 3" in message and "No space left on device" in message
    assert "steps [1, 2] are intact" in message
    checkpointer.close()
    assert jdl.Checkpointer(tmp_path).all_steps() == [1, 2]


def test_close_in_finally_does_not_mask_the_error_on_its_way(tmp_path, monkeypatch, caplog):
    _disk_full_at(monkeypatch, 2)
    checkpointer = jdl.Checkpointer(tmp_path)
    checkpointer.save(1, {"w": jnp.ones(4)})
    checkpointer.wait()
    with caplog.at_level(logging.WARNING, logger="jdl.checkpoint"):
        with pytest.raises(RuntimeError, match="the training step failed"):
            try:
                checkpointer.save(2, {"w": jnp.ones(4)})  # fails in the background
                raise RuntimeError("the training step failed")
            finally:
                checkpointer.close(raise_errors=False)
    warnings = _jdl_warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "No space left on device" in warnings[0] and "steps [1] are intact" in warnings[0]


def test_a_read_only_checkpointer_leaves_another_runs_directory_alone(tmp_path):
    tree = {"w": np.arange(16, dtype=np.float32)}
    writer = jdl.Checkpointer(tmp_path)
    for step in (1, 2):
        writer.save(step, jax.tree.map(lambda x, s=step: x * s, tree))
    writer.close()
    in_progress = tmp_path / "3.orbax-checkpoint-tmp-123"  # the other run is saving step 3
    in_progress.mkdir()
    (tmp_path / "2" / "state" / "_METADATA").write_text("garbled")
    before = sorted(p.name for p in tmp_path.iterdir())

    reader = jdl.Checkpointer(tmp_path, read_only=True)
    restored = reader.restore(tree)  # step 2 is unreadable: skipped, not renamed
    assert restored.step == 1
    np.testing.assert_array_equal(restored.state["w"], tree["w"])
    with pytest.raises(ValueError, match="read-only"):
        reader.save(4, tree)
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert in_progress.is_dir()
    assert not jdl.Checkpointer(tmp_path / "absent", read_only=True).all_steps()
    assert not (tmp_path / "absent").exists()
