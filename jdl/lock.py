"""One run per workdir: an exclusive lock file `WORKDIR/.lock`.

Two runs writing the same checkpoints and metrics would corrupt each other's
results, so `fit` takes this lock for the whole run (in a multi-process run,
process 0 alone takes it). The lock file is created atomically (`O_EXCL`) and
holds the owner's pid, host and start time as JSON; the owner also keeps an
`flock` on it, which the kernel drops when the process dies, even by `kill -9`.

A second run on the same workdir stops with `WorkdirLockedError`. A lock left
by a dead process on this host is taken over (with a warning). A lock written
by another host is respected, since its process cannot be checked from here;
the message says how to remove it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

from jdl.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# An empty lock file younger than this may be in the middle of being written.
_FRESH_SECONDS = 2.0

# Locks held by this process, by path, with a use count: `fit` inside a caller that
# already holds the workdir's lock (e.g. an experiment's main) reuses it.
_held: dict[str, tuple[int, int]] = {}  # path -> (file descriptor, count)


class WorkdirLockedError(UserError, RuntimeError):
    """Another run holds the workdir's lock."""


class WorkdirLock:
    """The lock on one run directory. Use as a context manager or acquire()/release().

    Re-entrant within a process: acquiring a lock this process already holds only
    counts up, and the file goes at the matching last release.

    Args:
      workdir: the run directory (created if missing).
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, LOCK_NAME)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock.

        Raises:
          WorkdirLockedError: a live process on this host, or any process on another
            host, holds it; the message names the owner and what to do.
        """
        if self.path in _held:
            fd, count = _held[self.path]
            _held[self.path] = (fd, count + 1)
            return
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(100):  # retries follow a concurrent release, creation or take-over
            fd = self._create()
            if fd is None:
                fd = self._take_over_if_stale()
            if fd is not None:
                _held[self.path] = (fd, 1)
                return
            time.sleep(0.05)
        raise WorkdirLockedError(f"could not take the lock {self.path}: it keeps changing")

    def release(self) -> None:
        """Gives the lock back (removes the file at the last matching release)."""
        if self.path not in _held:
            return
        fd, count = _held.pop(self.path)
        if count > 1:
            _held[self.path] = (fd, count - 1)
            return
        # Unlink while still holding the flock, so that nobody takes over a file that is
        # about to disappear (see _take_over_if_stale's inode check).
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(fd)

    def _create(self) -> int | None:
        """Creates the lock file if absent; returns its descriptor, or None if it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process grabbed the brand-new file first: let it win
            os.close(fd)
            return None
        self._write_owner(fd)
        return fd

    def _take_over_if_stale(self) -> int | None:
        """Takes an existing lock whose owner is gone; raises if the owner may be alive."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None  # released meanwhile: try to create it again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise WorkdirLockedError(self._busy_message(self._read_owner())) from None
        try:
            if not _same_file(fd, self.path):
                os.close(fd)  # released and re-created meanwhile: start over
                return None
            owner = self._read_owner_from(fd)
            if not owner and time.time() - os.fstat(fd).st_mtime < _FRESH_SECONDS:
                os.close(fd)  # probably being created right now: look again shortly
                return None
            on_other_host = owner and owner.get("host") != socket.gethostname()
            if on_other_host or (owner and _pid_alive(owner.get("pid"))):
                # Another host's process cannot be checked from here; a live pid on this
                # host without the flock is a process that did not take the lock properly.
                raise WorkdirLockedError(self._busy_message(owner))
            log.warning(
                "taking over the lock %s left by pid %s on %s (that process is gone)",
                self.path,
                owner.get("pid"),
                owner.get("host"),
            )
            self._write_owner(fd)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _write_owner(self, fd: int) -> None:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)

    def _read_owner(self) -> dict:
        try:
            with open(self.path) as f:
                return _parse_owner(f.read())
        except OSError:
            return {}

    @staticmethod
    def _read_owner_from(fd: int) -> dict:
        return _parse_owner(os.pread(fd, 4096, 0).decode(errors="replace"))

    def _busy_message(self, owner: dict) -> str:
        who = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"
        since = f" since {owner['started']}" if "started" in owner else ""
        if owner.get("host") == socket.gethostname():
            advice = "wait for it to finish, stop it, or use another workdir"
        else:
            advice = (
                f"if no run on {owner.get('host', 'that host')} uses it any more, delete "
                f"{self.path} and start again; otherwise use another workdir"
            )
        return f"workdir {self.workdir} is in use by another run ({who}{since}): {advice}"


def _parse_owner(text: str) -> dict:
    try:
        owner = json.loads(text)
    except ValueError:
        return {}  # half-written by a process killed while creating it
    return owner if isinstance(owner, dict) else {}


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


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
