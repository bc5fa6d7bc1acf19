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
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jdl import compiler, parallel
from jdl.checkpoint import Checkpointer
from jdl.data.pipeline import BatchSampler, InMemoryData, StreamingData
from jdl.errors import UserError
from jdl.lock import WorkdirLock
from jdl.logging import MetricLogger, plot_curves
from jdl.state import TrainState
from jdl.steps import EvalStep, Metrics, TrainStep


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss or gradient."""


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the final training state (on device).
      step: the final step.
      train_metrics: means of the train metrics over the last logged interval.
      eval_history: one dict per evaluation, with "step".
      best: the best evaluation by `best_metric` (or None).
      stopped_early: True when early stopping ended the run.
      seconds: wall time of this call (restore, compile and training included).
    """

    state: TrainState
    step: int
    train_metrics: dict[str, float]
    eval_history: list[dict[str, float]]
    best: dict[str, float] | None
    stopped_early: bool
    seconds: float


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
    train_data: InMemoryData | StreamingData,
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
) -> FitResult:
    """Trains `state` for `num_steps` steps and returns the result.

    If `workdir` holds a checkpoint, training resumes from it exactly (model,
    optimizer, RNG and data position); a finished run returns at once.

    Args:
      state: initial state (its shapes, dtypes and shardings are the restore target).
      train_step: pure `(state, batch) -> (state, metrics)`, see `jdl.steps`.
      train_data: the training set: `InMemoryData` (on the device, batches drawn inside
        the compiled chunk) or `StreamingData` (host pipeline; each chunk program takes
        its `steps_per_dispatch` prefetched batches as input).
      num_steps: total optimizer steps of the run.
      eval_step: per-example eval metrics `(state, batch) -> metrics`.
      eval_data: host arrays {"x", "y"} to evaluate on.
      eval_every: evaluate every this many steps (0: only at the end).
      eval_batch_size: examples per eval batch (the tail is masked, not dropped).
      log_every: write train metrics every this many steps.
      workdir: run directory for metrics, TensorBoard, checkpoints, curves. The run
        holds `workdir/.lock` throughout (see `jdl.lock`).
      checkpoint_every: save every this many steps (0: only at the end). Needs workdir.
      max_to_keep: number of latest checkpoints kept.
      best_metric: eval metric name (e.g. "accuracy") that picks the best checkpoint
        and drives early stopping.
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

    Raises:
      NonFiniteLossError: a train loss or gradient norm was NaN/inf; the message names
        the step and metric. Checkpoints written before it are kept.
      jdl.parallel.ShardingError: the batch size does not split over the mesh's batch
        axes, or a sharding rule does not fit (raised before anything compiles).
      jdl.lock.WorkdirLockedError: another run uses `workdir`.
      jdl.checkpoint.CheckpointWriteError: a checkpoint could not be written (e.g. a full
        disk); the run stops, earlier checkpoints are intact and a rerun resumes.
    """
    _check_fit_arguments(num_steps, log_every, eval_every, checkpoint_every, steps_per_dispatch)
    state, shardings = parallel.place_for_fit(state, train_data, mesh, sharding_rules)
    started = time.perf_counter()
    checkpointer, resumed_json = None, {}
    if workdir is not None:
        checkpointer = Checkpointer(
            f"{workdir}/checkpoints",
            max_to_keep=max_to_keep,
            best_metric=best_metric and f"eval/{best_metric}",
            best_mode=best_mode,
        )
        state, resumed_json = _maybe_resume(checkpointer, state, train_data)
    start_step = int(state.step)
    logger = MetricLogger(
        workdir,
        total_steps=num_steps,
        start_step=start_step,
        progress=progress,
        enabled=jax.process_index() == 0,
    )
    if resumed_json:
        logger.message(f"resumed from the checkpoint at step {start_step}")
    run_chunk = make_chunk_runner(train_step, train_data, steps_per_dispatch, unroll, shardings)
    run_eval = None
    if eval_step is not None:
        run_eval = make_evaluator(eval_step, eval_batch_size, shardings)
    tracker = _BestTracker(best_metric, best_mode, early_stopping_patience)
    tracker.load(resumed_json.get("best_tracker", {}))
    pending: list[tuple[Metrics, int, int]] = []
    train_metrics: dict[str, float] = {}
    eval_history: list[dict[str, float]] = []
    step, interval_start, interval_time = start_step, start_step, time.perf_counter()
    try:
        while step < num_steps and not tracker.should_stop:
            stop = _next_boundary(
                step, num_steps, steps_per_dispatch, log_every, eval_every, checkpoint_every
            )
            inputs = train_data.chunk_inputs(stop - step, steps_per_dispatch)
            state, chunk_metrics = run_chunk(state, inputs, jnp.int32(stop))
            pending.append((chunk_metrics, step, stop - step))
            step = stop
            is_last = step == num_steps
            if _due(step, log_every) or is_last or _due(step, checkpoint_every):
                train_metrics = _flush_train_metrics(pending)  # raises on NaN
                pending = []
                elapsed = time.perf_counter() - interval_time
                rate = (step - interval_start) * train_data.batch_size / max(elapsed, 1e-9)
                logger.write(
                    step,
                    {f"train/{k}": v for k, v in train_metrics.items()}
                    | {"train/samples_per_second": rate},
                )
                logger.advance(
                    step - interval_start, samples_per_second=rate, loss=train_metrics.get("loss")
                )
                interval_start, interval_time = step, time.perf_counter()
            eval_metrics = None
            if (
                run_eval is not None
                and eval_data is not None
                and (_due(step, eval_every) or is_last)
            ):
                eval_metrics = run_eval(state, eval_data)
                logger.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                eval_history.append({"step": step, **eval_metrics})
                tracker.update(step, eval_metrics)
            new_best = eval_metrics is not None and tracker.improved
            if checkpointer is not None and (
                _due(step, checkpoint_every) or is_last or tracker.should_stop or new_best
            ):
                checkpointer.save(
                    step,
                    state,
                    data_state={**train_data.data_state(step), "best_tracker": tracker.dump()},
                    metrics=None
                    if eval_metrics is None
                    else {f"eval/{k}": v for k, v in eval_metrics.items()},
                )
        if tracker.should_stop:
            logger.message(
                f"early stopping at step {step}: no better eval {best_metric} than "
                f"{tracker.best[best_metric]:.4f} (step {tracker.best['step']}) for "
                f"{early_stopping_patience} evaluations"
            )
    finally:
        if checkpointer is not None:
            checkpointer.close()  # waits for async writes: the last good checkpoint is whole
        logger.close()
        train_data.close()  # stops a stream's prefetch thread
    if workdir is not None and jax.process_index() == 0:
        plot_curves(workdir)
    return FitResult(
        state=state,
        step=step,
        train_metrics=train_metrics,
        eval_history=eval_history,
        best=tracker.best,
        stopped_early=tracker.should_stop,
        seconds=time.perf_counter() - started,
    )


def make_chunk_runner(
    train_step: TrainStep,
    data: InMemoryData | BatchSampler | StreamingData,
    length: int,
    unroll: int | bool = True,
    shardings: parallel.ChunkShardings | None = None,
) -> Callable:
    """Compiles `length` train steps into one program: `(state, arrays, stop) -> (state, metrics)`.

    Steps at or past `stop` leave the state unchanged, so one program serves every
    chunk, including those cut short by a log or eval boundary. With an integer
    `unroll` < `length` the program is a rolled `while` loop (blocks of `unroll` steps)
    that runs only the steps before `stop`; written out in full, every step runs and
    the updates of those past `stop` are discarded with a select. Either way the example
    indices of the whole chunk are computed before the loop. Returned metrics are
    stacked per step, shape (length,), zero where skipped. The state argument is
    donated.

    For a `StreamingData` the program is `(state, batches, stop)` instead, with
    `batches` the tuple of `length` batches from `data.chunk_inputs`; both kinds are
    called as `run_chunk(state, data.chunk_inputs(count, length), stop)`.

    `unroll=True` (the default) writes the steps out as straight-line code. On XLA:CPU a
    convolution inside a loop or conditional body runs one to two orders of magnitude
    slower than at the top level (see BENCHMARKS.md), so the train step is never put
    under `lax.cond`, and a rolled loop (`unroll=1`) is only worth it for models without
    convolutions (or with `CNN(cpu_kernels=True)`), where it compiles faster and skips
    the select.

    The jitted program is cached per (train_step, sampler, length, unroll, shardings), so
    calling `fit` again with the same step function and data set-up does not trace or
    compile again. The cache holds no arrays and lets go when `train_step` is garbage
    collected. `shardings` (a `jdl.parallel.ChunkShardings`, from `fit`'s mesh) pins the
    batches to the mesh's batch axes and the state to its input layout; None: one device.
    """
    streaming = isinstance(data, StreamingData)
    sampler = data.sampler if isinstance(data, InMemoryData) else data
    key = ("streaming" if streaming else sampler, length, unroll, shardings)
    if streaming:
        return _cached_on(
            train_step,
            key,
            lambda: _build_streaming_chunk_runner(train_step, length, unroll, shardings),
        )
    return _cached_on(
        train_step,
        key,
        lambda: _build_chunk_runner(train_step, sampler, length, unroll, shardings),
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


def _build_chunk_runner(
    train_step: TrainStep,
    data: BatchSampler,
    length: int,
    unroll: int | bool,
    shardings: parallel.ChunkShardings | None = None,
) -> Callable:
    """`(state, arrays, stop) -> (state, metrics)` for batches drawn on the device.

    Every step's example indices are computed before the loop (`chunk_indices`), so the
    loop body only gathers its rows: no reshuffle conditional, no permutation carried.
    """
    return _build_chunk_program(
        train_step,
        length,
        unroll,
        shardings,
        steps_inputs=lambda state, arrays: data.chunk_indices(state.step, length),
        batch_of=data.take_batch,
    )


def _build_streaming_chunk_runner(
    train_step: TrainStep,
    length: int,
    unroll: int | bool,
    shardings: parallel.ChunkShardings | None = None,
) -> Callable:
    """`(state, batches, stop) -> (state, metrics)` for batches fed from the host.

    `batches` is a tuple of `length` batch dicts (`StreamingData.chunk_inputs`); step i
    trains on `batches[i]`. Like `_build_chunk_runner`: steps at or past `stop` change
    nothing, metrics are stacked per step, the state is donated, and one compile serves
    every chunk. The batches are not donated: a short chunk repeats its last batch.
    """
    return _build_chunk_program(
        train_step,
        length,
        unroll,
        shardings,
        steps_inputs=lambda state, batches: jax.tree.map(
            lambda *values: jnp.stack(values), *batches
        ),
        batch_of=lambda batches, batch: batch,
    )


def _build_chunk_program(
    train_step: TrainStep,
    length: int,
    unroll: int | bool,
    shardings: parallel.ChunkShardings | None,
    *,
    steps_inputs: Callable,
    batch_of: Callable,
) -> Callable:
    """The jitted, state-donating `(state, data, stop) -> (state, metrics)` of a chunk.

    `steps_inputs(state, data)` gives the per-step inputs, leading axis `length`, before
    the loop; `batch_of(data, inputs[i])` is step i's batch.
    """
    keep_state, keep_batch, keep_scalars = _keepers(shardings)

    def run_chunk(state: TrainState, data, stop):
        def one_step(state, step_input):
            state, metrics = train_step(state, keep_batch(batch_of(data, step_input)))
            return keep_state(state), metrics

        xs = steps_inputs(state, data)
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

    per_step = []
    for i in range(length):
        state, metrics = masked_step(state, jax.tree.map(lambda x, i=i: x[i], xs))
        per_step.append(metrics)
    return state, jax.tree.map(lambda *values: jnp.stack(values), *per_step)


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


def _maybe_resume(checkpointer: Checkpointer, state: TrainState, data: InMemoryData):
    if checkpointer.latest_step() is None:
        return state, {}
    restored = checkpointer.restore(state)
    data.restore_data_state(restored.data_state)
    return restored.state, restored.data_state


def _flush_train_metrics(pending: list[tuple[Metrics, int, int]]) -> dict[str, float]:
    """Means of the steps' metrics since the last flush; raises on a non-finite loss."""
    host = jax.device_get([metrics for metrics, _, _ in pending])
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
                    "Checkpoints before this step are kept. Lower the learning rate, enable "
                    "gradient clipping, or skip such steps (skip_nonfinite)."
                )
        for name, values in metrics.items():
            per_step.setdefault(name, []).append(values[:count])
    result = {}
    for name, chunks in per_step.items():
        values = np.concatenate(chunks)
        if name == "skipped_steps":
            result[name] = float(values.sum())
        else:
            finite = values[np.isfinite(values)]
            result[name] = float(finite.mean()) if finite.size else float("nan")
    return result


class _BestTracker:
    """Remembers the best evaluation and counts evaluations without improvement."""

    def __init__(self, metric: str | None, mode: str, patience: int):
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best: dict[str, float] | None = None
        self.since_best = 0
        self.improved = False  # did the latest update set a new best?

    def dump(self) -> dict:
        """JSON-able state, saved with checkpoints so early stopping survives a resume."""
        return {"best": self.best, "since_best": self.since_best}

    def load(self, saved: Mapping) -> None:
        self.best = saved.get("best", self.best)
        self.since_best = saved.get("since_best", self.since_best)

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.metric is None:
            return
        if self.metric not in metrics:
            raise KeyError(f"best_metric {self.metric!r} is not an eval metric: {sorted(metrics)}")
        value = metrics[self.metric]
        self.improved = better = self.best is None or (
            value > self.best[self.metric] if self.mode == "max" else value < self.best[self.metric]
        )
        if better:
            self.best, self.since_best = {"step": step, **metrics}, 0
        else:
            self.since_best += 1


def _next_boundary(step: int, num_steps: int, chunk: int, *intervals: int) -> int:
    stop = min(num_steps, step + chunk)
    for every in intervals:
        if every > 0:
            stop = min(stop, (step // every + 1) * every)
    return stop


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _check_fit_arguments(num_steps, log_every, eval_every, checkpoint_every, steps_per_dispatch):
    for name, value, minimum in (
        ("num_steps", num_steps, 1),
        ("log_every", log_every, 0),
        ("eval_every", eval_every, 0),
        ("checkpoint_every", checkpoint_every, 0),
        ("steps_per_dispatch", steps_per_dispatch, 1),
    ):
        if not isinstance(value, int | np.integer) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
