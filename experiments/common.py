"""What every classification experiment shares: config fields, checks, and the run itself.

An experiment module supplies `get_config()` (built on `base_config`), a data
loader and a model builder; `run_classifier` does the rest: read the command
line, check the config before anything compiles, record the run, train with
`jdl.fit`, evaluate on the test split and print the `FINAL {json}` line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import ml_collections
from flax import nnx

import jdl
from jdl import jsonio
from jdl.config import ConfigError, check_choice
from jdl.data import Dataset
from jdl.steps import AugmentFn


def base_config() -> ml_collections.ConfigDict:
    """Config fields shared by the classification experiments, with safe defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 128
    c.duration = "10 epochs"  # steps, epochs or examples, e.g. "2000 steps"
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.schedule = "constant"
    c.warmup_steps = 0
    c.weight_decay = 0.0
    c.clip_norm = 0.0  # 0 disables global-norm clipping
    c.label_smoothing = 0.0
    c.augment_max_shift = 0  # random translation in pixels, 0 disables
    c.validation_fraction = 0.0  # >0 holds out part of train for eval during training
    c.eval_every = 0  # steps; 0 evaluates only at the end
    c.log_every = 100
    c.checkpoint_every = 0  # steps; 0 saves only at the end
    c.max_to_keep = 2
    c.early_stopping_patience = 0
    c.steps_per_dispatch = 10
    c.unroll = 0  # 0: write each chunk out in full (best for convolutions on CPU)
    c.skip_nonfinite = False
    c.progress = True
    c.compilation_cache = True
    c.precision = "fp32"  # "bf16": bf16 compute, fp32 weights; "auto": bf16 except on CPU
    c.micro_batches = 1  # >1 splits each batch, accumulating gradients (less memory)
    # Devices (jdl.parallel): "" trains on one device; "data:8", "data:-1,fsdp:2", ...
    c.mesh_shape = ""
    c.fsdp_min_size = 4096  # with an fsdp axis: arrays with fewer entries stay replicated
    c.sharding_rules = ""  # "regex=axis,None;..." on parameter paths, overrides FSDP
    c.coordinator_address = ""  # several processes: "host:port" (or JAX_COORDINATOR_ADDRESS)
    c.num_processes = 0  # 0: from JAX_NUM_PROCESSES, else one process
    c.process_id = -1  # -1: from JAX_PROCESS_ID
    # "WORKDIR" or "WORKDIR:STEP": a new run starts from the parameters and model state of
    # that run's checkpoint (the latest, or STEP), with this run's own optimizer. Ignored
    # once this run's workdir holds a checkpoint: then it resumes as usual.
    c.init_from = ""
    # (first, last): a jax.profiler trace of these steps in WORKDIR/profile (TensorBoard's
    # profiler or Perfetto open it); () traces nothing.
    c.profile_steps = ()
    return c


# The keys of `base_config` with a fixed set of values. An experiment declares its own
# next to its `get_config` as `CONFIG_CHOICES = {"model": (...)}`; `--help` lists them all
# and the command line rejects anything else with a did-you-mean.
BASE_CHOICES: dict[str, tuple] = {
    "optimizer": jdl.optim.OPTIMIZERS,
    "schedule": jdl.optim.SCHEDULES,
    "precision": jdl.precision.PRECISIONS,
}


def config_choices(get_config: Callable) -> dict[str, Sequence]:
    """`BASE_CHOICES` plus the `CONFIG_CHOICES` of the module defining `get_config`."""
    module = sys.modules.get(getattr(get_config, "__module__", ""), None)
    return {**BASE_CHOICES, **getattr(module, "CONFIG_CHOICES", {})}


def parse_experiment_command_line(
    argv: Sequence[str], get_config: Callable[..., ml_collections.ConfigDict]
) -> tuple[ml_collections.ConfigDict, str | None]:
    """`jdl.parse_command_line` with the experiment's choices (see `config_choices`)."""
    return jdl.parse_command_line(argv, get_config, choices=config_choices(get_config))


def check_sizes(config: ml_collections.ConfigDict, *keys: str) -> None:
    """Each key (an int or a sequence of ints: layer widths, channels, ...) must be >= 1."""
    for key in keys:
        value = config[key]
        sizes = value if isinstance(value, tuple | list) else (value,)
        if not all(isinstance(size, int) and size >= 1 for size in sizes):
            raise ConfigError(f"config.{key}={value!r}: every size must be a positive integer")


def check_workdir(workdir: str) -> None:
    """Raises `ConfigError` for a workdir that cannot be a writable directory.

    Checked before data loading and compiling; the workdir itself is not created here.
    """
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; choose another")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(
            f"--workdir {workdir}: {existing} is a file, not a directory; choose another"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--workdir {workdir}: {existing} is not writable (read-only or no permission); "
            "choose another --workdir"
        )


def parse_init_from(spec: str) -> tuple[str, int | None]:
    """("WORKDIR", STEP or None) from `config.init_from`'s "WORKDIR[:STEP]"."""
    source, colon, step = spec.rpartition(":")
    if colon and step.isdigit():
        return source, int(step) or None
    return spec, None


def has_checkpoint(workdir: str | None) -> bool:
    """True when `workdir/checkpoints` holds a step folder (so `fit` would resume)."""
    if workdir is None:
        return False
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def initial_state(state: jdl.TrainState, init_from: str, workdir: str | None) -> jdl.TrainState:
    """`state` with the parameters and model state of `init_from`'s checkpoint.

    Only for a new run: when `workdir` already holds a checkpoint, `fit` resumes from it
    and `state` is returned unchanged. The optimizer state, step and RNG stay `state`'s,
    so any optimizer can continue from the weights.

    Raises:
      ConfigError: `init_from` names no run with checkpoints.
      jdl.CheckpointMismatchError: the checkpoint holds another model.
    """
    if not init_from or has_checkpoint(workdir):
        return state
    source, step = parse_init_from(init_from)
    directory = os.path.join(source, "checkpoints")
    if not has_checkpoint(source):
        raise ConfigError(f"config.init_from={init_from!r}: no checkpoints in {directory}")
    checkpointer = jdl.Checkpointer(directory, read_only=True)  # it may still be training
    try:
        return checkpointer.restore_weights(state, step=step)
    finally:
        checkpointer.close()


def check_config(config: ml_collections.ConfigDict) -> None:
    """Rejects impossible values with one clear message, before anything compiles."""
    rules = [
        ("batch_size", config.batch_size >= 1, "must be >= 1"),
        ("learning_rate", math.isfinite(config.learning_rate), "must be a finite number"),
        ("learning_rate", config.learning_rate > 0, "must be > 0"),
        ("warmup_steps", config.warmup_steps >= 0, "must be >= 0"),
        ("weight_decay", config.weight_decay >= 0, "must be >= 0"),
        ("clip_norm", config.clip_norm >= 0, "must be >= 0 (0 disables)"),
        ("label_smoothing", 0 <= config.label_smoothing < 1, "must be in [0, 1)"),
        ("augment_max_shift", config.augment_max_shift >= 0, "must be >= 0"),
        ("validation_fraction", 0 <= config.validation_fraction < 1, "must be in [0, 1)"),
        ("eval_every", config.eval_every >= 0, "must be >= 0"),
        (
            "profile_steps",
            len(config.profile_steps) == 0
            or (len(config.profile_steps) == 2 and 1 <= config.profile_steps[0])
            and config.profile_steps[0] <= config.profile_steps[-1],
            "must be () or (first, last) with 1 <= first <= last",
        ),
        ("log_every", config.log_every >= 0, "must be >= 0"),
        ("checkpoint_every", config.checkpoint_every >= 0, "must be >= 0"),
        ("max_to_keep", config.max_to_keep >= 1, "must be >= 1"),
        ("early_stopping_patience", config.early_stopping_patience >= 0, "must be >= 0"),
        ("steps_per_dispatch", config.steps_per_dispatch >= 1, "must be >= 1"),
        ("unroll", config.unroll >= 0, "must be >= 0 (0: fully unrolled)"),
        (
            "micro_batches",
            config.micro_batches >= 1 and config.batch_size % config.micro_batches == 0,
            "must be >= 1 and divide config.batch_size",
        ),
        ("fsdp_min_size", config.fsdp_min_size >= 1, "must be >= 1"),
        ("num_processes", config.num_processes >= 0, "must be >= 0 (0: from the environment)"),
    ]
    for key, allowed in BASE_CHOICES.items():
        check_choice(key, config[key], allowed)
    for key, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"config.{key}={config[key]!r} {requirement}")
    if config.init_from and not has_checkpoint(parse_init_from(config.init_from)[0]):
        raise ConfigError(
            f"config.init_from={config.init_from!r}: no checkpoints in "
            f"{os.path.join(parse_init_from(config.init_from)[0], 'checkpoints')}; "
            "give the workdir of a run that saved one"
        )
    try:
        jdl.parallel.ShardingRules.parse(config.sharding_rules)
    except jdl.parallel.ShardingError as error:
        raise ConfigError(f"config.sharding_rules: {error}") from None
    if config.early_stopping_patience and not (config.eval_every and config.validation_fraction):
        raise ConfigError(
            "config.early_stopping_patience needs config.eval_every > 0 and "
            "config.validation_fraction > 0 (early stopping must not look at the test split)"
        )


def run_classifier(
    argv: Sequence[str],
    *,
    get_config: Callable[..., ml_collections.ConfigDict],
    load_data: Callable[[ml_collections.ConfigDict], Dataset],
    build_model: Callable[[ml_collections.ConfigDict, Dataset, nnx.Rngs], nnx.Module],
    default_workdir: str,
    make_augment: Callable[[ml_collections.ConfigDict], AugmentFn | None] | None = None,
    check_extra: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> dict:
    """Runs one classification experiment from the command line; returns the final metrics.

    `check_extra(config)` checks the experiment's own config fields after
    `check_config`, before any data is loaded, raising `ConfigError`.
    `make_augment(config)` builds the training augmentation (an `augment_fn` for
    `jdl.make_train_step`, or None); by default it is the random translation of
    `config.augment_max_shift` pixels. Prints `FINAL {json}` as the last line of output.

    Raises:
      jdl.UserError: a bad config or workdir (before anything is loaded or compiled), data
        that does not fit, a checkpoint of another model; the workdir is left as it was.
        The experiment's `main` is a `jdl.cli.command`, which turns these into one
        `error:` line.
    """
    checks = (check_config,) if check_extra is None else (check_config, check_extra)
    run = start_run(argv, get_config, default_workdir, *checks)
    return _train_classifier(run, load_data, build_model, make_augment)


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds the run directory's lock on process 0 (`fit` re-enters it)."""
    if jax.process_index() != 0:
        yield
        return
    with jdl.WorkdirLock(workdir):
        yield


def _train_classifier(run: Run, load_data, build_model, make_augment) -> dict:
    config, workdir, mesh = run.config, run.workdir, run.mesh
    dataset = load_data(config)
    train_split, eval_split = dataset["train"], dataset["test"]
    if config.validation_fraction > 0:
        train_split, eval_split = jdl.data.stratified_split(
            train_split, fraction=config.validation_fraction, seed=config.seed
        )
    check_batch_fits(config.batch_size, len(train_split["y"]))
    if jax.process_count() > 1:  # each process keeps only its rows (jdl.parallel)
        rows = jdl.parallel.process_rows(len(train_split["y"]), mesh)
        train_split = jdl.parallel.global_arrays({k: v[rows] for k, v in train_split.items()}, mesh)
    train_data = jdl.InMemoryData(train_split, batch_size=config.batch_size, seed=config.seed)
    num_steps = config_num_steps(config, train_data)
    model = build_model(config, dataset, model_rngs(config))
    tx, schedule = make_config_optimizer(config, num_steps)
    state = jdl.TrainState.create(model, tx, seed=config.seed)
    state = initial_state(state, config.init_from, workdir)
    loss_fn = jdl.classification_loss(label_smoothing=config.label_smoothing)
    if make_augment is None:
        augment = translate_augmentation(config.augment_max_shift)
    else:
        augment = make_augment(config)
    print(
        f"{dataset.name}: train {train_data.num_examples}, eval {len(eval_split['y'])}, "
        f"test {dataset.num_examples('test')} examples; {num_steps} steps of batch "
        f"{config.batch_size}; {jdl.count_params(state.params):,} parameters; "
        f"devices: {jax.devices()}",
        flush=True,
    )
    model_summary = None
    if jax.process_index() == 0:
        from jdl.model_summary import summary

        x = train_split["x"]  # shape and dtype only: a global array needs no gathering
        model_summary = summary(model, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
        print(model_summary.format(max_rows=30), flush=True)
    with workdir_lock(workdir):  # taken here: nothing before it writes to the workdir
        result = fit_with_config(
            config,
            state,
            loss_fn=loss_fn,
            schedule=schedule,
            augment_fn=augment,
            train_data=train_data,
            num_steps=num_steps,
            workdir=workdir,
            run=run,
            eval_data=eval_split,
            best_metric="accuracy" if config.validation_fraction > 0 else None,
        )
        if model_summary is not None:  # after fit: a refused run leaves the workdir as it was
            model_summary.write(workdir)
        test = jdl.make_evaluator(jdl.make_eval_step(loss_fn), 1000)(result.state, dataset["test"])
        final = {
            "test_accuracy": round(test["accuracy"], 4),
            "test_loss": round(test["loss"], 4),
            "train_loss": finite_round(result.train_metrics.get("loss")),
            "steps": result.step,
            "seconds": round(time.perf_counter() - run.started, 1),
        }
        return report_final(final, workdir, finished=result.was_finished)


def check_batch_fits(batch_size: int, num_examples: int, key: str = "batch_size") -> None:
    """Raises `ConfigError` when one batch needs more examples than the training set has."""
    if batch_size > num_examples:
        raise ConfigError(
            f"config.{key}={batch_size} is larger than the {num_examples} training examples; "
            f"use at most {num_examples}"
        )


def finite_round(value: float | None, digits: int = 4) -> float | None:
    """`value` rounded, or None when there is none (JSON null, never NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def setup_devices(config: ml_collections.ConfigDict):
    """Starts multi-process JAX if configured, then builds the mesh and sharding rules.

    Returns (mesh or None for one device, `jdl.parallel.ShardingRules`). Must run before
    anything touches a device. Raises `ConfigError` for a mesh that does not fit the
    devices or a batch size that does not split over it.
    """
    try:
        jdl.parallel.initialize_distributed(
            config.coordinator_address or None,
            config.num_processes or None,
            None if config.process_id < 0 else config.process_id,
        )
        rules = jdl.parallel.ShardingRules.parse(
            config.sharding_rules, min_size=config.fsdp_min_size
        )
        if not config.mesh_shape:
            return None, rules
        mesh = jdl.parallel.make_mesh(config.mesh_shape)
        jdl.parallel.check_batch_size(config.batch_size, mesh, what="config.batch_size")
    except jdl.parallel.ShardingError as error:
        raise ConfigError(f"config.mesh_shape={config.mesh_shape!r}: {error}") from None
    return mesh, rules


def translate_augmentation(max_shift: int):
    """An `augment_fn` shifting images by up to `max_shift` pixels, or None if 0."""
    if max_shift <= 0:
        return None

    def augment(key, batch):
        return {**batch, "x": jdl.data.random_translate(key, batch["x"], max_shift=max_shift)}

    return augment


def default_workdir(name: str) -> str:
    """workdirs/<name> under the current directory."""
    return os.path.join("workdirs", name)


def fit_and_test(
    config: ml_collections.ConfigDict,
    dataset: Dataset,
    model: nnx.Module,
    *,
    workdir: str | None,
    duration: str | int | None = None,
    loss_fn: jdl.steps.LossFn | None = None,
    wrap_optimizer: Callable | None = None,
    init_from: str = "",
) -> tuple[jdl.FitResult, dict[str, float]]:
    """Trains `model` on dataset["train"] with a `base_config` config's optimizer and loop
    settings, then measures loss and accuracy on dataset["test"].

    For experiments that train several models in one run (a teacher and a student, one
    model per sparsity, ...) and so cannot use `run_classifier`. `config` is recorded in
    `workdir` by `jdl.fit` (config.json, run.json) once its restore checks pass.

    Args:
      config: a checked `base_config`-style config (seed, batch size, optimizer, ...).
      dataset: with "train" and "test" splits.
      model: the initialised model to train.
      workdir: run directory of this model (resumes from its checkpoint), or None.
      duration: overrides `config.duration`.
      loss_fn: training loss (default: `jdl.classification_loss` with the config's label
        smoothing); the test split is always scored with the plain classification loss.
      wrap_optimizer: `(tx, num_steps) -> tx`, e.g. to add pruning around the optimizer.
      init_from: "WORKDIR[:STEP]": start from that run's weights (see `initial_state`).

    Returns:
      (the `FitResult`, {"loss", "accuracy"} on the test split).

    Raises:
      ConfigError: the duration cannot be parsed, or the batch is larger than the
        training set.
    """
    check_batch_fits(config.batch_size, len(dataset["train"]["y"]))
    train_data = jdl.InMemoryData(dataset["train"], batch_size=config.batch_size, seed=config.seed)
    num_steps = config_num_steps(config, train_data, duration)
    tx, schedule = make_config_optimizer(config, num_steps)
    if wrap_optimizer is not None:
        tx = wrap_optimizer(tx, num_steps)
    state = jdl.TrainState.create(model, tx, seed=config.seed)
    state = initial_state(state, init_from, workdir)
    scoring = jdl.make_eval_step(jdl.classification_loss())
    result = fit_with_config(
        config,
        state,
        loss_fn=loss_fn or jdl.classification_loss(label_smoothing=config.label_smoothing),
        schedule=schedule,
        augment_fn=translate_augmentation(config.augment_max_shift),
        train_data=train_data,
        num_steps=num_steps,
        workdir=workdir,
        eval_step=scoring,
        eval_data=dataset["test"],
    )
    test = jdl.make_evaluator(scoring, 1000)(result.state, dataset["test"])
    return result, test


class Run(NamedTuple):
    """What `start_run` hands an experiment: the checked config and the run's devices."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh | None  # None: one device
    sharding_rules: jdl.parallel.ShardingRules | None
    started: float  # `time.perf_counter()` when the run started


# The shared fields that need the devices set up by `start_run` (`setup_devices`).
DEVICE_FIELDS = ("mesh_shape", "fsdp_min_size", "sharding_rules")
PROCESS_FIELDS = ("coordinator_address", "num_processes", "process_id")


def start_run(
    argv: Sequence[str],
    get_config: Callable[..., ml_collections.ConfigDict],
    default_dir: str,
    *checks: Callable[[ml_collections.ConfigDict], None],
    unsupported: Sequence[str] = (),
    reason: str = "",
) -> Run:
    """The start every experiment shares: config, checks, workdir, cache, devices.

    Reads the command line; refuses (`reject_unsupported`) a changed value of a shared
    field in `unsupported`, one the experiment cannot honour (`reason` says why); runs
    each `check(config)` and the declared choices (a `ConfigError` before anything
    compiles); checks the workdir (`default_dir` unless `--workdir` is given) can be
    written; sets up the devices (`setup_devices`) unless the config has no mesh fields
    or declares them all unsupported; and turns on the compilation cache when
    `config.compilation_cache` says so. Writes nothing: the run records are written by
    `jdl.fit` (`run_config=`) or `record_run` once the restore checks pass, so a refused
    resume leaves the earlier records intact.
    """
    config, workdir = parse_experiment_command_line(argv, get_config)
    reject_unsupported(config, get_config(), unsupported, reason)
    for check in checks:
        check(config)
    jdl.config.check_choices(config, config_choices(get_config))
    workdir = workdir or default_dir
    check_workdir(workdir)
    mesh, sharding_rules = None, None
    device_fields = (*DEVICE_FIELDS, *PROCESS_FIELDS)
    if "mesh_shape" in config and not set(device_fields) <= set(unsupported):
        mesh, sharding_rules = setup_devices(config)
    if config.get("compilation_cache"):
        jdl.enable_compilation_cache()
    return Run(config, workdir, mesh, sharding_rules, time.perf_counter())


def reject_unsupported(
    config: ml_collections.ConfigDict,
    defaults: ml_collections.ConfigDict,
    fields: Sequence[str],
    reason: str = "",
) -> None:
    """Raises `ConfigError` when a field in `fields` differs from its value in `defaults`.

    For shared `base_config` fields that an experiment cannot honour: a changed value is
    refused in one line instead of being silently ignored.
    """
    for key in fields:
        if key in config and config[key] != defaults.get(key):
            why = f" ({reason})" if reason else ""
            raise ConfigError(
                f"config.{key}={config[key]!r} is not supported by this experiment{why}; "
                f"leave it at {defaults.get(key)!r}"
            )


def model_rngs(config: ml_collections.ConfigDict, seed: int | None = None) -> nnx.Rngs:
    """The model's random streams from the config's seed: params `seed`, dropout `seed + 1`."""
    seed = config.seed if seed is None else seed
    return nnx.Rngs(params=seed, dropout=seed + 1)


def config_num_steps(
    config: ml_collections.ConfigDict, train_data: jdl.TrainData, duration: str | int | None = None
) -> int:
    """`config.duration` (or `duration`) in steps of `train_data`; `ConfigError` naming it."""
    try:
        return jdl.parse_duration(
            config.duration if duration is None else duration,
            steps_per_epoch=train_data.steps_per_epoch,
            batch_size=config.batch_size,
        )
    except ConfigError as error:
        raise ConfigError(f"config.duration: {error}") from None


# `jdl.fit` keyword of each shared loop field of `base_config`, and how its value converts.
_FIT_FIELDS: dict[str, tuple[str, Callable]] = {
    "eval_every": ("eval_every", int),
    "log_every": ("log_every", int),
    "checkpoint_every": ("checkpoint_every", int),
    "max_to_keep": ("max_to_keep", int),
    "early_stopping_patience": ("early_stopping_patience", int),
    "steps_per_dispatch": ("steps_per_dispatch", int),
    "unroll": ("unroll", lambda unroll: unroll or True),  # 0: the whole chunk written out
    "progress": ("progress", bool),
    "profile_steps": ("profile_steps", lambda steps: tuple(steps) or None),
}


def fit_with_config(
    config: ml_collections.ConfigDict,
    state: jdl.TrainState,
    *,
    loss_fn: jdl.steps.LossFn,
    train_data: jdl.TrainData,
    num_steps: int,
    workdir: str | None,
    schedule: Callable | None = None,
    augment_fn: AugmentFn | None = None,
    run: Run | None = None,
    **overrides,
) -> jdl.FitResult:
    """`jdl.fit` of `state` with the train step and loop settings of `config`'s shared fields.

    The train step is `jdl.make_train_step(loss_fn, ...)` with the config's
    `skip_nonfinite`, `precision` and `micro_batches`; the eval step
    `jdl.make_eval_step(loss_fn)` at the same precision; the loop settings (eval, log and
    checkpoint periods, `max_to_keep`, early stopping, steps per dispatch, unroll,
    progress, profile steps) come from the config's fields of those names. A field the
    config lacks leaves `jdl.fit`'s default. `run` supplies the mesh and sharding rules;
    the config is recorded as the run's `config.json`. `overrides` are passed to
    `jdl.fit` over all of these (e.g. `eval_step=`, `eval_data=`, `best_metric=`).
    """
    precision = config.get("precision", "fp32")
    arguments = {
        keyword: convert(config[key])
        for key, (keyword, convert) in _FIT_FIELDS.items()
        if key in config
    }
    arguments |= dict(
        train_step=jdl.make_train_step(
            loss_fn,
            lr_schedule=schedule,
            augment_fn=augment_fn,
            skip_nonfinite=config.get("skip_nonfinite", False),
            precision=precision,
            micro_batches=config.get("micro_batches", 1),
        ),
        eval_step=jdl.make_eval_step(loss_fn, precision=precision),
        mesh=None if run is None else run.mesh,
        sharding_rules=None if run is None else run.sharding_rules,
        run_config=config,
    )
    return jdl.fit(
        state,
        train_data=train_data,
        num_steps=num_steps,
        workdir=workdir,
        **(arguments | overrides),
    )


def reject_init_from(config: ml_collections.ConfigDict) -> None:
    """A check for experiments that train several models: `init_from` is for one model."""
    if config.get("init_from"):
        raise ConfigError(
            f"config.init_from={config.init_from!r}: this experiment trains several models "
            "from scratch and cannot start from one checkpoint; leave config.init_from empty"
        )


def record_run(workdir: str, config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
    """`jdl.write_run_record` on process 0: for experiments whose own workdir has no `fit`.

    Call it once the run can no longer be refused (after the first `fit` has restored or
    started), so that a refused resume never rewrites the earlier records.
    """
    if jax.process_index() == 0:
        jdl.write_run_record(workdir, config, argv)


def report_final(
    final: dict, workdir: str, *, finished: bool = False, extra: Mapping | None = None
) -> dict:
    """Records the final metrics in `final.json` (process 0) and prints `FINAL {json}`.

    The experiment's keys are merged into the `final.json` that `jdl.fit` wrote (its
    `step`, `train`, `eval`, `best` and `stopped_early` stay), written without NaN or
    Infinity (`jdl.jsonio`). `extra` goes to the file only, not to the FINAL line.

    When `finished` (the workdir already held the finished run, so nothing trained), the
    file is left as it is and FINAL repeats what was reported the first time: the
    recorded value of each of `final`'s keys ("seconds" included); keys the record lacks
    take this call's value.

    Returns:
      The dict printed after `FINAL `.
    """
    path = os.path.join(workdir, "final.json")
    recorded = _read_final(path)
    if finished and all(key in recorded for key in final):
        final = {key: recorded[key] for key in final}
    elif jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        nonfinite = {**recorded.get(jsonio.NONFINITE_KEY, {})}
        merged = {**recorded, **final, **(extra or {})}
        for key in list(nonfinite):  # reasons for values that this call replaced
            if key.split(".")[0] in final or key.split(".")[0] in (extra or {}):
                del nonfinite[key]
        merged.pop(jsonio.NONFINITE_KEY, None)
        if nonfinite:
            merged[jsonio.NONFINITE_KEY] = nonfinite
        jsonio.write_json(path, merged)
    final = jsonio.to_json_safe(final)
    print("FINAL " + json.dumps(final, allow_nan=False), flush=True)
    return final


def _read_final(path: str) -> dict:
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def make_config_optimizer(
    config: ml_collections.ConfigDict, num_steps: int, learning_rate: float | None = None
):
    """`jdl.make_optimizer` from a `base_config`-style config: returns (tx, schedule).

    `learning_rate` replaces `config.learning_rate` (e.g. for a fine-tuning stage).
    """
    return jdl.make_optimizer(
        config.optimizer,
        learning_rate=config.learning_rate if learning_rate is None else learning_rate,
        total_steps=num_steps,
        schedule=config.schedule,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm or None,
    )
