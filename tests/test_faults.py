"""Faults: SIGKILL mid-run, corrupt and half-written checkpoints, a full disk, two runs
on one workdir, non-finite data, checkpoints of another architecture."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from support import mlp_state

import jdl
from jdl.checkpoint import CheckpointCorruptError, CheckpointMismatchError, CheckpointWriteError
from jdl.data import NonFiniteDataError
from jdl.lock import WorkdirLock, WorkdirLockedError

sys.path.insert(0, os.path.dirname(__file__))
import faults_worker  # noqa: E402  (the subprocess's training set-up, shared with the reference)

WORKER = os.path.join(os.path.dirname(__file__), "faults_worker.py")
TMP_SUFFIX = ".orbax-checkpoint-tmp"


# --- helpers -------------------------------------------------------------------------


_state = mlp_state  # the workers' state: MLP 8-32-4 with Adam


# One step function and data set for every fit here: the chunk program compiles once.
_TRAIN_STEP = jdl.make_train_step(jdl.classification_loss())
_TRAIN_DATA = faults_worker.blobs()


def _fit(workdir, num_steps, **kwargs):
    options = dict(
        train_step=_TRAIN_STEP,
        train_data=jdl.InMemoryData(_TRAIN_DATA, batch_size=32, seed=0),
        num_steps=num_steps,
        log_every=faults_worker.CHECKPOINT_EVERY,
        workdir=None if workdir is None else str(workdir),
        checkpoint_every=faults_worker.CHECKPOINT_EVERY if workdir is not None else 0,
        max_to_keep=2,
        steps_per_dispatch=1,
        progress=False,
    )
    options.update(kwargs)
    return jdl.fit(_state(), **options)


def _params(state) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _step_dirs(directory: Path) -> tuple[list[int], list[str]]:
    """(complete step folders, temporary in-progress folders) as listed on disk."""
    names = os.listdir(directory) if directory.exists() else []
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if TMP_SUFFIX in n]


def _start_worker(workdir, num_steps, cache):
    return subprocess.Popen(
        [sys.executable, WORKER, str(workdir), str(num_steps), str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(process, condition, timeout=240):
    """SIGKILLs `process` as soon as `condition()` holds (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"worker ended before the kill point:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("kill point never reached")
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    process.stdout.close(), process.stderr.close()


# --- kill -9 -------------------------------------------------------------------------


def _kill_after_two_checkpoints(worker, checkpoints):
    _kill_when(worker, lambda: len(_step_dirs(checkpoints)[0]) >= 2)


def _kill_during_an_async_save(worker, checkpoints):
    """Kills once a step newer than the latest complete one has a temporary folder (its
    write is under way, the rename that completes it has not happened)."""

    def saving_a_newer_step():
        complete, in_progress = _step_dirs(checkpoints)
        return bool(complete) and any(int(n.split(".")[0]) > max(complete) for n in in_progress)

    _kill_when(worker, saving_a_newer_step)
    complete, in_progress = _step_dirs(checkpoints)
    if in_progress:  # the kill landed mid-write (almost always): that step must not count
        half_written = int(in_progress[0].split(".")[0])
        checkpointer = jdl.Checkpointer(checkpoints)
        assert half_written not in checkpointer.all_steps()
        assert checkpointer.latest_step() == max(complete)
        assert checkpointer.restore(_state()).step == max(complete)  # whole and readable
        checkpointer.close()
        assert not _step_dirs(checkpoints)[1]  # the leftover is cleaned up on start


def _kill_at_a_random_moment(worker, checkpoints):
    """Kills a seeded random delay after the run wrote its first new checkpoint: in a
    step, between steps or in a save."""
    before = max(_step_dirs(checkpoints)[0] or [0])
    delay = random.Random(0).uniform(0.0, 0.4)
    kill_at = []

    def random_moment():
        if not kill_at and max(_step_dirs(checkpoints)[0] or [0]) > before:
            kill_at.append(time.monotonic() + delay)
        return bool(kill_at) and time.monotonic() >= kill_at[0]

    _kill_when(worker, random_moment)


def _kill_and_resume(tmp_path, kills, num_steps=40):
    """Runs the worker, SIGKILLs it by each of `kills` in turn (restarting after each),
    lets the last restart finish, and checks it against an uninterrupted run."""
    workdir, cache = tmp_path / "run", tmp_path / "xla-cache"
    checkpoints = workdir / "checkpoints"
    for kill in kills:
        kill(_start_worker(workdir, num_steps, cache), checkpoints)
        assert (workdir / ".lock").exists()  # left behind by the killed run: stale
    worker = _start_worker(workdir, num_steps, cache)
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-3000:]
    assert f"done at step {num_steps}" in out
    assert "taking over the lock" in err  # the killed run's stale lock was taken over
    assert not (workdir / ".lock").exists()
    resumed = dict(np.load(workdir / "final_params.npz"))
    _assert_bitwise_equal(resumed, _params(_fit(None, num_steps).state))
    steps = [
        r["step"] for r in jdl.read_metrics(str(workdir / "metrics.jsonl")) if "train/loss" in r
    ]
    assert steps[-1] == num_steps


def test_sigkill_during_an_async_save_resumes_bitwise_exactly(tmp_path):
    _kill_and_resume(tmp_path, [_kill_during_an_async_save])


@pytest.mark.slow
def test_sigkill_at_several_moments_resumes_bitwise_exactly(tmp_path):
    _kill_and_resume(
        tmp_path,
        [_kill_after_two_checkpoints, _kill_during_an_async_save, _kill_at_a_random_moment],
    )


# --- corrupt and half-written checkpoints ----------------------------------------------


def _truncate_array_files(step_dir: Path):
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        os.truncate(f, f.stat().st_size // 2)


def _garble_array_files(step_dir: Path):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(bytes(b ^ 0xFF for b in f.read_bytes()))


CORRUPTIONS = {
    "truncated array files": _truncate_array_files,
    "garbled array files": _garble_array_files,
    "truncated tree metadata": lambda d: os.truncate(d / "state" / "_METADATA", 10),
    "missing tree metadata": lambda d: os.remove(d / "state" / "_METADATA"),
    "missing state": lambda d: shutil.rmtree(d / "state"),
    "truncated data position": lambda d: os.truncate(d / "manifest" / "metadata", 3),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_latest_checkpoint_falls_back_with_one_warning(tmp_path, caplog, corrupt):
    tree = {"w": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.float32)}
    checkpointer = jdl.Checkpointer(tmp_path)
    for step in (1, 2):
        checkpointer.save(step, jax.tree.map(lambda x, s=step: x * s, tree), data_state={"s": step})
    checkpointer.close()
    corrupt(tmp_path / "2")

    checkpointer = jdl.Checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="jdl.checkpoint"):
        restored = checkpointer.restore(tree)
    assert restored.step == 1 and restored.data_state == {"s": 1}
    np.testing.assert_array_equal(restored.state["w"], tree["w"])
    warnings = [r.getMessage() for r in caplog.records if r.name == "jdl.checkpoint"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"checkpoint at step 2 in {tmp_path} is unreadable" in warnings[0]
    assert "using step 1 instead" in warnings[0]
    # Set aside for inspection, so the step can be written again by the resumed run.
    assert (tmp_path / "2.corrupt").is_dir() and checkpointer.all_steps() == [1]
    checkpointer.save(2, jax.tree.map(lambda x: x * 7, tree), data_state={"s": 7})
    checkpointer.wait()
    assert checkpointer.restore(tree).data_state == {"s": 7}
    checkpointer.close()


def test_every_checkpoint_corrupt_is_one_clear_error(tmp_path):
    tree = {"w": np.zeros(10, np.float32)}
    checkpointer = jdl.Checkpointer(tmp_path)
    for step in (1, 2):
        checkpointer.save(step, tree)
    checkpointer.close()
    for step in (1, 2):
        os.remove(tmp_path / str(step) / "state" / "_METADATA")
        shutil.rmtree(tmp_path / str(step) / "manifest")
    checkpointer = jdl.Checkpointer(tmp_path)
    with pytest.raises(CheckpointCorruptError, match=r"no checkpoint in .* could be read: step 2"):
        checkpointer.restore(tree)
    assert checkpointer.all_steps() == [1, 2]  # nothing is set aside without a fallback
    checkpointer.close()


def test_fit_resumes_from_the_previous_checkpoint_when_the_latest_is_corrupt(tmp_path):
    straight = _fit(None, 12)
    _fit(tmp_path, 8)  # checkpoints at 6 and 8 are kept (max_to_keep=2)
    _truncate_array_files(tmp_path / "checkpoints" / "8")
    resumed = _fit(tmp_path, 12)
    _assert_bitwise_equal(_params(resumed.state), _params(straight.state))
    assert jdl.Checkpointer(tmp_path / "checkpoints").all_steps() == [10, 12]


def test_a_temporary_step_folder_is_never_the_latest(tmp_path):
    tree = {"w": np.ones(3, np.float32)}
    checkpointer = jdl.Checkpointer(tmp_path)
    checkpointer.save(1, tree)
    checkpointer.close()
    # A complete-looking copy under the in-progress name Orbax writes to before renaming.
    shutil.copytree(tmp_path / "1", tmp_path / f"5{TMP_SUFFIX}")
    checkpointer = jdl.Checkpointer(tmp_path)
    assert checkpointer.latest_step() == 1 and checkpointer.all_steps() == [1]
    assert checkpointer.restore(tree).step == 1
    checkpointer.close()
    assert not (tmp_path / f"5{TMP_SUFFIX}").exists()  # removed when a run starts


# --- full disk -------------------------------------------------------------------------


def test_full_disk_while_saving_stops_cleanly_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    """ENOSPC inside the asynchronous write of step 6: the run stops with one clear
    error, steps 2 and 4 stay intact, and a rerun with space resumes exactly."""
    original = ocp.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_6(self, item, directory):
        if f"{os.sep}6{TMP_SUFFIX}" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full_at_step_6)
    with pytest.raises(CheckpointWriteError) as caught:
        _fit(tmp_path, 12, max_to_keep=5)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert "checkpoint at step 6" in message and "No space left on device" in message
    assert "steps [2, 4] are intact" in message and "resume from step 4" in message
    assert not (tmp_path / ".lock").exists()  # released on the error

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", original)
    checkpointer = jdl.Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps() == [2, 4]
    checkpointer.restore(_state())
    checkpointer.close()
    resumed = _fit(tmp_path, 12, max_to_keep=5)
    _assert_bitwise_equal(_params(resumed.state), _params(_fit(None, 12).state))
    checkpointer = jdl.Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps() == [4, 6, 8, 10, 12]  # step 6 written whole this time
    checkpointer.close()


# --- two runs on one workdir -----------------------------------------------------------

_HOLD_LOCK = """
import sys, time
from jdl.lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock_in_another_process(workdir):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(workdir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_run_on_a_workdir_is_refused_then_a_dead_owner_is_taken_over(tmp_path, caplog):
    holder = _hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(
            WorkdirLockedError,
            match=rf"workdir {tmp_path} is in use by another run \(pid {holder.pid} on host "
            rf"{socket.gethostname()} since .*\): wait for it to finish",
        ):
            _fit(tmp_path, 4)
        assert not (tmp_path / "checkpoints").exists()  # refused before touching anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    owner = json.loads((tmp_path / ".lock").read_text())
    assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
    with caplog.at_level(logging.WARNING, logger="jdl.lock"):
        assert _fit(tmp_path, 4).step == 4
    assert f"left by pid {holder.pid}" in caplog.text and "that process is gone" in caplog.text
    assert not (tmp_path / ".lock").exists()


def test_a_lock_from_another_host_is_respected_with_how_to_remove_it(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "yesterday"}))
    with pytest.raises(
        WorkdirLockedError,
        match=rf"pid 1 on host elsewhere since yesterday.*if no run on elsewhere uses it any "
        rf"more, delete {lock} and start again",
    ):
        _fit(tmp_path, 2)
    assert lock.exists()


def test_lock_is_released_on_error_and_reentrant_in_one_process(tmp_path):
    with pytest.raises(ValueError, match="num_steps"):
        _fit(tmp_path, 0)
    assert not (tmp_path / ".lock").exists()
    with WorkdirLock(tmp_path):  # e.g. an experiment's main holding it around fit
        assert _fit(tmp_path, 2).step == 2
        assert (tmp_path / ".lock").exists()  # still held by the outer user
    assert not (tmp_path / ".lock").exists()


def test_only_process_zero_takes_the_lock(tmp_path, monkeypatch):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(ValueError, match="num_steps"):  # got past the lock: not refused
        _fit(tmp_path, 0)


# --- bad data --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs_name_the_array_and_first_bad_example(bad):
    data = faults_worker.blobs()
    data["x"][17, 3] = bad
    data["x"][40, 0] = np.nan
    with pytest.raises(
        NonFiniteDataError,
        match=rf"InMemoryData: array 'x' holds {bad} at example 17 \(position \(17, 3\)\)",
    ):
        jdl.InMemoryData(data, batch_size=32, seed=0)


def test_streaming_arrays_with_nonfinite_inputs_are_named_before_training():
    data = faults_worker.blobs()
    data["x"][21, 1] = np.inf
    with pytest.raises(
        NonFiniteDataError,
        match=r"StreamingData: array 'x' holds inf at example 21 \(position \(21, 1\)\)",
    ):
        jdl.StreamingData(data, batch_size=32, seed=0)


def test_dataset_rejects_nonfinite_inputs_naming_the_split():
    x = np.zeros((5, 2, 2), np.float32)
    x[3, 1, 0] = np.nan
    with pytest.raises(NonFiniteDataError, match=r"toy/train: array 'x' holds nan at example 3"):
        jdl.data.Dataset("toy", {"train": {"x": x, "y": np.zeros(5, np.int32)}}, 2, "test")
    # integer and finite arrays pass
    jdl.data.Dataset("toy", {"train": {"x": x[:3], "y": np.zeros(3, np.int32)}}, 2, "test")


# --- checkpoints of another architecture -----------------------------------------------


def test_restore_into_a_model_with_more_layers_names_the_missing_parameter(tmp_path):
    checkpointer = jdl.Checkpointer(tmp_path)
    checkpointer.save(1, _state(hidden=(32,)))
    checkpointer.wait()
    with pytest.raises(
        CheckpointMismatchError,
        match=r"step 1 in .* has no entry 'params/hidden/1/bias' \(the model expects shape "
        r"\(32,\)\); was it written by a different model\?",
    ):
        checkpointer.restore(_state(hidden=(32, 32)))
    assert checkpointer.all_steps() == [1]  # a usage error: nothing is set aside
    checkpointer.close()


def test_restore_into_a_smaller_tree_names_the_extra_entry(tmp_path):
    checkpointer = jdl.Checkpointer(tmp_path)
    checkpointer.save(1, {"encoder": {"w": np.ones((3, 2))}, "probe": {"w": np.ones((2, 5))}})
    checkpointer.wait()
    with pytest.raises(
        CheckpointMismatchError,
        match=r"has entries the model lacks, first 'probe/w' \(shape \(2, 5\)\)",
    ):
        checkpointer.restore({"encoder": {"w": np.zeros((3, 2))}})
    checkpointer.close()
