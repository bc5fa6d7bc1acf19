"""The workdir lock: heartbeat, take-over of stale locks from any host, and the workdir's
own problems (a file in its way, read-only, full disk) as one clear error."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from jdl.config import ConfigError
from jdl.errors import UserError
from jdl.lock import STALE_ENV, WorkdirError, WorkdirLock, WorkdirLockedError, heartbeat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Holds the lock until killed; argv[2], if set, is the host name it claims to run on.
_HOLD_LOCK = """
import socket, sys, time
if sys.argv[2]:
    socket.gethostname = lambda: sys.argv[2]
from jdl.lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock_in_another_process(workdir, stale_seconds, host=""):
    env = dict(os.environ, **{STALE_ENV: stale_seconds})
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(workdir), host],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _kill(holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()


def _record(workdir) -> dict:
    # As jdl reads it: a heartbeat rewrites the record in place and cuts it to length
    # after, so a read in between may see leftovers after the JSON object.
    return json.JSONDecoder().raw_decode((workdir / ".lock").read_text())[0]


def _write_record(workdir, **owner):
    (workdir / ".lock").write_text(json.dumps(owner) + "\n")


def _lock_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "jdl.lock"]


def _heartbeat_threads():
    return [t for t in threading.enumerate() if t.name.startswith("jdl-lock-heartbeat")]


def _open_fds():
    return set(os.listdir("/proc/self/fd"))


def _wait_for(condition, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --- heartbeat and stale take-over -----------------------------------------------------


@pytest.mark.parametrize("with_heartbeat", [True, False], ids=["heartbeat", "old-record-mtime"])
def test_another_hosts_lock_with_an_old_heartbeat_is_taken_over_with_one_warning(
    tmp_path, caplog, with_heartbeat
):
    old = time.time() - 400
    if with_heartbeat:
        _write_record(tmp_path, pid=4242, host="preempted-vm", started="then", heartbeat=old)
    else:  # a record of an earlier version: its age is the file's
        _write_record(tmp_path, pid=4242, host="preempted-vm", started="then")
        os.utime(tmp_path / ".lock", (old, old))
    with caplog.at_level(logging.WARNING, logger="jdl.lock"), WorkdirLock(tmp_path):
        owner = _record(tmp_path)
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert owner["heartbeat"] >= old + 400 - 1
    (warning,) = _lock_warnings(caplog)
    assert re.search(
        r"taking over the lock .* left by pid 4242 on preempted-vm: its heartbeat is "
        r"4\d\d\.\d s old, over the 300 s limit",
        warning,
    )
    assert not (tmp_path / ".lock").exists()


def test_a_fresh_lock_from_another_host_is_busy_and_says_when_it_is_taken_over(tmp_path):
    _write_record(tmp_path, pid=4242, host="elsewhere", started="then", heartbeat=time.time() - 10)
    with pytest.raises(
        WorkdirLockedError,
        match=r"\(pid 4242 on host elsewhere since then; heartbeat last seen 10 s ago\): if its "
        r"heartbeat stops, it is taken over 300 s after the last one, at .* \(in 290 s\); "
        r"if no run on elsewhere uses it any more, delete .*\.lock and start again",
    ) as caught:
        WorkdirLock(tmp_path).acquire()
    assert "\n" not in str(caught.value)
    assert _record(tmp_path)["pid"] == 4242  # untouched


def test_stale_after_comes_from_the_argument_or_the_environment(tmp_path, monkeypatch, caplog):
    _write_record(tmp_path, pid=4242, host="elsewhere", heartbeat=time.time() - 20)
    monkeypatch.delenv(STALE_ENV, raising=False)
    with pytest.raises(WorkdirLockedError, match=r"in 280 s"):
        WorkdirLock(tmp_path).acquire()  # the default: 300 s
    monkeypatch.setenv(STALE_ENV, "10")
    with pytest.raises(WorkdirLockedError, match=r"in 40 s"):
        WorkdirLock(tmp_path, stale_after=60).acquire()  # the argument wins
    with caplog.at_level(logging.WARNING, logger="jdl.lock"), WorkdirLock(tmp_path):
        assert _record(tmp_path)["pid"] == os.getpid()  # 20 s > 10 s: taken over
    assert "over the 10 s limit" in _lock_warnings(caplog)[0]
    for bad in ("soon", "0", "-5", "inf"):
        monkeypatch.setenv(STALE_ENV, bad)
        with pytest.raises(ConfigError, match=STALE_ENV):
            WorkdirLock(tmp_path)
    with pytest.raises(ConfigError, match="stale_after must be a positive number"):
        WorkdirLock(tmp_path, stale_after=0)


def test_a_live_holder_keeps_its_heartbeat_fresh_then_is_taken_over_when_killed(
    tmp_path, monkeypatch, caplog
):
    # The holder claims to run on a VM that is later preempted; it beats every 0.1 s.
    holder = _hold_lock_in_another_process(tmp_path, "0.6", host="preempted-vm")
    contender = WorkdirLock(tmp_path, stale_after=1.5)
    try:
        # A file system whose flocks do not reach across hosts: only the heartbeat shows
        # the contender that the holder is alive.
        monkeypatch.setattr(fcntl, "flock", lambda fd, operation: None)
        first = _record(tmp_path)["heartbeat"]
        beats = [first]
        # Watch for more than twice the contender's limit: without fresh heartbeats the
        # holder's first one would have gone stale meanwhile.
        while beats[-1] - first < 2 * contender.stale_after:
            with pytest.raises(WorkdirLockedError, match="pid .* on host preempted-vm"):
                contender.acquire()
            beat = _record(tmp_path)["heartbeat"]
            if beat != beats[-1]:
                beats.append(beat)
            assert holder.poll() is None
        assert beats == sorted(beats) and len(beats) > 6  # refreshed again and again
    finally:
        _kill(holder)
    last = _record(tmp_path)
    assert last["pid"] == holder.pid and last["host"] == "preempted-vm"
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="jdl.lock"):
        _wait_for(lambda: _try_acquire(contender), "the take-over of the stale lock")
    try:
        taken = _record(tmp_path)
        assert taken["pid"] == os.getpid()
        # Only once stale. Heartbeats are written to the millisecond, so the two records
        # can be exactly `stale_after` apart (or a millisecond less) when the take-over
        # came at the first moment it was allowed.
        assert taken["heartbeat"] - last["heartbeat"] >= contender.stale_after - 1e-3
        (warning,) = _lock_warnings(caplog)
        assert f"left by pid {holder.pid} on preempted-vm: its heartbeat is" in warning
    finally:
        contender.release()
    assert not (tmp_path / ".lock").exists()


def _try_acquire(lock) -> bool:
    try:
        lock.acquire()
    except WorkdirLockedError:
        return False
    return True


def test_a_live_holder_on_this_host_is_busy_whatever_its_heartbeat_and_taken_over_once_dead(
    tmp_path, caplog
):
    holder = _hold_lock_in_another_process(tmp_path, "3600")  # no beat during this test
    try:
        owner = _record(tmp_path)
        _write_record(tmp_path, **dict(owner, heartbeat=0.0))  # long stale, but flocked
        with pytest.raises(WorkdirLockedError, match=rf"pid {holder.pid} .*wait for it to finish"):
            WorkdirLock(tmp_path, stale_after=1).acquire()
    finally:
        _kill(holder)
    _write_record(tmp_path, **dict(owner, heartbeat=time.time()))  # fresh, but its pid is dead
    with caplog.at_level(logging.WARNING, logger="jdl.lock"):
        with WorkdirLock(tmp_path):  # at once, without waiting for 300 s
            assert _record(tmp_path)["pid"] == os.getpid()
    (warning,) = _lock_warnings(caplog)
    assert f"left by pid {holder.pid}" in warning and "that process is gone" in warning


def test_a_record_with_this_process_pid_is_from_an_earlier_process_and_taken_over(tmp_path, caplog):
    # A restarted container keeps its hostname and often its pids.
    _write_record(tmp_path, pid=os.getpid(), host=socket.gethostname(), heartbeat=time.time())
    with caplog.at_level(logging.WARNING, logger="jdl.lock"), WorkdirLock(tmp_path):
        assert "token" in _record(tmp_path)
    (warning,) = _lock_warnings(caplog)
    assert "that process is gone" in warning


def test_heartbeat_refreshes_at_once_only_where_this_process_holds_the_lock(tmp_path):
    assert heartbeat(tmp_path) is False
    with WorkdirLock(tmp_path, stale_after=3600) as lock:  # the thread waits 600 s
        before = _record(tmp_path)
        _wait_for(lambda: time.time() > before["heartbeat"] + 0.01, "the clock to move")
        assert lock.heartbeat() is True
        middle = _record(tmp_path)
        assert middle["heartbeat"] > before["heartbeat"]
        assert heartbeat(str(tmp_path)) is True
        assert _record(tmp_path)["heartbeat"] >= middle["heartbeat"]
        assert {k: v for k, v in middle.items() if k != "heartbeat"} == {
            k: v for k, v in before.items() if k != "heartbeat"
        }
    assert heartbeat(tmp_path) is False and lock.heartbeat() is False


def test_one_heartbeat_thread_per_held_lock_beats_and_stops_at_release(tmp_path):
    fds = _open_fds()
    with WorkdirLock(tmp_path, stale_after=0.3):  # beats every 0.05 s
        with WorkdirLock(tmp_path):  # re-entrant: the same hold, the same thread
            assert len(_heartbeat_threads()) == 1
        assert (tmp_path / ".lock").exists() and len(_heartbeat_threads()) == 1
        first = _record(tmp_path)["heartbeat"]
        _wait_for(lambda: _record(tmp_path)["heartbeat"] > first, "a beat from the thread")
    assert _heartbeat_threads() == []
    assert not (tmp_path / ".lock").exists()
    assert _open_fds() == fds  # the flock went with its descriptor


def test_the_heartbeat_survives_a_transient_full_disk(tmp_path, monkeypatch, caplog):
    real_pwrite = os.pwrite
    failures = []

    def full_five_times(fd, data, offset):
        if len(failures) < 5:
            failures.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    with caplog.at_level(logging.WARNING, logger="jdl.lock"):
        with WorkdirLock(tmp_path, stale_after=0.3):
            owner = _record(tmp_path)
            monkeypatch.setattr(os, "pwrite", full_five_times)
            _wait_for(lambda: len(failures) == 5, "five failed beats")
            assert _record(tmp_path) == owner  # still there, still ours
            _wait_for(lambda: _record(tmp_path)["heartbeat"] > owner["heartbeat"], "a beat")
            assert _record(tmp_path)["token"] == owner["token"]
    warnings = _lock_warnings(caplog)
    assert len(warnings) == 2, warnings  # once when it fails, once when it works again
    assert "could not refresh the heartbeat" in warnings[0]
    assert "No space left on device" in warnings[0] and "still holding it" in warnings[0]
    assert "written again" in warnings[1]
    assert not (tmp_path / ".lock").exists()


def test_a_lock_taken_over_meanwhile_is_left_to_its_new_owner(tmp_path, caplog):
    lock = WorkdirLock(tmp_path, stale_after=3600)
    lock.acquire()
    newer = {"pid": 4242, "host": "elsewhere", "heartbeat": time.time(), "token": "theirs"}
    try:
        # What a take-over from another host looks like here: the same file, their record.
        _write_record(tmp_path, **newer)
        with caplog.at_level(logging.ERROR, logger="jdl.lock"):
            assert lock.heartbeat() is False
        assert _record(tmp_path) == newer  # not overwritten with ours
    finally:
        lock.release()
    assert _record(tmp_path) == newer  # nor removed
    (error,) = _lock_warnings(caplog)
    assert "lost the lock" in error and "pid 4242 on elsewhere" in error


# --- the workdir's own problems --------------------------------------------------------


@pytest.mark.parametrize("below", ["", "sub/run"], ids=["workdir", "parent"])
def test_a_file_in_place_of_the_workdir_is_one_clear_error(tmp_path, below):
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    workdir = blocker / below if below else blocker
    expected = rf"{blocker} is a file, not a directory; move"
    with pytest.raises(WorkdirError, match=expected) as caught:
        WorkdirLock(workdir).acquire()
    assert isinstance(caught.value, UserError) and isinstance(caught.value, OSError)
    assert caught.value.errno in (errno.EEXIST, errno.ENOTDIR)
    assert "\n" not in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == ["run"] and blocker.read_text() == "not a directory"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("where", ["lock-file", "directory"])
def test_a_read_only_workdir_is_one_clear_error(tmp_path, monkeypatch, code, where):
    # Tests run as root, whom chmod does not stop: the file system's answer is simulated.
    workdir = tmp_path / "run"
    if where == "lock-file":
        workdir.mkdir()
        real_open = os.open

        def read_only_open(path, flags, *args, **kwargs):
            if os.fspath(path).endswith(".lock") and flags & os.O_CREAT:
                raise OSError(code, os.strerror(code), path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only_open)
    else:

        def read_only_makedirs(path, *args, **kwargs):
            raise OSError(code, os.strerror(code), path)

        monkeypatch.setattr(os, "makedirs", read_only_makedirs)
    with pytest.raises(WorkdirError, match=re.escape(os.strerror(code))) as caught:
        WorkdirLock(workdir).acquire()
    assert caught.value.errno == code and isinstance(caught.value, UserError)
    assert f"workdir {workdir}" in str(caught.value) and "choose a workdir on a writable" in str(
        caught.value
    )
    assert "\n" not in str(caught.value)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == (["run"] if where == "lock-file" else [])
    assert not os.path.exists(workdir / ".lock")


@pytest.mark.parametrize("call", ["pwrite", "fsync"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "take-over"])
def test_a_full_disk_at_start_leaves_nothing_behind(tmp_path, monkeypatch, call, existing):
    if existing:  # a dead run's lock to take over
        _write_record(tmp_path, pid=4242, host="elsewhere", heartbeat=time.time() - 400)
    fds = _open_fds()

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, call, disk_full)
    with pytest.raises(WorkdirError, match="No space left on device; free some space") as caught:
        WorkdirLock(tmp_path).acquire()
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, UserError)
    assert f"cannot write the lock file in workdir {tmp_path}" in str(caught.value)
    assert os.listdir(tmp_path) == []  # no empty lock file left behind
    assert _open_fds() == fds and _heartbeat_threads() == []  # flock released, no thread
    with WorkdirLock(tmp_path):  # with space again, the next run starts
        assert _record(tmp_path)["pid"] == os.getpid()
