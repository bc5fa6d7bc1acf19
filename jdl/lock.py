"""One run per workdir: an exclusive lock file `WORKDIR/.lock` with a heartbeat.

Two runs writing the same checkpoints and metrics would corrupt each other's
results, so `fit` takes this lock for the whole run (in a multi-process run,
process 0 alone takes it). The lock file is created atomically (`O_EXCL`) and
holds the owner's record as one JSON line: pid, host, start time, a random
token and a `"heartbeat"` (Unix time). The owner also keeps an `flock` on the
file, which the kernel drops when the process dies, even by `kill -9`.

While a lock is held, a daemon thread rewrites the heartbeat every
`stale_after / 6` seconds; `heartbeat(workdir)` (or `WorkdirLock.heartbeat()`)
refreshes it at once. The thread stops at the last release.

A second run on the same workdir stops with `WorkdirLockedError`, unless the
lock is stale:

- a lock left by a dead process on this host is taken over at once;
- a lock whose heartbeat (for a record without one: the file's modification
  time) is older than `stale_after` seconds is taken over, whatever host wrote
  it, with one warning naming the old owner and the heartbeat's age. This is
  what lets a preempted VM's replacement, which has another hostname, resume.

A lock whose `flock` is held by a live process is always respected. Hosts that
share a workdir should keep their clocks in step (NTP), since heartbeats are
compared across them.

`stale_after` defaults to 300 seconds; set it with `WorkdirLock(workdir,
stale_after=...)` or the environment variable `JDL_LOCK_STALE_SECONDS` (the
argument wins). The contender's own setting decides when a lock is stale.

Taking the lock is the first thing a run does to its workdir, so the workdir's
problems (a file in its place, a read-only file system, a full disk) surface
here as one `WorkdirError` that keeps the errno and leaves nothing behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import socket
import threading
import time
import uuid

from jdl.config import ConfigError
from jdl.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
STALE_ENV = "JDL_LOCK_STALE_SECONDS"
DEFAULT_STALE_AFTER = 300.0
# An empty lock file younger than this may be in the middle of being written.
_FRESH_SECONDS = 2.0
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


class WorkdirLockedError(UserError, RuntimeError):
    """Another run holds the workdir's lock."""


class WorkdirError(UserError, OSError):
    """The workdir cannot be used (a file in its way, read-only, full disk); `errno` is kept."""

    def __str__(self) -> str:
        return str(self.strerror)


class _Holding:
    """This process's hold on one lock file: descriptor, use count and heartbeat thread."""

    def __init__(self, path: str, fd: int, owner: dict, stale_after: float):
        self.path = path
        self.fd = fd
        self.owner = owner
        self.count = 1
        self.interval = stale_after / 6
        self._write_lock = threading.Lock()  # the thread and `heartbeat()` both write
        self._stop = threading.Event()
        self._closed = False
        self._lost = False
        self._failing = False
        # A thread, not a refresh between training chunks: a chunk's first XLA compile
        # (or a long evaluation or checkpoint) can outlast `stale_after`, and another host
        # would then take over a live run's workdir.
        self._thread = threading.Thread(
            target=self._beat_until_stopped, name=f"jdl-lock-heartbeat {path}", daemon=True
        )
        self._thread.start()

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def beat(self) -> bool:
        """Rewrites the heartbeat now; False if the lock was lost or the write failed."""
        with self._write_lock:
            if self._closed or self._lost:
                return False
            try:
                current = _read_owner_from(self.fd)
                if current and current.get("token") != self.owner["token"]:
                    # Taken over (this process looked dead for `stale_after`): writing on
                    # would make both runs look alive. Stop, and leave the file to the new owner.
                    self._lost = True
                    log.error(
                        "lost the lock %s: pid %s on %s took it over; another run now uses this "
                        "workdir, so stop one of them",
                        self.path,
                        current.get("pid"),
                        current.get("host"),
                    )
                    return False
                self.owner["heartbeat"] = round(time.time(), 3)
                _write_record(self.fd, self.owner)
            except OSError as error:
                # A transient full disk or I/O error: the file and the flock are still there,
                # so keep holding and try again at the next beat.
                if not self._failing:
                    log.warning(
                        "could not refresh the heartbeat of the lock %s (%s); still holding it, "
                        "trying again every %g s",
                        self.path,
                        os.strerror(error.errno) if error.errno else error,
                        self.interval,
                    )
                self._failing = True
                return False
            if self._failing:
                log.warning("the heartbeat of the lock %s is written again", self.path)
                self._failing = False
            return True

    def close(self) -> None:
        """Stops the thread, removes the file unless it was taken over, drops the flock."""
        self._stop.set()
        self._thread.join()
        with self._write_lock:
            self._closed = True
            current = _read_owner_from(self.fd)
            ours = not current or current.get("token") == self.owner["token"]
            # Unlink while still holding the flock, so that nobody takes over a file that is
            # about to disappear (see _take_over_if_stale's inode check).
            if ours and _same_file(self.fd, self.path):
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            os.close(self.fd)


# Locks held by this process, by path: `fit` inside a caller that already holds the
# workdir's lock (e.g. an experiment's main) reuses it.
_held: dict[str, _Holding] = {}
_held_lock = threading.RLock()


def heartbeat(workdir: str | os.PathLike) -> bool:
    """Refreshes the heartbeat of `workdir`'s lock now if this process holds it.

    Returns:
      True if it was written; False if this process does not hold the lock, lost it
      to a take-over, or the write failed (the lock is still held then).
    """
    path = os.path.join(os.path.abspath(os.fspath(workdir)), LOCK_NAME)
    with _held_lock:
        holding = _held.get(path)
    return holding.beat() if holding is not None else False


class WorkdirLock:
    """The lock on one run directory. Use as a context manager or acquire()/release().

    Re-entrant within a process: acquiring a lock this process already holds only
    counts up, and the file goes at the matching last release.

    Args:
      workdir: the run directory (created if missing).
      stale_after: seconds without a heartbeat after which someone else's lock is
        taken over; None reads `JDL_LOCK_STALE_SECONDS`, else 300. It also sets the
        heartbeat period of a lock this object takes (`stale_after / 6`).

    Raises:
      ConfigError: `stale_after` (or the environment variable) is not a positive number.
    """

    def __init__(self, workdir: str | os.PathLike, stale_after: float | None = None):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.stale_after = _stale_after(stale_after)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock and starts its heartbeat.

        Raises:
          WorkdirLockedError: a live process holds it (its flock, or a heartbeat younger
            than `stale_after`); the message names the owner and what to do.
          WorkdirError: the workdir cannot be created or written (a file in its way,
            read-only, disk full); nothing is left behind.
        """
        with _held_lock:
            if self.path in _held:
                _held[self.path].count += 1
                return
            self._make_workdir()
            for _ in range(100):  # retries follow a concurrent release, creation or take-over
                taken = self._create()
                if taken is None:
                    taken = self._take_over_if_stale()
                if taken is not None:
                    fd, owner = taken
                    _held[self.path] = _Holding(self.path, fd, owner, self.stale_after)
                    return
                time.sleep(0.05)
        raise WorkdirLockedError(f"could not take the lock {self.path}: it keeps changing")

    def release(self) -> None:
        """Gives the lock back: at the last matching release, stops the heartbeat and
        removes the file (unless another run took it over meanwhile)."""
        with _held_lock:
            holding = _held.get(self.path)
            if holding is None:
                return
            holding.count -= 1
            if holding.count > 0:
                return
            del _held[self.path]
            holding.close()

    def heartbeat(self) -> bool:
        """Refreshes the heartbeat now if this process holds the lock (see `heartbeat`)."""
        return heartbeat(self.workdir)

    def _make_workdir(self) -> None:
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as error:
            raise self._error(error, "create") from None

    def _create(self) -> tuple[int, dict] | None:
        """Creates the lock file if absent; returns its descriptor and owner record, or
        None if it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return None
        except OSError as error:
            raise self._error(error, "create the lock file in") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process grabbed the brand-new file first: let it win
            os.close(fd)
            return None
        return fd, self._claim(fd)

    def _take_over_if_stale(self) -> tuple[int, dict] | None:
        """Takes an existing lock whose owner is gone; raises if the owner may be alive."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None  # released meanwhile: try to create it again
        except OSError as error:
            raise self._error(error, "open the lock file in") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            try:
                owner, mtime = _read_owner_from(fd), os.fstat(fd).st_mtime
            finally:
                os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise self._error(error, "lock the lock file in") from None
            raise WorkdirLockedError(self._busy_message(owner, mtime)) from None
        try:
            if not _same_file(fd, self.path):
                os.close(fd)  # released and re-created meanwhile: start over
                return None
            owner = _read_owner_from(fd)
            mtime = os.fstat(fd).st_mtime
            if not owner and time.time() - mtime < _FRESH_SECONDS:
                os.close(fd)  # probably being created right now: look again shortly
                return None
            pid, host = owner.get("pid"), owner.get("host")
            here = host == socket.gethostname()
            # Our own pid without the flock is an earlier process that had this pid (a
            # restarted container keeps its hostname and often its pids).
            if not owner or (here and (pid == os.getpid() or not _pid_alive(pid))):
                log.warning(
                    "taking over the lock %s left by pid %s on %s (that process is gone)",
                    self.path,
                    pid,
                    host,
                )
            else:
                age = time.time() - _heartbeat_time(owner, mtime)
                if age <= self.stale_after:
                    # Another host's process cannot be checked from here; a live pid on
                    # this host without the flock did not take the lock properly.
                    raise WorkdirLockedError(self._busy_message(owner, mtime))
                log.warning(
                    "taking over the lock %s left by pid %s on %s: its heartbeat is %.1f s "
                    "old, over the %g s limit",
                    self.path,
                    pid,
                    host,
                    age,
                    self.stale_after,
                )
        except BaseException:
            _close_quietly(fd)
            raise
        return fd, self._claim(fd)  # closes `fd` itself if it fails

    def _claim(self, fd: int) -> dict:
        """Writes this process's owner record into the flocked lock file `fd`. On failure
        removes the file and closes `fd`, so that nothing is left behind."""
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime(_TIME_FORMAT),
            "heartbeat": round(time.time(), 3),
            "token": uuid.uuid4().hex,
        }
        try:
            _write_record(fd, owner)
        except OSError as error:
            try:
                if _same_file(fd, self.path):
                    os.unlink(self.path)
            except OSError:
                pass
            _close_quietly(fd)
            raise self._error(error, "write the lock file in") from None
        return owner

    def _error(self, error: OSError, doing: str) -> WorkdirError:
        """The one-line `WorkdirError` for an OSError met while `doing` the workdir."""
        code = error.errno
        if code in (errno.EEXIST, errno.ENOTDIR):
            blocker = _first_non_directory(self.workdir)
            if blocker is not None:
                return WorkdirError(
                    code,
                    f"cannot use workdir {self.workdir}: {blocker} is a file, not a directory; "
                    "move that file away or choose another workdir",
                )
        reason = os.strerror(code) if code else str(error)
        if code in (errno.ENOSPC, errno.EDQUOT):
            advice = "free some space (or choose a workdir on another disk) and start again"
        elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
            advice = "choose a workdir on a writable file system this user may write to"
        elif code == errno.EISDIR:
            advice = f"remove the directory {self.path} and start again"
        else:
            advice = "check that file system and start again"
        return WorkdirError(code, f"cannot {doing} workdir {self.workdir}: {reason}; {advice}")

    def _busy_message(self, owner: dict, mtime: float) -> str:
        who = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"
        since = f" since {owner['started']}" if "started" in owner else ""
        if owner.get("host") == socket.gethostname():
            advice = "wait for it to finish, stop it, or use another workdir"
            return f"workdir {self.workdir} is in use by another run ({who}{since}): {advice}"
        seen = _heartbeat_time(owner, mtime)
        age = max(0.0, time.time() - seen)
        at = time.strftime(_TIME_FORMAT, time.localtime(seen + self.stale_after))
        return (
            f"workdir {self.workdir} is in use by another run ({who}{since}; heartbeat last "
            f"seen {age:.0f} s ago): if its heartbeat stops, it is taken over "
            f"{self.stale_after:g} s after the last one, at {at} (in "
            f"{max(0.0, self.stale_after - age):.0f} s); if no run on "
            f"{owner.get('host', 'that host')} uses it any more, delete {self.path} and "
            "start again; otherwise use another workdir"
        )


def _stale_after(value: float | None) -> float:
    source = "stale_after"
    if value is None:
        text = os.environ.get(STALE_ENV)
        if text is None or not text.strip():
            return DEFAULT_STALE_AFTER
        source = STALE_ENV
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(
            f"{source} must be a positive number of seconds, got {value!r}; "
            f"set it to e.g. {DEFAULT_STALE_AFTER:g}"
        )
    if math.isinf(value):
        raise ConfigError(f"{source} must be finite, got {value!r}; set it to e.g. 300")
    return float(value)


def _write_record(fd: int, owner: dict) -> None:
    """Overwrites the record in place: written first, then cut to length, so that a reader
    never sees an empty file (trailing leftovers are ignored by `_parse_owner`)."""
    data = (json.dumps(owner) + "\n").encode()
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], written)
    os.ftruncate(fd, len(data))
    os.fsync(fd)


def _read_owner_from(fd: int) -> dict:
    try:
        return _parse_owner(os.pread(fd, 4096, 0).decode(errors="replace"))
    except OSError:
        return {}


def _parse_owner(text: str) -> dict:
    try:
        owner, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return {}  # half-written by a process killed while creating it
    return owner if isinstance(owner, dict) else {}


def _heartbeat_time(owner: dict, mtime: float) -> float:
    """When the owner last showed it was alive: its heartbeat, else the file's mtime."""
    beat = owner.get("heartbeat")
    if isinstance(beat, (int, float)) and not isinstance(beat, bool) and math.isfinite(beat):
        return float(beat)
    return mtime


def _first_non_directory(path: str) -> str | None:
    """The deepest existing path on the way to `path`, if it is not a directory."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True
