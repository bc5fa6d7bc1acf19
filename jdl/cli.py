"""The command-line edge: one `error:` line for the user's mistakes, a traceback for bugs.

Every experiment's entry point is wrapped by `command`:

    @jdl.cli.command
    def main(argv=None):
        ...

    if __name__ == "__main__":
        main()

A `jdl.errors.UserError` (a bad config value, data that does not fit, a checkpoint of
another model, a busy workdir, ...) and an `OSError` that the environment causes (a full
disk, a read-only or missing directory, a file where a directory should be) end the
command with exactly one line, `error: <message>`, on stderr and exit status 1. The full
traceback is printed as well when `JDL_DEBUG=1` is set or `--debug` is on the command
line. Every other exception is a bug and keeps its traceback. `SystemExit` passes
through untouched: `fit` raises one with status 143 or 130 after a preemption signal,
having printed its own line, and `--help` exits with 0.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from jdl.errors import UserError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "JDL_DEBUG"

# OSErrors whose cause is the machine or the paths the user chose, not jdl.
USER_ERRNOS = {
    errno.ENOSPC: "free some space or choose another --workdir",
    errno.EDQUOT: "free some space or choose another --workdir",
    errno.EROFS: "the file system is read-only; choose another --workdir",
    errno.EACCES: "check the permissions or choose another --workdir",
    errno.EPERM: "check the permissions or choose another --workdir",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "a directory is in the way of a file; choose another path",
}


def is_user_error(error: BaseException) -> bool:
    """True for a `UserError` or an `OSError` with an errno of `USER_ERRNOS`."""
    if isinstance(error, UserError):
        return True
    return isinstance(error, OSError) and error.errno in USER_ERRNOS


def error_line(error: BaseException) -> str:
    """`error: <message>` on one line; an OSError names the path, the cause and the fix."""
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.errno:
        path = error.filename if error.filename is not None else ""
        message = f"{error.strerror or os.strerror(error.errno)}"
        if path:
            message = f"{path}: {message}"
        hint = USER_ERRNOS.get(error.errno)
        if hint:
            message += f" ({hint})"
    else:
        message = str(error) or type(error).__name__
    return "error: " + " ".join(message.split())  # one line, whatever the message held


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """True when `JDL_DEBUG` is set to a true value or `--debug` is among `argv`."""
    flag = os.environ.get(DEBUG_ENV, "").strip().lower()
    return flag in ("1", "true", "yes", "on") or DEBUG_FLAG in argv


def command(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps an entry point `main(argv)`: the user's mistakes become one `error:` line.

    The wrapped function takes `argv=None` (meaning `sys.argv[1:]`), drops `--debug` from
    it and calls `main(argv)`. A user error (see `is_user_error`) is raised again as
    `SystemExit("error: <message>")`, which Python prints as that one line on stderr with
    exit status 1; callers in Python (tests, notebooks) can catch it. With `JDL_DEBUG=1` or
    `--debug` the traceback is printed first. Ctrl-C outside training (while data loads,
    say) prints one line and exits with 130. Any other exception, and `SystemExit`, passes
    through unchanged.
    """

    @functools.wraps(main)
    def entry_point(argv: Sequence[str] | None = None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = debug_requested(argv)
        try:
            return main([arg for arg in argv if arg != DEBUG_FLAG])
        except KeyboardInterrupt:
            if debug:
                raise
            # Ctrl-C before training started (or after it ended): nothing to save. Inside
            # training `fit` handles SIGINT itself, saves and exits with 130.
            print("interrupted; nothing was being trained, nothing to save", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as error:
            if not is_user_error(error):
                raise
            if debug:
                traceback.print_exc()
                sys.stderr.flush()
            raise SystemExit(error_line(error)) from None

    entry_point.__wrapped_command__ = main
    return entry_point


def run_main(main: Callable[..., Any], argv: Sequence[str] | None = None) -> Any:
    """Calls `main(argv)` under `command`'s error handling (for `if __name__ == "__main__"`)."""
    inner = getattr(main, "__wrapped_command__", main)
    return command(inner)(argv)
