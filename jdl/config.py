"""Configs at the edge: command-line overrides, durations, run records, the compile cache.

Experiments define `get_config(arg=None) -> ml_collections.ConfigDict`. The
command line is read once, here, before anything compiles:

    python -m experiments.NAME [--config=ARG] [--config.key=value ...] [--workdir DIR]

Every override is checked against the default config: an unknown key or a
value of the wrong type is one `ConfigError` that names the valid keys.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import ml_collections

from jdl.errors import UserError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(UserError, ValueError):
    """A bad command line or config value. The message says what to change."""


def parse_command_line(
    argv: Sequence[str], get_config: Callable[..., ml_collections.ConfigDict]
) -> tuple[ml_collections.ConfigDict, str | None]:
    """Builds the config and workdir from command-line arguments.

    Args:
      argv: arguments after the program name, e.g. `sys.argv[1:]`.
      get_config: the experiment's config factory; `--config=ARG` is passed to it.

    Returns:
      (config, workdir): the config with overrides applied (locked: no new keys),
      and the workdir (None when not given).

    Raises:
      ConfigError: an unknown flag or key, a missing value or a value of the wrong type.
    """
    config_arg, workdir, overrides = None, None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, has_value, value = arg.partition("=")
        if name in ("--workdir", "--config") or name.startswith("--config."):
            if not has_value:
                if not args or args[0].startswith("--"):
                    raise ConfigError(f"{name} needs a value: {name}=VALUE")
                value = args.pop(0)
            if name == "--workdir":
                workdir = value
            elif name == "--config":
                config_arg = value
            else:
                overrides.append((name[len("--config.") :], value))
        else:
            raise ConfigError(
                f"unknown argument {arg!r}; use --config.KEY=VALUE, --config=ARG or --workdir=DIR"
            )
    config = get_config(config_arg) if config_arg is not None else get_config()
    apply_overrides(config, overrides)
    config.lock()
    return config, workdir


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]):
    """Sets dotted keys of `config` from strings, converting to each default's type."""
    valid = sorted(flatten(config))
    for key, text in overrides:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            raise ConfigError(
                f"unknown config key {key!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; valid keys: {', '.join(valid)}"
            )
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        with node.unlocked():
            node[leaf] = convert_value(key, text, node[leaf])


def convert_value(key: str, text: str, default):
    """Parses `text` as a value of `default`'s type (int -> float is allowed)."""
    try:
        if isinstance(default, bool):
            lowered = text.strip().lower()
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        if isinstance(default, tuple | list):
            value = ast.literal_eval(text)
            if isinstance(value, int | float | str):
                value = (value,)
            if not isinstance(value, tuple | list):
                raise ValueError
            return type(default)(value)
        if default is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
    except (ValueError, SyntaxError):
        pass
    else:
        raise ConfigError(f"config key {key!r} holds a {type(default).__name__}; cannot set it")
    raise ConfigError(
        f"config key {key!r} expects a {type(default).__name__} (default {default!r}), got {text!r}"
    )


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """{"a.b": value} for every leaf of a nested ConfigDict."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def parse_duration(value: int | str, *, steps_per_epoch: int, batch_size: int) -> int:
    """Turns a training duration into a number of steps.

    Args:
      value: an int (steps) or a string "N steps", "X epochs" or "N examples"
        (singular forms and bare numbers, meaning steps, are accepted).
      steps_per_epoch: steps in one pass over the training set.
      batch_size: examples per step.

    Returns:
      The number of steps, >= 1 (fractional results round up).

    Raises:
      ConfigError: an unknown unit, a non-number or a duration <= 0.

    Example:
      >>> parse_duration("3 epochs", steps_per_epoch=100, batch_size=32)
      300
      >>> parse_duration("1000 examples", steps_per_epoch=100, batch_size=32)  # rounds up
      32
    """
    if isinstance(value, bool):
        raise ConfigError(f"duration must be a number of steps/epochs/examples, got {value!r}")
    if isinstance(value, int | float):
        amount, unit = float(value), "steps"
    else:
        parts = str(value).strip().lower().split()
        if len(parts) == 1:
            parts.append("steps")
        if len(parts) != 2:
            raise ConfigError(f"duration {value!r}: expected e.g. '1000 steps', '3 epochs'")
        try:
            amount = float(parts[0])
        except ValueError:
            raise ConfigError(f"duration {value!r}: {parts[0]!r} is not a number") from None
        unit = parts[1] if parts[1].endswith("s") else parts[1] + "s"
    per_unit = {"steps": 1.0, "epochs": float(steps_per_epoch), "examples": 1.0 / batch_size}
    if unit not in per_unit:
        raise ConfigError(f"duration {value!r}: unit must be steps, epochs or examples")
    steps = amount * per_unit[unit]
    if not steps > 0:
        raise ConfigError(f"duration {value!r} must be positive")
    return max(1, int(-(-steps // 1)))


def write_run_record(workdir: str, config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
    """Writes `config.json` and `run.json` to workdir.

    `run.json` holds the versions, devices, XLA flags and jdl's compiler options (they
    choose the kernels, so the bits of a result), git commit and command line.

    A resumed run with a changed config keeps going; the changed keys are reported
    on stderr and the new config is recorded.
    """
    import jax

    from jdl import compiler

    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "config.json")
    new_config = json.loads(config.to_json_best_effort())
    if os.path.exists(config_path):
        with open(config_path) as f:
            old_config = json.load(f)
        changed = sorted(
            k
            for k in set(_flat_json(old_config)) | set(_flat_json(new_config))
            if _flat_json(old_config).get(k) != _flat_json(new_config).get(k)
        )
        if changed:
            print(
                f"note: config differs from the earlier run in {workdir}: {changed}",
                file=sys.stderr,
            )
    _write_json(config_path, new_config)
    record = {
        "command": " ".join([sys.executable, "-m", _main_module()] + list(argv)),
        "argv": list(argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": _versions(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": compiler.compiler_options(),
        "git": _git_state(),
    }
    _write_json(os.path.join(workdir, "run.json"), record)


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache (a second run skips XLA compiles).

    The directory is `path`, else `$JDL_COMPILATION_CACHE`, else `~/.cache/jdl/xla`.
    Setting `JDL_COMPILATION_CACHE=off` disables it. Returns the directory used.
    """
    import jax

    path = path or os.environ.get("JDL_COMPILATION_CACHE") or os.path.expanduser("~/.cache/jdl/xla")
    if path.lower() == "off":
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("jdl", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _git_state() -> dict[str, str | bool | None]:
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            out = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _main_module() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else (sys.argv[0] if sys.argv else "?")


def _flat_json(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat_json(value, f"{prefix}{key}."))
    return flat


def _write_json(path: str, payload) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
