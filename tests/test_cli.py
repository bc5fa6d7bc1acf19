"""The command-line edge: one `error:` line for the user's mistakes, tracebacks for bugs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from jdl.cli import command, error_line, is_user_error, run_main
from jdl.config import ConfigError
from jdl.errors import UserError

# A command whose behaviour the first argument picks; run as a real process.
SCRIPT = textwrap.dedent(
    """
    import errno, sys
    from jdl.cli import command
    from jdl.config import ConfigError

    class Preempted(SystemExit):
        pass

    @command
    def main(argv):
        mode = argv[0]
        if mode == "user":
            raise ConfigError("config.width=0 must be >= 1\\n(second line of the message)")
        if mode == "disk":
            raise OSError(errno.ENOSPC, "No space left on device", "/full/disk/ckpt")
        if mode == "missing":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere")
        if mode == "bug":
            raise RuntimeError("an internal bug")
        if mode == "preempted":
            print("stopped by SIGTERM at step 7; checkpoint saved", file=sys.stderr)
            raise Preempted(143)
        print("ok", argv)

    if __name__ == "__main__":
        main()
    """
)


def run_script(tmp_path, *args, env=None):
    path = tmp_path / "entry.py"
    path.write_text(SCRIPT)
    environment = {k: v for k, v in os.environ.items() if k != "JDL_DEBUG"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )


def test_user_error_is_one_line_and_status_1(tmp_path):
    result = run_script(tmp_path, "user")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: config.width=0 must be >= 1 (second line of the message)"
    ]
    assert result.stdout == ""


def test_disk_full_is_one_line_naming_the_path(tmp_path):
    result = run_script(tmp_path, "disk")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: /full/disk/ckpt: No space left")
    assert "free some space" in lines[0]


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_the_traceback_and_still_ends_with_the_error_line(tmp_path, how):
    if how == "env":
        result = run_script(tmp_path, "user", env={"JDL_DEBUG": "1"})
    else:
        result = run_script(tmp_path, "user", "--debug")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConfigError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: config.width=0 must be >= 1")


def test_debug_flag_is_removed_from_argv(tmp_path):
    result = run_script(tmp_path, "fine", "--debug", "--config.x=1")
    assert result.returncode == 0
    assert result.stdout.strip() == "ok ['fine', '--config.x=1']"


@pytest.mark.parametrize("mode", ["bug", "missing"])
def test_bugs_keep_their_traceback(tmp_path, mode):
    result = run_script(tmp_path, mode)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert not any(line.startswith("error:") for line in result.stderr.splitlines())


def test_system_exit_passes_through_untouched(tmp_path):
    result = run_script(tmp_path, "preempted")
    assert result.returncode == 143
    assert result.stderr.splitlines() == ["stopped by SIGTERM at step 7; checkpoint saved"]


def test_in_process_callers_get_system_exit_with_the_line():
    @command
    def main(argv):
        raise ConfigError(f"bad {argv}")

    with pytest.raises(SystemExit) as info:
        main(["x", "--debug"])
    assert info.value.code == "error: bad ['x']"
    with pytest.raises(SystemExit, match="error: bad"):
        run_main(main, ["y"])


@pytest.mark.parametrize(
    "error, expected",
    [
        (ConfigError("a"), True),
        (UserError("b"), True),
        (OSError(errno.ENOSPC, "full"), True),
        (OSError(errno.EROFS, "read-only"), True),
        (PermissionError(errno.EACCES, "denied"), True),
        (NotADirectoryError(errno.ENOTDIR, "not a dir"), True),
        (IsADirectoryError(errno.EISDIR, "is a dir"), True),
        (FileNotFoundError(errno.ENOENT, "missing"), False),
        (ValueError("bug"), False),
    ],
)
def test_which_errors_are_the_users(error, expected):
    assert is_user_error(error) is expected


def test_error_line_of_an_os_error_names_path_cause_and_remedy():
    line = error_line(OSError(errno.EROFS, "Read-only file system", "/ro/run"))
    assert line == (
        "error: /ro/run: Read-only file system (the file system is read-only; "
        "choose another --workdir)"
    )


def test_ctrl_c_outside_training_is_one_line_and_status_130(capsys):
    @command
    def main(argv):
        raise KeyboardInterrupt  # e.g. while the data loads: fit has not started

    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted; nothing was being trained, nothing to save"
    ]
