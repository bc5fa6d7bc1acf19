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
import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import ml_collections

from jdl.errors import UserError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(UserError, ValueError):
    """A bad command line or config value. The message says what to change."""


def parse_command_line(
    argv: Sequence[str],
    get_config: Callable[..., ml_collections.ConfigDict],
    *,
    choices: Mapping[str, Sequence] | None = None,
    description: str | None = None,
) -> tuple[ml_collections.ConfigDict, str | None]:
    """Builds the config and workdir from command-line arguments.

    `--config=ARG` follows `ml_collections.config_flags`: when ARG (before an optional
    `:arg`) is a path ending in `.py`, that file is loaded and its `get_config(arg)` (or
    `get_config()`) builds the config; keys it leaves out keep the experiment's defaults
    and a key the experiment does not have is an error. Any other ARG is passed to the
    experiment's own `get_config(ARG)`. `--config.KEY=VALUE` overrides apply on top.
    `-h`/`--help` prints `help_text` and exits with status 0; `--debug` is left to
    `jdl.cli`.

    Args:
      argv: arguments after the program name, e.g. `sys.argv[1:]`.
      get_config: the experiment's config factory.
      choices: {dotted key: allowed values} for keys with a fixed set of values, listed
        by `--help` (check them with `check_choices` after the experiment's own checks).
      description: the text `--help` prints first (default: the docstring of the module
        that defines `get_config`).

    Returns:
      (config, workdir): the config with overrides applied (locked: no new keys),
      and the workdir (None when not given).

    Raises:
      ConfigError: an unknown flag or key, a missing value, a value of the wrong type, a
        config file that is missing or has no `get_config`.
      SystemExit: with status 0, after printing the help for `-h`/`--help`.
    """
    choices = dict(choices or {})
    if "-h" in argv or "--help" in argv:
        print(help_text(get_config, choices=choices, description=description))
        raise SystemExit(0)
    config_arg, workdir, overrides = None, None, []
    args = [arg for arg in argv if arg != "--debug"]
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
                f"unknown argument {arg!r}; use --config.KEY=VALUE, --config=ARG, "
                "--workdir=DIR or --help"
            )
    if config_arg is not None and _is_config_file(config_arg):
        config = load_config_file(config_arg, get_config())
    else:
        config = get_config(config_arg) if config_arg is not None else get_config()
    apply_overrides(config, overrides)
    config.lock()
    return config, workdir


def check_choice(key: str, value, allowed: Sequence) -> None:
    """Raises `ConfigError` unless `value` is one of `allowed`, suggesting the closest one.

    Example:
      >>> check_choice("optimizer", "adamm", ("sgd", "adam"))
      Traceback (most recent call last):
      ...
      jdl.config.ConfigError: config.optimizer='adamm' must be sgd or adam (did you mean 'adam'?)
    """
    if value in allowed:
        return
    names = [str(a) for a in allowed]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"config.{key}={value!r} must be {listed}{hint}")


def check_choices(config: ml_collections.ConfigDict, choices: Mapping[str, Sequence]) -> None:
    """`check_choice` for every key of `choices` that `config` has."""
    flat = flatten(config)
    for key, allowed in choices.items():
        if key in flat:
            check_choice(key, flat[key], allowed)


def help_text(
    get_config: Callable[..., ml_collections.ConfigDict],
    *,
    choices: Mapping[str, Sequence] | None = None,
    description: str | None = None,
) -> str:
    """What `--help` prints: the description, the usage, then every config key.

    Each key is listed with its type, its default and, for keys in `choices`, the
    allowed values.
    """
    if description is None:
        module = sys.modules.get(getattr(get_config, "__module__", ""), None)
        description = (getattr(module, "__doc__", None) or "").strip()
    program = _main_module()
    lines = [description, ""] if description else []
    lines += [
        f"usage: python -m {program} [--config=ARG | --config=FILE.py[:ARG]] "
        "[--config.KEY=VALUE ...] [--workdir=DIR] [--debug] [--help]",
        "",
        "config keys (type, default):",
    ]
    flat = flatten(get_config())
    width = max((len(key) for key in flat), default=0)
    for key, default in flat.items():
        line = f"  --config.{key:<{width}}  {type(default).__name__}, default {default!r}"
        if choices and key in choices:
            line += f"; one of: {', '.join(str(c) for c in choices[key])}"
        lines.append(line)
    lines += [
        "",
        "Errors print one 'error: ...' line; set JDL_DEBUG=1 or pass --debug for the traceback.",
    ]
    return "\n".join(lines)


def load_config_file(spec: str, defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config built by a config file's `get_config`, over the experiment's defaults.

    Args:
      spec: `path/to/file.py` or `path/to/file.py:ARG` (ARG goes to `get_config(ARG)`).
      defaults: the experiment's default config; the file's keys must all be among its
        keys, with compatible types, and the keys the file leaves out keep these values.

    Returns:
      `defaults` updated with the file's values.

    Raises:
      ConfigError: the file is missing or fails to load, has no `get_config`, or returns a
        key the experiment does not have or a value of another type.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config={spec}: no such config file {path!r}")
    module_spec = importlib.util.spec_from_file_location(
        "jdl_config_file_" + os.path.splitext(os.path.basename(path))[0], path
    )
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's file: say which and why
        raise ConfigError(
            f"--config={spec}: loading {path} failed: {type(error).__name__}: {error}"
        ) from error
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(
            f"--config={spec}: {path} defines no get_config(); a config file must define "
            "get_config() or get_config(arg) returning an ml_collections.ConfigDict"
        )
    loaded = get_config(arg) if arg else get_config()
    if not isinstance(loaded, ml_collections.ConfigDict | dict):
        raise ConfigError(
            f"--config={spec}: get_config() returned a {type(loaded).__name__}, "
            "not an ml_collections.ConfigDict"
        )
    loaded = ml_collections.ConfigDict(loaded)
    valid = flatten(defaults)
    for key, value in flatten(loaded).items():
        _check_known_key(key, valid, where=f"--config={spec}: ")
        _set_dotted(defaults, key, _compatible_value(key, value, valid[key], spec))
    return defaults


def _check_known_key(key: str, valid, *, where: str = "") -> None:
    """Raises a ConfigError with a did-you-mean when `key` is not among `valid`."""
    if key in valid:
        return
    hint = difflib.get_close_matches(key, list(valid), n=1)
    raise ConfigError(
        f"{where}unknown config key {key!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; valid keys: {', '.join(sorted(valid))}"
    )


def _set_dotted(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets the leaf `a.b.c` of a (locked) nested ConfigDict."""
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    with node.unlocked():
        node[leaf] = value


def _is_config_file(arg: str) -> bool:
    return arg.partition(":")[0].endswith(".py")


def _compatible_value(key: str, value, default, spec: str):
    """`value` in `default`'s type (int -> float, list <-> tuple), else a ConfigError."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) != isinstance(value, bool):
        pass
    elif isinstance(default, float) and isinstance(value, int | float):
        return float(value)
    elif isinstance(default, tuple | list) and isinstance(value, tuple | list):
        return type(default)(value)
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(
        f"--config={spec}: config key {key!r} expects a {type(default).__name__} "
        f"(default {default!r}), got {value!r}"
    )


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]):
    """Sets dotted keys of `config` from strings, converting to each default's type."""
    valid = flatten(config)
    for key, text in overrides:
        _check_known_key(key, valid)
        current = functools.reduce(lambda node, name: node[name], key.split("."), config)
        _set_dotted(config, key, convert_value(key, text, current))


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


def write_run_record(
    workdir: str, config: ml_collections.ConfigDict | Mapping, argv: Sequence[str]
) -> None:
    """Writes `config.json` and `run.json` to workdir, keeping every earlier start's record.

    `config.json` holds the config in force. `run.json` holds this start's record — the
    config, versions, devices, XLA flags and jdl's compiler options (they choose the
    kernels, so the bits of a result), git commit and command line — plus `"previous"`,
    the records of every earlier start in this workdir, oldest first, each with the
    config it ran with: a resume with changed settings appends, it never erases. The
    changed keys are also reported on stderr. `jdl.fit` calls this once its restore
    checks have passed, so a refused resume leaves both files as they were.

    Args:
      workdir: the run directory (created if missing).
      config: the run's config, an `ml_collections.ConfigDict` or a dict.
      argv: the command-line arguments after the program name.
    """
    import jax

    from jdl import compiler, jsonio

    os.makedirs(workdir, exist_ok=True)
    new_config = _config_as_json(config)
    config_path = os.path.join(workdir, "config.json")
    run_path = os.path.join(workdir, "run.json")
    old_config = _read_json(config_path)
    old_run = _read_json(run_path)
    previous = []
    if isinstance(old_run, dict):
        previous = list(old_run.pop("previous", None) or [])
        if "config" not in old_run and isinstance(old_config, dict):
            old_run["config"] = old_config  # a record from before configs were kept per start
        previous.append(old_run)
    if isinstance(old_config, dict):
        old_flat, new_flat = _flat_json(old_config), _flat_json(new_config)
        keys = set(old_flat) | set(new_flat)
        changed = sorted(k for k in keys if old_flat.get(k) != new_flat.get(k))
        if changed:
            print(
                f"note: config differs from the earlier run in {workdir}: {changed} "
                "(run.json keeps the earlier records under 'previous')",
                file=sys.stderr,
            )
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
        "config": new_config,
        "previous": previous,
    }
    jsonio.write_json(config_path, new_config)
    jsonio.write_json(run_path, record)


def _config_as_json(config) -> dict:
    from jdl import jsonio

    if isinstance(config, ml_collections.ConfigDict):
        return jsonio.to_json_safe(json.loads(config.to_json_best_effort()))
    return jsonio.to_json_safe(json.loads(json.dumps(dict(config), default=repr)))


def _read_json(path: str):
    """The parsed file, or None when it is missing or unreadable (a record, not an input)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


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
