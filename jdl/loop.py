"""`fit`: build -> restore -> chunks of scanned steps -> log / eval / checkpoint.

The loop dispatches `steps_per_dispatch` training steps at a time as one
compiled program (`lax.scan` over the pure train step, batches drawn on the
device). Metrics stay on the device until a log, eval or checkpoint boundary
needs them, so the host never waits on the device inside a chunk. Every chunk
has the same length and a traced stop step, so the program compiles once:
chunks that end at a boundary simply skip their remaining iterations.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jdl import compiler, jsonio, parallel
from jdl.checkpoint import Checkpointer, CheckpointWriteError, Restored
from jdl.config import write_run_record
from jdl.data.dataset import EmptyDataError, check_finite
from jdl.data.pipeline import (
    DataProgram,
    TrainData,
    check_labels,
    check_train_data,
)
from jdl.errors import UserError
from jdl.hooks import (
    MAIN_EVAL,
    EvalSet,
    Hook,
    HookContext,
    HookError,
    LogTrainMetrics,
    Profile,
    UnknownMetricError,  # noqa: F401 - jdl.loop.UnknownMetricError, as before
)
from jdl.lock import WorkdirLock
from jdl.metric_log import MetricLogger, plot_curves
from jdl.state import TrainState
from jdl.steps import EvalStep, Metrics, TrainStep


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged: a NaN or infinite loss, gradient or parameter, or parameters
    that exploded. The message names the step and the checkpoint that remains."""


class RunInterrupted(SystemExit):
    """`fit` stopped on SIGTERM or SIGINT after saving a checkpoint.

    A `SystemExit` whose code is the conventional status 128 + signal number (143 for
    SIGTERM, 130 for SIGINT): left uncaught, the program ends with that status and no
    traceback, which is what schedulers and `docker stop` expect before they requeue.
    Running the same command again resumes exactly where the run stopped.

    Attributes:
      signal_name: "SIGTERM" or "SIGINT".
      step: the step the run stopped at.
      checkpoint_step: the step of the checkpoint saved on the way out (None without a
        workdir).
    """

    def __init__(self, signum: int, step: int, checkpoint_step: int | None):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.checkpoint_step = checkpoint_step


# A save is refused when the parameter norm grew by more than this factor since the last
# good save (or the start): no sane step multiplies the norm by a thousand, a blow-up does.
EXPLODED_NORM_RATIO = 1e3


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the final training state (on device). The state passed to `fit` was
        consumed (its buffers were donated to the compiled step): go on from this one.
      step: the final step.
      train_metrics: means of the train metrics over the last logged interval.
      eval_history: one dict per evaluation, with "step".
      best: the best evaluation by `best_metric` (or None).
      stopped_early: True when early stopping ended the run.
      seconds: wall time of this call (restore, compile and training included).
      was_finished: True when the workdir already held a finished run: nothing was
        trained, and `train_metrics`, `eval_history` and `best` are the recorded ones.
    """

    state: TrainState
    step: int
    train_metrics: dict[str, float]
    eval_history: list[dict[str, float]]
    best: dict[str, float] | None
    stopped_early: bool
    seconds: float
    was_finished: bool = False

    def model(self):
        """The trained model in eval mode (dropout off, batch norm on running averages)."""
        return self.state.eval_model()


def _holding_workdir_lock(fit_fn: Callable) -> Callable:
    """Runs `fit_fn` holding `WORKDIR/.lock` (process 0 only): one run per workdir."""

    @functools.wraps(fit_fn)
    def locked_fit(*args, workdir: str | None = None, **kwargs):
        if workdir is None or jax.process_index() != 0:
            return fit_fn(*args, workdir=workdir, **kwargs)
        with WorkdirLock(workdir):  # released on return and on any error
            return fit_fn(*args, workdir=workdir, **kwargs)

    return locked_fit


@_holding_workdir_lock
def fit(
    state: TrainState,
    *,
    train_step: TrainStep,
    train_data: TrainData,
    num_steps: int,
    eval_step: EvalStep | None = None,
    eval_data: Mapping[str, np.ndarray] | None = None,
    eval_every: int = 0,
    eval_batch_size: int = 1000,
    log_every: int = 100,
    workdir: str | None = None,
    checkpoint_every: int = 0,
    max_to_keep: int = 3,
    best_metric: str | None = None,
    best_mode: str = "max",
    early_stopping_patience: int = 0,
    steps_per_dispatch: int = 1,
    unroll: int | bool = True,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    sharding_rules: parallel.ShardingRules | None = None,
    run_config: Mapping | None = None,
    hooks: Sequence[Hook] = (),
    profile_steps: tuple[int, int] | None = None,
) -> FitResult:
    """Trains `state` for `num_steps` steps and returns the result.

    If `workdir` holds a checkpoint, training resumes from it exactly (model,
    optimizer, RNG and data position); a finished run returns at once with the
    recorded metrics (`FitResult.was_finished`).

    `state` is consumed: its buffers are donated to the compiled step, so using it after
    `fit` raises "Array has been deleted". Continue from `result.state`, and take the
    trained model for inference from `result.model()` (eval mode) or `jdl.predict`.

    With a workdir, SIGTERM and SIGINT (preemption, `docker stop`, Ctrl-C) stop the run
    at the end of the chunk in flight: a checkpoint is written and waited for, the lock
    is released, one line says so, and `RunInterrupted` (a `SystemExit` with status 143
    or 130) is raised; the same command resumes bitwise where it stopped. A second
    signal exits at once (checkpoint writes are atomic, so nothing is left half-written).

    Args:
      state: initial state (its shapes, dtypes and shardings are the restore target).
      train_step: pure `(state, batch) -> (state, metrics)`, see `jdl.steps`.
      train_data: the training set, any `jdl.TrainData`: `InMemoryData` (on the device,
        batches drawn inside the compiled chunk), `StreamingData` (a grain pipeline),
        `IterableData` (your own Python iterator) — the last two feed each chunk program
        its `steps_per_dispatch` prefetched batches — or your own implementation of the
        protocol (see `jdl.data.pipeline.TrainData`).
      num_steps: total optimizer steps of the run.
      eval_step: per-example eval metrics `(state, batch) -> metrics`.
      eval_data: host arrays {"x", "y"} to evaluate on (not empty, finite).
      eval_every: evaluate every this many steps (0: only at the end).
      eval_batch_size: examples per eval batch (the tail is masked, not dropped).
      log_every: write train metrics every this many steps.
      workdir: run directory. It receives `config.json` and `run.json` (written once the
        restore checks pass, so a refused resume changes nothing), `metrics.jsonl`,
        TensorBoard events, `checkpoints/`, `curves.png` and `final.json` (this call's
        summary: step, train, eval, best, stopped_early). The run holds `workdir/.lock`
        throughout (see `jdl.lock`).
      checkpoint_every: save every this many steps (0: only at the end). Needs workdir.
        A state whose parameters are not finite or whose norm exploded (more than
        `EXPLODED_NORM_RATIO` times the last saved one) is never saved.
      max_to_keep: number of latest checkpoints kept.
      best_metric: eval metric name (e.g. "accuracy") that picks the best checkpoint
        and drives early stopping; the same name is used by `jdl.Checkpointer`.
      best_mode: "max" or "min" for `best_metric`.
      early_stopping_patience: stop after this many evaluations without a new best
        (0: never).
      steps_per_dispatch: training steps per compiled chunk.
      unroll: True (default) writes a chunk's steps out in full; an int U runs them in a
        rolled loop of U steps per iteration that skips nothing it need not run
        (faster compiles and no per-step select: best for dense models; slow for
        convolutions on CPU, see `make_chunk_runner`). With U=1 results do not depend
        on where log/eval/checkpoint boundaries cut chunks; with U > 1 they may differ
        in the last bits when a boundary is not a multiple of U.
      progress: show a progress bar.
      mesh: train on this device mesh (see `jdl.parallel`): the state is placed by
        `sharding_rules` (replicated, or FSDP-sharded when the mesh has an `fsdp` axis),
        the in-memory data arrays are placed on the mesh and every batch is split over
        its batch axes. None: a state already placed on a mesh keeps its placement,
        otherwise one device.
      sharding_rules: how parameters and optimizer state are sharded (default
        `jdl.parallel.ShardingRules()`); used only with `mesh`.
      run_config: the run's config (a dict or `ml_collections.ConfigDict`), recorded in
        `workdir/config.json`; None records `fit`'s own settings.
      hooks: periodic actions run at chunk boundaries after the log and eval of that step
        (see `jdl.hooks`): extra eval sets, saved predictions, custom stopping, your own.
        Chunks are cut at every hook's steps. A hook returning True stops the run after
        a checkpoint of that step; a hook's exception stops it with the checkpoints of
        earlier boundaries whole.
      profile_steps: (first, last): write a `jax.profiler` trace of these steps to
        `workdir/profile` (a `jdl.hooks.Profile` hook).

    Raises:
      NonFiniteLossError: a train loss, gradient norm or parameter norm was NaN/inf, or
        the parameters exploded; the message names the step and the checkpoint that
        remains. Nothing diverged is ever saved.
      RunInterrupted: SIGTERM or SIGINT arrived (with a workdir); a checkpoint was saved.
      jdl.UserError: bad data (labels outside the model's classes, empty or non-finite
        eval data) or a checkpoint of another model or data set-up, raised before
        anything in the workdir changes; an unknown `best_metric` (`UnknownMetricError`,
        at the first evaluation).
      jdl.parallel.ShardingError: the batch size does not split over the mesh's batch
        axes, or a sharding rule does not fit (raised before anything compiles).
      jdl.lock.WorkdirLockedError: another run uses `workdir`.
      jdl.checkpoint.CheckpointWriteError: a checkpoint could not be written (e.g. a full
        disk); the run stops, earlier checkpoints are intact and a rerun resumes.
    """
    _check_fit_arguments(
        num_steps, log_every, eval_every, checkpoint_every, steps_per_dispatch, unroll
    )
    _check_data(state, train_data, eval_data if eval_step is not None else None)
    state, shardings = parallel.place_for_fit(state, train_data, mesh, sharding_rules)
    started = time.perf_counter()
    main_eval = None
    if eval_step is not None and eval_data is not None:  # fit's own evaluation is a hook too
        main_eval = EvalSet(
            MAIN_EVAL, eval_step, eval_data, every=eval_every, batch_size=eval_batch_size,
            best_metric=best_metric, best_mode=best_mode, patience=early_stopping_patience,
        )  # fmt: skip
    hooks = _with_standard_hooks(hooks, main_eval, log_every, train_data.batch_size, profile_steps)
    settings = dict(num_steps=num_steps, batch_size=train_data.batch_size, eval_every=eval_every)
    settings |= dict(log_every=log_every, checkpoint_every=checkpoint_every)
    settings |= dict(best_metric=best_metric or "", steps_per_dispatch=steps_per_dispatch)
    checkpointer, restored = _open_workdir(
        workdir, state, train_data, run_config or settings, max_to_keep, best_metric, best_mode
    )
    run = _Run(hooks, main_eval, restored, state, started)
    if restored is not None and (run.step >= num_steps or run.stop_reason):
        _close_run((), checkpointer, None, train_data, failed=False)
        return _finish(workdir, run.result(finished=True), plot=False)
    saver = _GuardedSaver(checkpointer, train_data, run.state, run.step)
    if checkpointer is not None:  # last: it saves every other hook's state of the step
        hooks.append(_SaveCheckpoints(saver, checkpoint_every, hooks=hooks[:], main_eval=main_eval))
    logger = MetricLogger(
        workdir, total_steps=num_steps, start_step=run.step, progress=progress,
        enabled=jax.process_index() == 0,
    )  # fmt: skip
    if restored is not None:
        logger.message(f"resumed from the checkpoint at step {run.step}")
    _warn_if_schedule_is_shorter(train_step, num_steps, logger)
    run_chunk = make_chunk_runner(train_step, train_data, steps_per_dispatch, unroll, shardings)
    context = functools.partial(
        HookContext, num_steps=num_steps, workdir=workdir, logger=logger,
        is_writer=jax.process_index() == 0, shardings=shardings,
    )  # fmt: skip
    failed = True
    try:
        with _StopSignals(enabled=workdir is not None) as signals:
            _train(run, run_chunk, train_data, steps_per_dispatch, hooks, context, signals, saver)
        if run.stop_reason is not None:
            logger.message(f"stopped at step {run.step}: {run.stop_reason}")
        failed = False
    finally:
        _close_run(hooks, checkpointer, logger, train_data, failed=failed)
    return _finish(workdir, run.result(finished=False), plot=True)


def _train(run, run_chunk, data, steps_per_dispatch, hooks, context, signals, saver) -> None:
    """The loop: fused chunks between the boundaries the hooks ask for; at each boundary
    where a hook is due (or a signal arrived), the metrics are read back and the hooks
    called in order. Raises `RunInterrupted` after saving when a signal arrived."""
    num_steps = context.keywords["num_steps"]
    for hook in hooks:
        hook.on_start(context(step=run.step, state=run.state, train_metrics={}))
    while run.step < num_steps and run.stop_reason is None:
        stop = min(
            [run.step + steps_per_dispatch] + [h.next_due(run.step, num_steps) for h in hooks]
        )
        inputs = data.chunk_inputs(stop - run.step, steps_per_dispatch)
        state, metrics = run_chunk(run.state, inputs, jnp.int32(stop))
        run.advance(state, metrics, stop)
        due = any(hook.is_due(stop, num_steps) for hook in hooks)
        signum = signals.requested(at_sync_point=due)
        if not (due or signum):
            continue  # no host sync: the next chunk is queued behind this one
        run.flush(saver)  # a host sync; raises on a NaN loss
        at = context(step=stop, state=state, train_metrics=run.train_metrics)
        at.interrupted_by = signal.Signals(signum).name if signum else None
        run.call_hooks(hooks, at)
        if signum:
            saver.wait()  # the checkpoint is whole on disk before the process goes
            at.logger.message(
                f"stopped by {at.interrupted_by} at step {stop}; checkpoint saved; run the "
                "same command to resume"
            )
            raise RunInterrupted(signum, stop, stop)


def _with_standard_hooks(hooks, main_eval, log_every, batch_size, profile_steps) -> list[Hook]:
    """fit's keywords as hooks around the user's, in calling order:
    logging, the main evaluation, the user's hooks, profiling (the checkpoint hook is
    added last once the workdir is open)."""
    hooks = [
        LogTrainMetrics(log_every, batch_size=batch_size),
        *([main_eval] if main_eval else []),
        *hooks,
        *([Profile(profile_steps)] if profile_steps else []),
    ]
    _check_hook_names(hooks)
    return hooks


def _close_run(hooks, checkpointer, logger, data, *, failed: bool) -> None:
    for hook in hooks:
        hook.close()
    if checkpointer is not None:
        # Waits for async writes: the last good checkpoint is whole. After a failure
        # its own errors are only logged, so they cannot mask the first one.
        checkpointer.close(raise_errors=not failed)
    if logger is not None:
        logger.close()
    data.close()  # stops a stream's prefetch thread


def _finish(workdir: str | None, result: FitResult, *, plot: bool) -> FitResult:
    if workdir is not None and jax.process_index() == 0:
        if plot:
            plot_curves(workdir)
        _write_final(workdir, result)
    return result


def _check_hook_names(hooks: Sequence[Hook]) -> None:
    """Hooks that keep state are saved under their names: these must differ."""
    names = [hook.name for hook in hooks if hook.state_dict() is not None]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise HookError(
            f"two hooks keep state under the same name {twice[0]!r} (fit's own evaluation "
            f"is {MAIN_EVAL!r}); give them different names"
        )


def _open_workdir(
    workdir: str | None,
    state: TrainState,
    data: TrainData,
    config: Mapping,
    max_to_keep: int,
    best_metric: str | None,
    best_mode: str,
) -> tuple[Checkpointer | None, Restored | None]:
    """The run's checkpointer and the checkpoint it resumes from (None, None without a
    workdir). The start records are written after the restore checks passed, so a
    refused resume changes nothing."""
    if workdir is None:
        return None, None
    checkpointer = Checkpointer(
        f"{workdir}/checkpoints",
        max_to_keep=max_to_keep,
        best_metric=best_metric,
        best_mode=best_mode,
    )
    try:
        restored = _maybe_resume(checkpointer, state, data)
    except BaseException:
        checkpointer.close(raise_errors=False)
        raise
    if jax.process_index() == 0:
        _write_start_records(workdir, config, fresh=restored is None)
    return checkpointer, restored


def make_chunk_runner(
    train_step: TrainStep,
    data: TrainData,
    length: int,
    unroll: int | bool = True,
    shardings: parallel.ChunkShardings | None = None,
) -> Callable:
    """Compiles `length` train steps into one program: `(state, inputs, stop) -> (state, metrics)`.

    `data` is any `jdl.TrainData`; the program is called as `run_chunk(state,
    data.chunk_inputs(count, length), stop)`: for `InMemoryData` the inputs are the stored
    arrays, for `StreamingData` the chunk's `length` batches. Before the loop the program
    computes every step's inputs (`data.program.step_inputs`: the example indices, or the
    stacked batches); step i trains on `data.program.step_batch(inputs, xs[i])`.

    Steps at or past `stop` leave the state unchanged, so one program serves every
    chunk, including those cut short by a log or eval boundary. With an integer
    `unroll` < `length` the program is a rolled `while` loop (blocks of `unroll` steps)
    that runs only the steps before `stop`; written out in full, every step runs and
    the updates of those past `stop` are discarded with a select. Returned metrics are
    stacked per step, shape (length,), zero where skipped. The state argument is
    donated; the data argument is not (a short host-fed chunk repeats its last batch).

    `unroll=True` (the default) writes the steps out as straight-line code. On XLA:CPU a
    convolution inside a loop or conditional body runs one to two orders of magnitude
    slower than at the top level (see BENCHMARKS.md), so the train step is never put
    under `lax.cond`, and a rolled loop (`unroll=1`) is only worth it for models without
    convolutions (or with `CNN(cpu_kernels=True)`), where it compiles faster and skips
    the select.

    The jitted program is cached per (train_step, data.program, length, loop form,
    shardings), so calling `fit` again with the same step function and data set-up does
    not trace or compile again. The cache holds no arrays (a program is array-free) and
    lets go when `train_step` is garbage collected. `shardings` (a
    `jdl.parallel.ChunkShardings`, from `fit`'s mesh) pins the batches to the mesh's batch
    axes and the state to its input layout; None: one device.

    Raises:
      jdl.data.pipeline.TrainDataError: `data` is not a `TrainData`, or its program is
        not hashable.
    """
    program = check_train_data(data).program
    written_out = unroll is True or unroll >= length
    # `True == 1` in Python: a key holding `unroll` itself would hand a rolled request the
    # written-out program (or the reverse).
    form = "written out" if written_out else ("rolled", int(unroll))
    return _cached_on(
        train_step,
        (program, length, form, shardings),
        lambda: _build_chunk_program(train_step, program, length, unroll, shardings),
    )


def _cached_on(fn: Callable, key, build: Callable[[], Callable]) -> Callable:
    """`build()`, memoised in a dict kept on `fn` itself under `key`.

    The cache goes when `fn` goes (a global weak-keyed cache would keep `fn` alive through
    the compiled programs' closures). A callable that takes no attributes (e.g. one with
    `__slots__`) gets a fresh build each time.
    """
    cache = getattr(fn, _CACHE_ATTRIBUTE, None)
    if cache is None:
        cache = {}
        try:
            setattr(fn, _CACHE_ATTRIBUTE, cache)
        except (AttributeError, TypeError):
            pass
    if key not in cache:
        cache[key] = build()
    return cache[key]


_CACHE_ATTRIBUTE = "_jdl_chunk_runners"


def _build_chunk_program(
    train_step: TrainStep,
    program: DataProgram,
    length: int,
    unroll: int | bool,
    shardings: parallel.ChunkShardings | None,
) -> Callable:
    """The jitted, state-donating `(state, inputs, stop) -> (state, metrics)` of a chunk.

    `program.step_inputs(state.step, inputs, length)` gives the per-step inputs, leading
    axis `length`, before the loop (so a loop body only gathers its row: no reshuffle
    conditional, no permutation carried); `program.step_batch(inputs, xs[i])` is step i's
    batch.
    """
    keep_state, keep_batch, keep_scalars = _keepers(shardings)

    def run_chunk(state: TrainState, inputs, stop):
        def one_step(state, step_input):
            state, metrics = train_step(state, keep_batch(program.step_batch(inputs, step_input)))
            return keep_state(state), metrics

        xs = program.step_inputs(state.step, inputs, length)
        state, metrics = _run_steps(one_step, state, xs, stop, length, unroll)
        return keep_state(state), keep_scalars(metrics)  # a loop body's constraint ends inside

    return jax.jit(run_chunk, donate_argnums=(0,), compiler_options=_compiler_options(shardings))


def _compiler_options(shardings: parallel.ChunkShardings | None) -> dict[str, str]:
    """jdl's XLA options (`jdl.compiler`) for a program on the mesh of `shardings`."""
    platform = None if shardings is None else next(iter(shardings.batch.device_set)).platform
    return compiler.compiler_options(platform)


def _keepers(shardings: parallel.ChunkShardings | None) -> tuple[Callable, Callable, Callable]:
    """(keep_state, keep_batch, keep_scalars): the sharding constraints of a chunk program.

    On a mesh they pin each step's batch to the batch axes and keep the state in its
    input layout, so the output can be donated and fed back without recompiling; on one
    device they change nothing.
    """
    if shardings is None:
        same = lambda tree: tree
        return same, same, same
    return shardings.constrain_state, shardings.constrain_batch, shardings.constrain_scalars


def _run_steps(one_step: Callable, state: TrainState, xs, stop, length: int, unroll):
    """Runs `one_step(state, xs[i]) -> (state, metrics)` for the chunk's steps before `stop`.

    Returns the state and the metrics stacked per step, shape (length, ...), zero for
    steps at or past `stop` (which leave the state unchanged).

    - `unroll` an int smaller than `length` (a rolled loop): `while` loops over exactly
      the steps to take (a traced trip count), so nothing is computed for skipped steps
      and nothing is selected. The body holds `unroll` steps; a count that is not a
      multiple of it ends with single steps in a second loop. With `unroll=1` every step
      of every chunk, cut or not, runs the very same compiled body.
    - `True` or >= `length` (straight-line code, what convolutions need on XLA:CPU; see
      `make_chunk_runner`): every step runs and the steps at or past `stop` are
      discarded with a select of the state, as a trip count cannot be written out.
    """
    if unroll is not True and unroll < length:
        return _run_steps_while(one_step, state, xs, stop, length, unroll)

    def masked_step(state, x):
        active = state.step < stop
        new_state, metrics = one_step(state, x)
        state = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state)
        return state, jax.tree.map(lambda value: jnp.where(active, value, 0), metrics)

    # Fully unrolled: XLA removes the one-trip loop, leaving the steps written out.
    return jax.lax.scan(masked_step, state, xs, length=length, unroll=True)


def _run_steps_while(one_step: Callable, state: TrainState, xs, stop, length: int, unroll: int):
    """`_run_steps` as `while` loops over the `clip(stop - step, 0, length)` steps to take."""
    first = jax.tree.map(lambda x: x[0], xs)
    metric_shapes = jax.eval_shape(one_step, state, first)[1]
    stacked = jax.tree.map(lambda m: jnp.zeros((length, *m.shape), m.dtype), metric_shapes)
    count = jnp.clip(stop - state.step, 0, length)

    def step_at(i, carry):
        state, stacked = carry
        state, metrics = one_step(state, jax.tree.map(lambda x: x[i], xs))
        stacked = jax.tree.map(lambda buffer, value: buffer.at[i].set(value), stacked, metrics)
        return state, stacked

    def block_at(block, carry):  # `unroll` steps written out: XLA may fuse across them
        for offset in range(unroll):
            carry = step_at(block * unroll + offset, carry)
        return carry

    blocks = count // unroll
    carry = jax.lax.fori_loop(0, blocks, block_at, (state, stacked))
    if unroll > 1:
        carry = jax.lax.fori_loop(blocks * unroll, count, step_at, carry)
    return carry


def make_evaluator(
    eval_step: EvalStep,
    batch_size: int,
    shardings: parallel.ChunkShardings | None = None,
) -> Callable:
    """Returns `evaluate(state, arrays) -> {name: mean}` over a whole eval set.

    The set is padded to a whole number of batches and the padding is masked out, so
    every example counts exactly once. Compiles once per eval-set size; the evaluator is
    cached on `eval_step` (like the chunk programs), so repeated `fit` calls reuse it.
    With `shardings` (a mesh's, from `fit`), each eval batch is split over the mesh's
    batch axes when its size allows, so every device evaluates its share only.
    """
    return _cached_on(
        eval_step,
        ("evaluator", batch_size, shardings),
        lambda: _build_evaluator(eval_step, batch_size, shardings),
    )


def _build_evaluator(
    eval_step: EvalStep, batch_size: int, shardings: parallel.ChunkShardings | None
) -> Callable:

    @functools.partial(jax.jit, compiler_options=_compiler_options(shardings))
    def evaluate_padded(state, arrays, mask):
        def one_batch(batch_and_mask):
            batch, batch_mask = batch_and_mask
            values = eval_step(state, batch)
            return {
                name: jnp.sum(jnp.broadcast_to(value, batch_mask.shape) * batch_mask)
                for name, value in values.items()
            }

        sums = jax.lax.map(one_batch, (arrays, mask))
        count = jnp.sum(mask)
        return {name: jnp.sum(total) / count for name, total in sums.items()}

    def evaluate(state: TrainState, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        num = len(next(iter(arrays.values())))
        size = min(batch_size, num)
        num_batches = -(-num // size)
        pad = num_batches * size - num
        mask = np.concatenate([np.ones(num, np.float32), np.zeros(pad, np.float32)])
        batched = {
            name: np.concatenate([value, np.repeat(value[:1], pad, axis=0)]).reshape(
                (num_batches, size) + value.shape[1:]
            )
            for name, value in arrays.items()
        }
        mask = mask.reshape(num_batches, size)
        if shardings is not None:  # rows of each batch (axis 1) over the batch axes
            batched, mask = parallel.place_batches((batched, mask), shardings.batch)
        means = evaluate_padded(state, batched, mask)
        return {name: float(value) for name, value in jax.device_get(means).items()}

    return evaluate


def _maybe_resume(
    checkpointer: Checkpointer, state: TrainState, data: TrainData
) -> Restored | None:
    """The restored checkpoint (data position checked and set), or None for a fresh run."""
    if checkpointer.latest_step() is None:
        return None
    restored = checkpointer.restore(state)
    data.restore_data_state(restored.data_state)
    return restored


class _StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop at the next chunk boundary.

    Installed for the training loop only, on the main thread (the only one Python lets
    set handlers) and only when there is a workdir to save into; the previous handlers
    come back on exit. A second signal exits the process at once with status 128 +
    signal: checkpoints are written to a temporary folder and renamed when whole, so
    nothing on disk is left half-written, and the next run cleans up.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if self.enabled:
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:  # None: a handler not set from Python; leave ours
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name} received: finishing the chunk in flight and "
            "saving a checkpoint (send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, *, at_sync_point: bool) -> int | None:
        """The signal to stop for, or None.

        With several processes every one must stop at the same step and take part in the
        save, so they agree (an all-gather of the flags) at boundaries where the host
        waits for the device anyway (log, eval, checkpoint), never inside a run of
        chunks: a signal is acted on at the next such boundary.
        """
        if jax.process_count() == 1:
            return self.received
        if not at_sync_point:
            return None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.received or 0))
        return int(np.max(flags)) or None


class _Run:
    """Where a run stands: its state and step, the train metrics not yet flushed, the
    latest flushed means, why it stopped, and its hooks' remembered state (restored
    from the checkpoint a run resumes from).

    A checkpoint's run item is `{"train_metrics", "stopped", "hooks": {name: state}}`;
    older checkpoints kept the main evaluation's history and best at its top level (and
    before that, the best in the data position): they load the same."""

    def __init__(self, hooks, main_eval: EvalSet | None, restored, state, started: float):
        run_state = restored.run_state if restored is not None else {}
        data_state = restored.data_state if restored is not None else {}
        self.state = restored.state if restored is not None else state
        self.step = int(self.state.step)
        self.main_eval, self.started = main_eval, started
        self.train_metrics = dict(run_state.get("train_metrics", {}))
        self.stop_reason: str | None = run_state.get("stopped")
        self.pending: list[tuple[Metrics, int, int]] = []
        saved = run_state.get("hooks")
        if saved is None:  # an older layout
            tracker = run_state.get("best_tracker", data_state.get("best_tracker", {}))
            saved = {
                MAIN_EVAL: {"history": run_state.get("eval_history", []), "best_tracker": tracker}
            }
        for hook in hooks:
            if hook.name in saved and hook.state_dict() is not None:
                hook.load_state_dict(saved[hook.name])
        if main_eval is not None and main_eval.tracker is not None and main_eval.out_of_patience:
            self.stop_reason = self.stop_reason or "early stopping"  # an older layout's stop

    def advance(self, state: TrainState, metrics: Metrics, step: int) -> None:
        """Takes a chunk's result (nothing read back from the device)."""
        self.pending.append((metrics, self.step, step - self.step))
        self.state, self.step = state, step

    def flush(self, saver: _GuardedSaver) -> None:
        """Reads the pending metrics back (a host sync); raises on a NaN loss."""
        flushed = _flush_or_explain(self.pending, saver)
        self.pending = []
        self.train_metrics = flushed.means
        saver.note_param_norm(flushed.last.get("param_norm"))

    def call_hooks(self, hooks: Sequence[Hook], context: HookContext) -> None:
        """Calls, in order, the hooks that want this boundary; the first that asks to stop
        sets the stop reason (later hooks see it, the checkpoint hook saves for it)."""
        for hook in hooks:
            if not hook.wants_call(context):
                continue
            said = hook(context)
            if said and context.stop_reason is None:
                context.stop_reason = (
                    said if isinstance(said, str) else (f"hook {hook.name} asked to stop")
                )
        self.stop_reason = context.stop_reason

    def result(self, *, finished: bool) -> FitResult:
        main = self.main_eval
        return FitResult(
            state=self.state,
            step=self.step,
            train_metrics=dict(self.train_metrics),
            eval_history=list(main.history) if main is not None else [],
            best=main.best if main is not None else None,
            stopped_early=self.stop_reason is not None,
            seconds=time.perf_counter() - self.started,
            was_finished=finished,
        )


def _run_item(context: HookContext, hooks: Sequence[Hook]) -> dict:
    """A checkpoint's run item: the latest train metrics, why the run stopped (None while
    it goes on) and the state of every hook that keeps some, by name."""
    states = {hook.name: hook.state_dict() for hook in hooks}
    return jsonio.to_json_safe(
        {
            "train_metrics": dict(context.train_metrics),
            "stopped": context.stop_reason,
            "hooks": {name: state for name, state in states.items() if state is not None},
        }
    )


class _SaveCheckpoints(Hook):
    """Saves a checkpoint every `every` steps, at the end, at a new best of the main
    evaluation, and whenever the run stops (a hook asked, a signal arrived). It comes
    last, so the run item it saves holds every hook's state of this step."""

    def __init__(
        self, saver: _GuardedSaver, every: int, *, hooks: Sequence[Hook], main_eval: EvalSet | None
    ):
        super().__init__(every=every, at_end=True, name="checkpoint")
        self.saver, self.hooks, self.main_eval = saver, hooks, main_eval

    def wants_call(self, context: HookContext) -> bool:
        main = self.main_eval
        new_best = main is not None and MAIN_EVAL in context.evaluations and main.improved
        stopping = context.stop_reason is not None or context.interrupted_by is not None
        return super().wants_call(context) or new_best or stopping

    def __call__(self, context: HookContext) -> None:
        run_item = _run_item(context, self.hooks)
        self.saver.save(context.step, context.state, run_item, context.eval_metrics)


class _GuardedSaver:
    """Saves checkpoints, but never one of a diverged state.

    A state whose parameter norm is not finite, or grew more than `EXPLODED_NORM_RATIO`
    times since the last good save (or the start of this call), is refused with a
    `NonFiniteLossError` that names the checkpoint that remains: a rerun must not resume
    from exploded weights. The norm is the step's `param_norm` metric when the train
    step reports it (no extra work), else one reduction at save time.
    """

    def __init__(self, checkpointer: Checkpointer | None, data, state: TrainState, step: int):
        self.checkpointer = checkpointer
        self.data = data
        self.last_norm: float | None = None
        self.reference: tuple[int, float] | None = None
        if checkpointer is not None:
            self.reference = (step, _global_norm(state.params))

    def note_param_norm(self, norm: float | None) -> None:
        self.last_norm = norm

    def save(self, step: int, state: TrainState, run_state: dict, eval_metrics) -> None:
        norm = self.last_norm if self.last_norm is not None else _global_norm(state.params)
        reference_step, reference = self.reference
        if not (np.isfinite(norm) and norm <= EXPLODED_NORM_RATIO * max(reference, 1.0)):
            what = "are not finite" if not np.isfinite(norm) else "exploded"
            raise NonFiniteLossError(
                f"the parameters {what} at step {step} (norm {norm:.3g}, was {reference:.3g} "
                f"at step {reference_step}); this state was not saved. " + self.what_remains()
            )
        self.checkpointer.save(
            step,
            state,
            data_state=jsonio.to_json_safe(self.data.data_state(step)),
            run_state=run_state,
            metrics=eval_metrics,
        )
        self.reference, self.last_norm = (step, norm), None

    def wait(self) -> None:
        self.checkpointer.wait()

    def what_remains(self) -> str:
        """Which checkpoint a rerun resumes from, and what to change first."""
        advice = "lower the learning rate or clip gradients (clip_norm)"
        if self.checkpointer is None:
            return f"No workdir, nothing saved: {advice} and run again."
        try:
            self.checkpointer.wait()
        except CheckpointWriteError:
            pass  # the write that failed is not a checkpoint; the listing below is true
        steps = self.checkpointer.all_steps()
        if not steps:
            return f"No checkpoint was kept: {advice} and run again."
        return (
            f"The checkpoint at step {max(steps)} in {self.checkpointer.directory} holds no "
            f"diverged state: {advice} and run again with the same workdir to resume from it "
            "(or start a new run from its weights with init_from)."
        )


@jax.jit
def _global_norm_on_device(tree) -> jax.Array:
    return optax.global_norm(tree)


def _global_norm(tree) -> float:
    return float(_global_norm_on_device(tree))  # note: a host sync; only at saves


@dataclasses.dataclass
class _Flushed:
    means: dict[str, float]  # each metric's mean over the steps flushed
    last: dict[str, float]  # each metric at the last step flushed


def _flush_or_explain(pending: list[tuple[Metrics, int, int]], saver: _GuardedSaver) -> _Flushed:
    """`_flush_train_metrics`, its divergence error completed with what a rerun resumes from."""
    try:
        return _flush_train_metrics(pending)
    except NonFiniteLossError as error:
        raise NonFiniteLossError(f"{error} {saver.what_remains()}") from None


def _flush_train_metrics(pending: list[tuple[Metrics, int, int]]) -> _Flushed:
    """Means and last values of the steps' metrics since the last flush; raises on a
    non-finite loss or gradient norm."""
    host = jax.device_get([metrics for metrics, _, _ in pending])  # note: a host sync point
    per_step: dict[str, list[np.ndarray]] = {}
    for metrics, (_, first_step, count) in zip(host, pending, strict=True):
        for name in ("loss", "grad_norm"):
            values = metrics.get(name)
            if values is None:
                continue
            bad = ~np.isfinite(values[:count])
            if bad.any() and "skipped_steps" not in metrics:
                at = first_step + int(np.argmax(bad)) + 1
                raise NonFiniteLossError(
                    f"train {name} is {values[int(np.argmax(bad))]} at step {at}; stopping. "
                    "Lower the learning rate, enable gradient clipping, or skip such steps "
                    "(skip_nonfinite)."
                )
        for name, values in metrics.items():
            per_step.setdefault(name, []).append(values[:count])
    means, last = {}, {}
    for name, chunks in per_step.items():
        values = np.concatenate(chunks)
        last[name] = float(values[-1]) if values.size else float("nan")
        if name == "skipped_steps":
            means[name] = float(values.sum())
        else:
            finite = values[np.isfinite(values)]
            means[name] = float(finite.mean()) if finite.size else float("nan")
    return _Flushed(means=means, last=last)


def _check_data(state: TrainState, train_data, eval_data: Mapping | None) -> None:
    """Host checks, once, before anything compiles or touches the workdir: eval data not
    empty and finite; integer labels within the model's classes (train and eval)."""
    splits = {}
    if eval_data is not None:
        _check_eval_data(eval_data)
        splits["eval_data"] = eval_data
    train_arrays = getattr(train_data, "arrays", None)  # in-memory data: all of it is here
    if isinstance(train_arrays, Mapping):
        splits["train data"] = train_arrays
    num_classes = None
    for where, split in splits.items():
        x, y = split.get("x"), split.get("y")
        if x is None or y is None or not _host_readable(y):
            continue
        if not np.issubdtype(np.dtype(y.dtype), np.integer):
            continue
        if num_classes is None:
            num_classes = _model_classes(state, x, y)
        if num_classes:
            check_labels(np.asarray(y), num_classes, where=where)


def _check_eval_data(eval_data: Mapping) -> None:
    if not isinstance(eval_data, Mapping) or not eval_data:
        raise EmptyDataError(
            f"eval_data must be a dict of arrays such as {{'x': ..., 'y': ...}}, got "
            f"{type(eval_data).__name__}"
        )
    sizes = {name: len(value) for name, value in eval_data.items()}
    if len(set(sizes.values())) != 1:
        raise EmptyDataError(f"eval_data arrays disagree on the number of examples: {sizes}")
    if not next(iter(sizes.values())):
        raise EmptyDataError(
            "eval_data has no examples; pass a non-empty evaluation split, or no eval_step"
        )
    check_finite(
        {name: value for name, value in eval_data.items() if _host_readable(value)},
        where="eval_data",
    )


def _host_readable(value) -> bool:
    return not (isinstance(value, jax.Array) and not value.is_fully_addressable)


def _model_classes(state: TrainState, x, y) -> int | None:
    """The number of classes the model predicts for labels shaped like `y`, or None when
    its output is not per-label logits (a regression, a model that needs more inputs).

    Only shapes are traced (`jax.eval_shape`): nothing compiles or runs.
    """
    example = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
    try:
        out = jax.eval_shape(lambda s, inputs: s.model()(inputs), state, example)
    except Exception:  # noqa: BLE001 - a model this check does not understand is not an error
        return None
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) < 2 or tuple(shape[:-1]) != (1, *y.shape[1:]):
        return None
    return int(shape[-1])


def _warn_if_schedule_is_shorter(train_step, num_steps: int, logger: MetricLogger) -> None:
    """One warning line when the step's learning-rate schedule ends before the run."""
    schedule = getattr(train_step, "lr_schedule", None)
    horizon = getattr(schedule, "total_steps", None)
    if horizon is not None and num_steps > horizon:
        logger.message(
            f"warning: the learning-rate schedule spans {horizon} steps but the run has "
            f"{num_steps}; after step {horizon} the rate stays at its final value (pass "
            "total_steps=num_steps to make_optimizer)"
        )


def _write_start_records(workdir: str, config: Mapping, *, fresh: bool) -> None:
    """config.json and run.json (see `jdl.write_run_record`); a fresh start also drops a
    final.json left by an earlier run whose checkpoints are gone."""
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(dict(config))
    write_run_record(workdir, config, sys.argv[1:])
    final = os.path.join(workdir, FINAL_FILE)
    if fresh and os.path.exists(final):
        os.remove(final)


FINAL_FILE = "final.json"


def _write_final(workdir: str | None, result: FitResult) -> None:
    """Merges this call's summary into `workdir/final.json` (keeping keys others wrote)."""
    if workdir is None or jax.process_index() != 0:
        return
    path = os.path.join(workdir, FINAL_FILE)
    record = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {}  # torn by a crash: rewritten whole below
    record.update(
        step=result.step,
        train=result.train_metrics,
        eval=result.eval_history[-1] if result.eval_history else None,
        best=result.best,
        stopped_early=result.stopped_early,
    )
    record.pop(jsonio.NONFINITE_KEY, None)
    jsonio.write_json(path, record)


class FitArgumentError(UserError, ValueError):
    """A `fit` setting is out of range (e.g. `num_steps=0`, `unroll=False`)."""


def _check_fit_arguments(
    num_steps, log_every, eval_every, checkpoint_every, steps_per_dispatch, unroll
):
    for name, value, minimum in (
        ("num_steps", num_steps, 1),
        ("log_every", log_every, 0),
        ("eval_every", eval_every, 0),
        ("checkpoint_every", checkpoint_every, 0),
        ("steps_per_dispatch", steps_per_dispatch, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise FitArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if unroll is not True and (
        isinstance(unroll, bool) or not isinstance(unroll, int | np.integer) or unroll < 1
    ):
        raise FitArgumentError(
            f"unroll must be True (steps written out) or an integer >= 1, got {unroll!r}"
        )
