"""Hooks: periodic actions at chunk boundaries, one mechanism for every "every N steps".

A hook says when it runs — every N steps, at given steps, at the end — and is called at
those steps with a `HookContext` (the step, the state, the latest train metrics, the
eval metrics of that step, the workdir and the logger). It may ask the run to stop by
returning True. `fit` cuts its fused chunks at every hook's steps, so the compiled
chunk between two boundaries never changes and a hook costs nothing on other steps.

    class LogWeightNorms(jdl.Hook):
        def __init__(self):
            super().__init__(every=100)

        def __call__(self, context):
            norms = {f"norm/{k}": float(v) for k, v in ...}
            context.logger.write(context.step, norms)

    jdl.fit(..., hooks=[LogWeightNorms(), jdl.hooks.EvalSet("ood", eval_step, ood, every=500)])

Hooks run on every process (an evaluation over a mesh needs all of them); those that
write files do so on process 0 only (`HookContext.is_writer`). An exception raised by a
hook stops the run: the checkpoints written at earlier boundaries are whole (the loop
waits for them) and a rerun resumes from the latest.

Built in: `EvalSet` (another evaluation set), `SavePredictions` (model outputs on given
inputs, saved as .npy), `StopWhen` (custom early stopping), `Profile` (a `jax.profiler`
trace of chosen steps, for TensorBoard's profiler or Perfetto).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jdl.checkpoint import BestTracker
from jdl.errors import UserError

__all__ = [
    "EvalSet",
    "Hook",
    "HookContext",
    "LogTrainMetrics",
    "Profile",
    "SavePredictions",
    "StopWhen",
    "UnknownMetricError",
]


@dataclasses.dataclass
class HookContext:
    """What a hook sees at a boundary.

    Attributes:
      step: the step just reached (the state has taken `step` optimizer steps).
      num_steps: the run's total number of steps.
      state: the `TrainState` at `step` (on the device; do not keep it past the call:
        the next chunk donates its buffers).
      train_metrics: means of the train metrics since the previous flush (host floats).
      workdir: the run directory, or None.
      logger: the run's `MetricLogger` (`write(step, {...})`, `message(text)`).
      is_writer: True on the process that writes files (process 0).
      shardings: the run's placement on its mesh (`jdl.parallel.ChunkShardings`), or None
        on one device: hooks that compute (evaluations) split their batches with it.
      evaluations: {name: metrics} of the evaluations run at this step so far (each
        `EvalSet` adds its own; the main one, `fit`'s `eval_data`, is "eval").
      stop_reason: why the run stops after this boundary when a hook asked it to (the
        run is then finished: a rerun returns its result), or None. Hooks later in the
        list see it.
      interrupted_by: the signal ("SIGTERM", "SIGINT") that stops the run after this
        boundary (a rerun resumes it), or None.
    """

    step: int
    num_steps: int
    state: Any
    train_metrics: Mapping[str, float]
    workdir: str | None
    logger: Any
    is_writer: bool
    shardings: Any = None
    evaluations: dict[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    stop_reason: str | None = None
    interrupted_by: str | None = None

    @property
    def eval_metrics(self) -> Mapping[str, float] | None:
        """The main evaluation at this step (`fit`'s `eval_data`), or None."""
        return self.evaluations.get(MAIN_EVAL)


MAIN_EVAL = "eval"  # the name of `fit`'s own evaluation set


class Hook:
    """A periodic action. Subclass and override `__call__`, or pass `fn`.

    Args:
      every: run at every multiple of this step (0: not periodically).
      at: run at these steps too.
      at_end: run at the last step of the run.
      fn: `fn(context) -> bool | str | None`, used when `__call__` is not overridden.
      name: shown in messages (default: the class name).
    """

    def __init__(
        self,
        *,
        every: int = 0,
        at: Sequence[int] = (),
        at_end: bool = False,
        fn: Callable[[HookContext], bool | str | None] | None = None,
        name: str | None = None,
    ):
        if not isinstance(every, int | np.integer) or every < 0:
            raise HookError(f"every must be an integer >= 0, got {every!r}")
        if any(not isinstance(s, int | np.integer) or s < 1 for s in at):
            raise HookError(f"at must hold steps >= 1, got {tuple(at)!r}")
        if not (every or at or at_end):
            raise HookError("a hook needs every=N, at=(steps, ...) or at_end=True")
        self.every, self.at, self.at_end = int(every), tuple(sorted(int(s) for s in at)), at_end
        self.fn = fn
        self.name = name or type(self).__name__

    def __call__(self, context: HookContext) -> bool | str | None:
        """Runs the action. Returns True (or a sentence saying why) to stop the run after
        this boundary; the checkpoint of this step is saved first."""
        if self.fn is None:
            raise NotImplementedError(f"{self.name}: override __call__ or pass fn=")
        return self.fn(context)

    def is_due(self, step: int, num_steps: int) -> bool:
        """Whether the hook runs at `step` (big_vision's single "is it time?" predicate)."""
        return (
            (self.every > 0 and step % self.every == 0)
            or step in self.at
            or (self.at_end and step == num_steps)
        )

    def next_due(self, step: int, num_steps: int) -> int:
        """The first step after `step` at which the hook runs (`num_steps` if none)."""
        candidates = [num_steps]
        if self.every > 0:
            candidates.append((step // self.every + 1) * self.every)
        candidates.extend(s for s in self.at if s > step)
        return min(candidates)

    def wants_call(self, context: HookContext) -> bool:
        """Whether to call the hook at this boundary: when it is due. A hook that must also
        act at other boundaries (e.g. saving when the run stops) overrides this; it is
        only asked at boundaries where some hook is due or the run stops."""
        return self.is_due(context.step, context.num_steps)

    def state_dict(self) -> dict | None:
        """What the hook must remember across a resume (JSON-able), saved with every
        checkpoint under its `name`; None (the default) for a hook with nothing to keep."""
        return None

    def load_state_dict(self, saved: Mapping) -> None:
        """Restores what `state_dict` returned, when a run resumes from a checkpoint."""

    def on_start(self, context: HookContext) -> None:
        """Called once before the first chunk, with the context of the start step (0, or the
        step a resumed run starts from; no train or eval metrics yet)."""

    def close(self) -> None:
        """Called once when the run ends (normally or not): release what the hook holds."""


class HookError(UserError, ValueError):
    """A hook's schedule or settings are not valid."""


class EvalSet(Hook):
    """Evaluates a data set, logs its metrics as `"{name}/{metric}"`, tracks the best.

    `fit`'s own evaluation (`eval_data`, `eval_every`, `best_metric`, ...) is an `EvalSet`
    named "eval"; add others for more data sets. With `best_metric`, the set tracks its
    best evaluation (`jdl.checkpoint.BestTracker`: first on a tie, NaN never best) and,
    with `patience`, stops the run after that many evaluations without a new best: early
    stopping on any set. Its history and best are saved with each checkpoint, so a
    resumed run goes on counting where it stopped.

    Args:
      name: prefix of the logged metrics (e.g. "ood", "val2"); unique among the hooks.
      eval_step: per-example metrics `(state, batch) -> metrics` (`jdl.make_eval_step`).
      data: host arrays {"x", "y", ...}.
      every: evaluate every this many steps; `at_end` (default True) at the last step too.
      batch_size: examples per eval batch (the tail is masked, not dropped).
      best_metric: the metric that defines the best evaluation (None: no tracking).
      best_mode: "max" or "min" for `best_metric`.
      patience: stop after this many evaluations without a new best (0: never).

    After the run, `history` holds one dict per evaluation, with "step", and `best` the
    best one (or None).
    """

    def __init__(
        self,
        name: str,
        eval_step: Callable,
        data: Mapping[str, np.ndarray],
        *,
        every: int = 0,
        at_end: bool = True,
        batch_size: int = 1000,
        best_metric: str | None = None,
        best_mode: str = "max",
        patience: int = 0,
    ):
        super().__init__(every=every, at_end=at_end, name=name)
        if patience and best_metric is None:
            raise HookError(f"EvalSet {name!r}: patience needs a best_metric to watch")
        self.eval_step, self.data, self.batch_size = eval_step, data, batch_size
        self.patience = patience
        self.tracker = None if best_metric is None else BestTracker(best_metric, best_mode)
        self.history: list[dict[str, float]] = []

    @property
    def best(self) -> dict | None:
        return None if self.tracker is None else self.tracker.best

    @property
    def improved(self) -> bool:
        """Whether the latest evaluation set a new best."""
        return self.tracker is not None and self.tracker.improved

    @property
    def out_of_patience(self) -> bool:
        return self.patience > 0 and self.tracker.since_best >= self.patience

    def __call__(self, context: HookContext) -> str | None:
        from jdl.loop import make_evaluator  # the loop imports this module

        evaluate = make_evaluator(self.eval_step, self.batch_size, context.shardings)
        metrics = evaluate(context.state, self.data)
        context.logger.write(context.step, {f"{self.name}/{k}": v for k, v in metrics.items()})
        context.evaluations[self.name] = metrics
        self.history.append({"step": context.step, **metrics})
        if self.tracker is None:
            return None
        if self.tracker.metric not in metrics:
            raise UnknownMetricError(
                f"best_metric {self.tracker.metric!r} is not an eval metric; the eval step "
                f"returns {sorted(metrics)}"
            )
        self.tracker.update(context.step, metrics)
        if not self.out_of_patience:
            return None
        best = self.tracker.best
        return (
            f"early stopping: no better {self.name} {self.tracker.metric} than "
            f"{best[self.tracker.metric]:.4f} (step {best['step']}) for {self.patience} "
            "evaluations"
        )

    def state_dict(self) -> dict:
        tracker = None if self.tracker is None else self.tracker.dump()
        return {"history": self.history, "best_tracker": tracker}

    def load_state_dict(self, saved: Mapping) -> None:
        self.history = [dict(record) for record in saved.get("history", [])]
        if self.tracker is not None and saved.get("best_tracker"):
            self.tracker.load(saved["best_tracker"])


class UnknownMetricError(UserError, KeyError):
    """`best_metric` names a metric the eval step does not return."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SavePredictions(Hook):
    """Saves the model's outputs (eval mode) on `inputs` as `WORKDIR/predictions/step_N.npy`.

    Args:
      inputs: an array (or dict of arrays) with a leading example axis.
      every: save every this many steps; `at_end` (default True) at the last step too.
      batch_size: examples per compiled batch (see `jdl.predict`).
      transform: applied to the outputs before saving (e.g. `lambda y: y.argmax(-1)`).
    """

    def __init__(
        self,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        *,
        every: int = 0,
        at_end: bool = True,
        batch_size: int = 256,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        super().__init__(every=every, at_end=at_end)
        self.inputs, self.batch_size, self.transform = inputs, batch_size, transform
        self.saved: list[str] = []

    def __call__(self, context: HookContext) -> None:
        from jdl.inference import predict

        outputs = predict(context.state, self.inputs, batch_size=self.batch_size)
        if self.transform is not None:
            outputs = self.transform(outputs)
        if context.workdir is None or not context.is_writer:
            return
        directory = os.path.join(context.workdir, "predictions")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"step_{context.step}.npy")
        np.save(path, np.asarray(outputs))
        self.saved.append(path)


class LogTrainMetrics(Hook):
    """Writes the train metrics (means since the previous log) and the samples per second
    as `"train/{name}"`, and moves the progress bar. `fit`'s `log_every` makes one.

    Args:
      every: log every this many steps (and at the last step).
      batch_size: examples per step, for the samples-per-second rate.
    """

    def __init__(self, every: int, *, batch_size: int):
        super().__init__(every=every, at_end=True, name="log")
        self.batch_size = batch_size
        self.since: tuple[int, float] = (0, time.perf_counter())

    def on_start(self, context: HookContext) -> None:
        self.since = (context.step, time.perf_counter())

    def __call__(self, context: HookContext) -> None:
        first_step, first_time = self.since
        steps = context.step - first_step
        rate = steps * self.batch_size / max(time.perf_counter() - first_time, 1e-9)
        metrics = {f"train/{k}": v for k, v in context.train_metrics.items()}
        context.logger.write(context.step, metrics | {"train/samples_per_second": rate})
        context.logger.advance(
            steps, samples_per_second=rate, loss=context.train_metrics.get("loss")
        )
        self.since = (context.step, time.perf_counter())


class StopWhen(Hook):
    """Stops the run when `condition(context)` is true: custom early stopping.

    For example, stop once the train loss is below 0.05, or when a second evaluation set
    (an `EvalSet` earlier in the hooks list) has not improved for a while.

    Args:
      condition: `(HookContext) -> bool`.
      every: check every this many steps.
      reason: said in the run's message when it stops.
    """

    def __init__(self, condition: Callable[[HookContext], bool], *, every: int, reason: str = ""):
        super().__init__(every=every, name=reason or "StopWhen")
        self.condition, self.reason = condition, reason

    def __call__(self, context: HookContext) -> bool | str:
        return bool(self.condition(context)) and (self.name if self.reason else True)


class Profile(Hook):
    """Writes a `jax.profiler` trace of steps `first` to `last` into `WORKDIR/profile`.

    The trace starts at the boundary at step `first - 1` and stops at step `last`, after
    the device finished (so the steps' work is in it). Open it with TensorBoard's profiler
    (`tensorboard --logdir WORKDIR/profile`) or Perfetto. Tracing does not change what is
    computed: results are bitwise those of an untraced run.

    Args:
      steps: (first, last), 1 <= first <= last: the steps to trace.
      directory: where the trace goes (default `WORKDIR/profile`; needed without workdir).
    """

    def __init__(self, steps: tuple[int, int], *, directory: str | None = None):
        first, last = steps
        if not 1 <= first <= last:
            raise HookError(f"profile steps must be (first, last) with 1 <= first <= last: {steps}")
        super().__init__(at=tuple(s for s in (first - 1, last) if s >= 1))
        self.first, self.last, self.directory = first, last, directory
        self.tracing = False

    def on_start(self, context: HookContext) -> None:
        if context.step == self.first - 1:  # the trace covers the very next chunk
            self.start(context.workdir)

    def start(self, workdir: str | None) -> None:
        directory = self.directory or (
            None if workdir is None else os.path.join(workdir, "profile")
        )
        if directory is None:
            raise HookError("Profile needs a workdir or directory= to write its trace to")
        jax.profiler.start_trace(directory)
        self.tracing = True

    def __call__(self, context: HookContext) -> None:
        if context.step == self.first - 1 and not self.tracing:
            self.start(context.workdir)
        elif context.step == self.last and self.tracing:
            jax.block_until_ready(context.state)  # note: a sync point, once, at the end
            self.close()

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
