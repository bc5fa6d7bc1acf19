"""Checkpoints: a thin layer over Orbax's `CheckpointManager` that never restores garbage.

Each checkpoint is one Orbax step folder holding two items:

- "state": the `TrainState` pytree (arrays written by tensorstore);
- "manifest": one small JSON dict with everything else:
  - "data": the position in the data, so that a resumed run sees exactly the batches an
    uninterrupted run would have seen;
  - "run": run state (the last train metrics, why a run stopped, the hooks' own state:
    evaluation history, best, early-stopping count);
  - "checksums" (unless saved with `checksums=False`): for every array of "state", its
    dtype and two 32-bit integer checksums, computed when saved and verified when
    restored.

One JSON item rather than one per part: each Orbax item costs a file, its metadata and a
rename on save and a read on restore, which on a small model (the MNIST CNN) took more
time than computing and verifying the checksums.

Checkpoints in the older layouts restore too: "state" + "data" (written before checksums
and run state existed: restored unverified, with an empty run state) and "state" +
"data" + "run" + "checksums" (one JSON item per part).

Orbax writes each checkpoint to a temporary directory and renames it only when every
item is complete, so a checkpoint (checksums included) is never visible as "latest"
before it is whole. Saves are asynchronous: training continues while the arrays are
written.

The checksum of an array is a pair of wrapping uint32 sums over its bits: the plain sum
of its 32-bit words (narrower types widened, 64-bit ones split) and the sum of each word
times an odd weight 2*i+1 (i its flat position). Integer sums are exact, so the result
does not depend on the sharding or the number of devices; one jitted function computes
it for every array of the tree on the devices that hold them. Any change of one word is
detected, and so is any byte-level corruption short of an adversarial one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from jdl.errors import UserError

log = logging.getLogger(__name__)

STATE_ITEM, MANIFEST_ITEM = "state", "manifest"
# The JSON items of the older layouts, read on restore only.
DATA_ITEM, RUN_ITEM, CHECKSUM_ITEM = "data", "run", "checksums"
CHECKSUM_ALGORITHM = "uint32-sum+odd-weighted-sum/v1"
# Loggers that print internal tracebacks while jdl tries checkpoint after checkpoint.
_NOISY_LOGGERS = ("absl", "orbax", "tensorstore")


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint does not fit the structure or shapes of the state it restores into."""


class CheckpointCorruptError(UserError, ValueError):
    """No checkpoint in the directory could be read (truncated, missing or garbled files),
    or the one asked for does not match the checksums saved with it."""


class CheckpointWriteError(UserError, OSError):
    """Writing a checkpoint failed (e.g. the disk is full); earlier checkpoints are intact."""


class BestMetricError(UserError, ValueError):
    """`best_metric` names no metric saved with the checkpoints."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` returns.

    Attributes:
      step: the step of the checkpoint that was restored.
      state: the restored pytree, in the target's layout.
      data_state: the position in the data saved with it.
      run_state: the run state saved with it ({} for checkpoints without one).
    """

    step: int
    state: Any
    data_state: dict
    run_state: dict = dataclasses.field(default_factory=dict)


class Checkpointer:
    """Saves and restores `TrainState`s under one directory.

    Keeps the latest `max_to_keep` checkpoints and, when `best_metric` is set, also the
    single best one by that metric (whatever its age; on a tie the first, oldest step
    that reached the best value).

    Args:
      directory: where the step folders go (created if missing).
      max_to_keep: number of most recent checkpoints kept.
      best_metric: a key of the `metrics` dicts passed to `save` (exactly as spelled
        there, e.g. "accuracy"); the best checkpoint by it is kept in addition to the
        latest ones.
      best_mode: "max" or "min" for `best_metric`.
      async_save: write in a background thread while training continues.
      checksums: save a checksum of every array with each checkpoint and verify it on
        restore (checkpoints saved without checksums restore unverified).
      read_only: only read (e.g. another run's checkpoints, which may still be training):
        nothing in `directory` is created, cleaned up, renamed or deleted; an unreadable
        checkpoint is skipped with a warning instead of being set aside, and `save`
        raises.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        checksums: bool = True,
        read_only: bool = False,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.checksums = checksums
        self.read_only = read_only
        keep: list[policies.PreservationPolicy] = [policies.LatestN(n=max_to_keep)]
        if best_metric is not None:
            keep.append(_FirstBest(best_metric, best_mode))
        options = ocp.CheckpointManagerOptions(
            # best_fn makes Orbax store each checkpoint's metrics; what is kept is
            # decided by the preservation policy alone.
            best_fn=(lambda metrics: _metric_value(metrics, best_metric)) if best_metric else None,
            best_mode=best_mode,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            create=not read_only,
            # Half-written step folders of a killed or failed run are removed on start
            # (never in another run's directory: its folder in progress is not a leftover).
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self._writing_step: int | None = None  # the step of an unfinished async save
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                MANIFEST_ITEM: ocp.JsonCheckpointHandler(),
                DATA_ITEM: ocp.JsonCheckpointHandler(),
                RUN_ITEM: ocp.JsonCheckpointHandler(),
                CHECKSUM_ITEM: ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the checkpoints on disk, oldest first."""
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: dict | None = None,
        run_state: dict | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Starts saving `state` at `step` (returns before the write finishes when async).

        The checksums of the arrays are computed here, on the devices (one small
        transfer), and written with the checkpoint, atomically, in its one JSON item
        together with `data_state` and `run_state`.

        Args:
          step: the training step the state belongs to.
          state: the pytree to save (e.g. a `TrainState`).
          data_state: JSON-serialisable position in the data stream.
          run_state: JSON-serialisable run state (best tracking, early stopping, eval
            history, last train metrics); `restore` returns it as `Restored.run_state`.
          metrics: scalar metrics of this step; `best_metric` is read from here.

        Raises:
          BestMetricError: `metrics` is given but lacks `best_metric`.
          CheckpointWriteError: this or the previous (asynchronous) save failed, e.g. with
            a full disk. Earlier checkpoints are untouched; the failed step's partial
            files are removed when the next run starts.
          ValueError: the checkpointer is read-only.
        """
        if self.read_only:
            raise ValueError(f"this Checkpointer of {self.directory} is read-only")
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
            if self.best_metric is not None and self.best_metric not in metrics:
                raise BestMetricError(
                    f"best_metric {self.best_metric!r} is not among the metrics saved with "
                    f"the checkpoint at step {step} ({sorted(metrics)}); pass one of these "
                    "names as best_metric"
                )
        self.wait()  # an earlier async write that failed is reported here, with its step
        manifest = {"data": data_state or {}, "run": run_state or {}}
        if self.checksums:
            manifest["checksums"] = {
                "algorithm": CHECKSUM_ALGORITHM,
                "arrays": tree_checksums(state),
            }
        items = {
            STATE_ITEM: ocp.args.StandardSave(state),
            MANIFEST_ITEM: ocp.args.JsonSave(manifest),
        }
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)
        except Exception as error:
            raise self._write_error(step, error) from error
        self._writing_step = step

    def restore(self, target: Any, *, step: int | None = None) -> Restored:
        """Restores the checkpoint at `step` (default: the latest) into `target`'s layout.

        Every array is checked against the checksum saved with it (checkpoints written
        without checksums are restored unverified).

        Args:
          target: a pytree with the structure, shapes, dtypes and shardings to restore
            into: a live state or its `jax.ShapeDtypeStruct` abstraction.
          step: which checkpoint; None means the newest readable one: a checkpoint that
            fails to restore (truncated, missing or garbled files, an array that does not
            match its checksum) is reported in a one-line warning, renamed to
            `<step>.corrupt` so that later saves can reuse its step, and the next older
            one is tried.

        Raises:
          FileNotFoundError: there is no checkpoint (at that step).
          CheckpointMismatchError: the checkpoint's tree or shapes differ from `target`;
            the message names the first differing parameter path and both shapes.
          CheckpointCorruptError: no checkpoint could be read; or the one at the `step`
            asked for does not match its checksums.
        """
        return self._restore_with_fallback(step, lambda s: self._restore_step(target, s))

    def restore_weights(self, target: Any, *, step: int | None = None) -> Any:
        """`target` with its `params` and `model_state` taken from a checkpoint.

        Its own `opt_state`, `step` and `rng` are kept, so a new run can start from saved
        weights with any optimizer; a target that keeps an average of its weights (EMA)
        starts that average at the loaded weights. The checkpoint is chosen, verified and
        skipped when unreadable exactly as by `restore`; its optimizer state is not read.

        Args:
          target: a `TrainState` (or any pytree dataclass with `params`, `model_state`
            and `replace`) whose weights give the structure, shapes, dtypes and shardings.
          step: which checkpoint; None means the newest readable one.

        Raises:
          FileNotFoundError, CheckpointCorruptError: as `restore`.
          CheckpointMismatchError: the saved weights do not fit `target`'s model.
        """
        weights = {"params": target.params, "model_state": target.model_state}
        restored = self._restore_with_fallback(
            step, lambda s: self._restore_weights_step(weights, s)
        )
        params = restored.state["params"]
        loaded = target.replace(params=params, model_state=restored.state["model_state"])
        if getattr(target, "ema", None) is not None:  # the average starts at the loaded weights
            loaded = loaded.replace(ema=jax.tree.map(lambda p: p.copy(), params))
        return loaded

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """The shape of every array saved at `step`, by path ("params/head/kernel", ...),
        read from the checkpoint's metadata without reading any array."""
        with _quiet_library_logs():
            return _shapes_by_path(self._manager.item_metadata(step)[STATE_ITEM])

    def run_state(self, step: int) -> dict:
        """The run state saved with the checkpoint at `step` (best tracking, eval history,
        ...; {} for checkpoints without one), read without reading any array."""
        items, read_json = self._json_items(step)
        with _quiet_library_logs():
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return read_json(restored)[1]

    def _restore_with_fallback(self, step: int | None, read: Callable[[int], Restored]):
        # Before the first read: a failed read reports from other threads right away.
        _drop_closed_event_loop_reports()
        with _quiet_library_logs():
            if step is not None:
                return read(step)
            failures: list[tuple[int, Exception]] = []
            for candidate in sorted(self.all_steps(), reverse=True):
                try:
                    restored = read(candidate)
                except Exception as error:  # noqa: BLE001 - any failure to read means "unusable"
                    failures.append((candidate, error))
                    continue
                for bad_step, error in failures:
                    log.warning(
                        "checkpoint at step %d in %s is unreadable (%s); using step %d instead",
                        bad_step,
                        self.directory,
                        _one_line(error),
                        candidate,
                    )
                    self._set_aside(bad_step)
                return restored
        if not failures:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        mismatches = [error for _, error in failures if isinstance(error, CheckpointMismatchError)]
        if mismatches:  # every checkpoint fits another model: a usage error, not corruption
            raise mismatches[0]
        for bad_step, error in failures:
            log.warning(
                "checkpoint at step %d in %s is unreadable (%s)",
                bad_step,
                self.directory,
                _one_line(error),
            )
        # The reasons are in the message and in the warnings above; Orbax's internal
        # traceback of the first failure would only bury them.
        raise CheckpointCorruptError(
            f"no checkpoint in {self.directory} could be read: "
            + "; ".join(f"step {bad}: {_one_line(error, 120)}" for bad, error in failures)
            + ". Delete the directory to start afresh."
        ) from None

    def _items(self, step: int) -> set[str]:
        """The names of the items present in the step folder."""
        try:
            return set(os.listdir(os.path.join(self.directory, str(step))))
        except OSError:
            return set()

    def _restore_step(self, target: Any, step: int) -> Restored:
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        self._check_compatible(step, abstract)
        items, read_json = self._json_items(step)
        items[STATE_ITEM] = ocp.args.StandardRestore(abstract)
        # One Orbax call reads the arrays and the JSON items together.
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        data_state, run_state, checksums = read_json(restored)
        if checksums is not None:
            self._verify(step, checksums, restored[STATE_ITEM])
        return Restored(
            step=step, state=restored[STATE_ITEM], data_state=data_state, run_state=run_state
        )

    def _json_items(
        self, step: int, *, weights_only: bool = False
    ) -> tuple[dict, Callable[[Any], tuple[dict, dict, Any]]]:
        """The JSON items to restore for the layout of the checkpoint at `step`, and a
        function that takes them from the restored composite and returns (data state, run
        state, checksums to verify or None).

        Layouts: "manifest" (data, run and checksums in one item); the older "data" [+
        "run"] [+ "checksums"], one item each, of which `weights_only` reads the checksums
        alone. Checksums are None when this checkpointer does not verify or the
        checkpoint has none.
        """
        present = self._items(step)
        if MANIFEST_ITEM in present or DATA_ITEM not in present:
            # A checkpoint with neither JSON item fails in Orbax's read, naming the manifest.
            return {MANIFEST_ITEM: ocp.args.JsonRestore()}, lambda r: self._read_manifest(step, r)
        verify = self.checksums and CHECKSUM_ITEM in present
        items = {}
        if not weights_only:
            items[DATA_ITEM] = ocp.args.JsonRestore()
            if RUN_ITEM in present:
                items[RUN_ITEM] = ocp.args.JsonRestore()
        if verify:
            items[CHECKSUM_ITEM] = ocp.args.JsonRestore()

        def read_items(restored: Any) -> tuple[dict, dict, Any]:
            data_state = restored[DATA_ITEM] if DATA_ITEM in items else None
            run_state = restored[RUN_ITEM] if RUN_ITEM in items else None
            checksums = restored[CHECKSUM_ITEM] if verify else None
            return dict(data_state or {}), dict(run_state or {}), checksums

        return items, read_items

    def _read_manifest(self, step: int, restored: Any) -> tuple[dict, dict, Any]:
        manifest = restored[MANIFEST_ITEM]
        parts = ("data", "run")
        if not isinstance(manifest, dict) or not all(
            isinstance(manifest.get(part), dict) for part in parts
        ):
            raise CheckpointCorruptError(
                f"the manifest of the checkpoint at step {step} in {self.directory} lacks "
                "its data or run entry (garbled file)"
            )
        checksums = manifest.get("checksums") if self.checksums else None
        return dict(manifest["data"]), dict(manifest["run"]), checksums

    def _restore_weights_step(self, weights: dict, step: int) -> Restored:
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, weights)
        self._check_compatible(step, abstract, within=tuple(weights))
        state_dir = os.path.join(self.directory, str(step), STATE_ITEM)
        with ocp.PyTreeCheckpointer() as reader:
            state = reader.restore(
                state_dir,
                args=ocp.args.PyTreeRestore(
                    abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True,
                ),
            )
        items, read_json = self._json_items(step, weights_only=True)
        if self.checksums and items:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            checksums = read_json(restored)[2]
            if checksums is not None:
                self._verify(step, checksums, state)
        return Restored(step=step, state=state, data_state={})

    def _verify(self, step: int, saved: dict, tree: Any) -> None:
        """Raises `CheckpointCorruptError` naming the first array of `tree` whose checksum
        differs from the one saved. Arrays restored into another dtype than they were
        saved with (a conversion asked for by the target) cannot be compared bitwise and
        are left unverified."""
        algorithm = saved.get("algorithm") if isinstance(saved, dict) else None
        if algorithm != CHECKSUM_ALGORITHM:
            raise CheckpointCorruptError(
                f"the checksums of the checkpoint at step {step} in {self.directory} use "
                f"an unknown algorithm {algorithm!r}"
            )
        expected = saved.get("arrays", {})
        actual = tree_checksums(tree)
        for path, (dtype, *sums) in actual.items():
            if path not in expected:
                raise CheckpointCorruptError(
                    f"array {path!r} of the checkpoint at step {step} has no saved checksum "
                    f"(the checksum item is incomplete); directory {self.directory}"
                )
            saved_dtype, *saved_sums = expected[path]
            if saved_dtype == dtype and saved_sums != sums:
                raise CheckpointCorruptError(
                    f"array {path!r} of the checkpoint at step {step} does not match the "
                    f"checksum saved with it (corrupt data files); directory {self.directory}"
                )

    def _check_compatible(self, step: int, abstract: Any, within: Sequence[str] = ()) -> None:
        """Compares the saved arrays (those under the top-level keys `within`, when given)
        with `abstract` path by path."""
        saved = self._manager.item_metadata(step)[STATE_ITEM]
        saved_shapes = _shapes_by_path(saved)
        if within:
            saved_shapes = {
                p: s for p, s in saved_shapes.items() if p.split("/", 1)[0] in set(within)
            }
        target_shapes = _shapes_by_path(abstract)
        if target_shapes and not saved_shapes:  # e.g. its tree metadata file is gone
            raise CheckpointCorruptError(
                f"checkpoint at step {step} in {self.directory} lists no arrays (missing "
                "or empty tree metadata)"
            )
        missing = [p for p in target_shapes if p not in saved_shapes]
        differ = [
            p for p in target_shapes if p in saved_shapes and saved_shapes[p] != target_shapes[p]
        ]
        extra = sorted(set(saved_shapes) - set(target_shapes))
        differences = missing + differ + extra
        if not differences:
            return
        if all(p.split("/", 1)[0] == "opt_state" for p in differences):
            first = differences[0]
            raise CheckpointMismatchError(
                f"checkpoint at step {step} in {self.directory} holds a different optimizer "
                f"state (first difference {first!r}: saved {saved_shapes.get(first, 'nothing')}"
                f", expected {target_shapes.get(first, 'nothing')}): it was written with "
                "another optimizer or other optimizer settings. To start a new run from its "
                "weights use --config.init_from=WORKDIR[:STEP] (experiments) or "
                "Checkpointer.restore_weights (API)"
            )
        for path in missing:
            raise CheckpointMismatchError(
                f"checkpoint at step {step} in {self.directory} has no entry {path!r} "
                f"(the model expects shape {target_shapes[path]}); was it written by a "
                "different model?"
            )
        for path in differ:
            raise CheckpointMismatchError(
                f"checkpoint at step {step} in {self.directory}: {path!r} has shape "
                f"{saved_shapes[path]} but the model expects {target_shapes[path]}"
            )
        raise CheckpointMismatchError(
            f"checkpoint at step {step} in {self.directory} has entries the model lacks, "
            f"first {extra[0]!r} (shape {saved_shapes[extra[0]]})"
        )

    def best_step(self) -> int | None:
        """The step of the best checkpoint by `best_metric` (the first, oldest one on a
        tie), or None without `best_metric` or without checkpoints that have metrics.

        Raises:
          BestMetricError: checkpoints have metrics but none has `best_metric`.
        """
        if self.best_metric is None:
            return None
        scored = [(step, self._manager.metrics(step)) for step in self.all_steps()]
        names = sorted({name for _, metrics in scored if metrics for name in metrics})
        if names and self.best_metric not in names:
            raise BestMetricError(
                f"best_metric {self.best_metric!r} is not among the metrics saved with the "
                f"checkpoints in {self.directory} ({names}); pass one of these names"
            )
        return _first_best(scored, self.best_metric, self.best_mode)

    def wait(self) -> None:
        """Blocks until every started save is complete on disk.

        Raises:
          CheckpointWriteError: the last asynchronous save failed.
        """
        step, self._writing_step = self._writing_step, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._write_error(step, error) from error

    def close(self, *, raise_errors: bool = True) -> None:
        """Waits for pending saves, then closes.

        Args:
          raise_errors: raise `CheckpointWriteError` if a pending save failed. False only
            logs it as a one-line warning: for a `finally` block, where raising would mask
            the error already on its way.
        """
        try:
            self.wait()
        except CheckpointWriteError as error:
            if raise_errors:
                raise
            log.warning("%s", _one_line(error, limit=1000))
        finally:
            self._manager.close()

    def _write_error(self, step: int | None, error: Exception) -> CheckpointWriteError:
        """A clear error for a failed save. Its partial files (a temporary folder that is
        never taken for a checkpoint) are left to Orbax's clean-up when a run starts: a
        background writer may still be busy in them."""
        self._manager.reload()
        kept = self.all_steps()
        where = f"at step {step} " if step is not None else ""
        return CheckpointWriteError(
            getattr(error, "errno", None),
            f"writing the checkpoint {where}to {self.directory} failed: {_one_line(error)}. "
            + (
                f"The checkpoints at steps {kept} are intact; fix the cause (e.g. free disk "
                f"space) and run again to resume from step {max(kept)}."
                if kept
                else "There is no earlier checkpoint; fix the cause (e.g. free disk space)."
            ),
        )

    def _set_aside(self, step: int) -> None:
        """Renames an unreadable checkpoint out of the way (kept for inspection)."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            if os.path.isdir(path):
                os.replace(path, f"{path}.corrupt")
        self._manager.reload()


# --- best by metric --------------------------------------------------------------------


def _metric_value(metrics: dict | None, name: str) -> float:
    """The metric `name` of a checkpoint, NaN where it is missing (never the best)."""
    value = (metrics or {}).get(name)
    return math.nan if value is None else float(value)


class BestTracker:
    """The best evaluation by one metric, and how many evaluations since it improved.

    The one rule of "best" in jdl, used by the checkpointer (which checkpoint to keep) and
    by evaluation hooks (best result, early stopping): strictly better only, so on a tie
    the first step that reached the value stays best; a NaN or missing value is never
    best (it counts as an evaluation without improvement).

    Attributes:
      best: {"step": step, **metrics} of the best evaluation, or None before one.
      since_best: evaluations since the best one.
      improved: whether the latest `update` set a new best.
    """

    def __init__(self, metric: str, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.best: dict | None = None
        self.since_best = 0
        self.improved = False

    def update(self, step: int, metrics: dict | None) -> bool:
        """Takes the evaluation of `step`; returns whether it is the new best."""
        value = _metric_value(metrics, self.metric)
        self.improved = not math.isnan(value) and (
            self.best is None
            or (
                value > self.best[self.metric]
                if self.mode == "max"
                else value < self.best[self.metric]
            )
        )
        if self.improved:
            self.best, self.since_best = {"step": step, **(metrics or {})}, 0
        else:
            self.since_best += 1
        return self.improved

    def dump(self) -> dict:
        """JSON-able state (saved with checkpoints so early stopping survives a resume)."""
        return {"best": self.best, "since_best": self.since_best}

    def load(self, saved: dict) -> None:
        """Restores what `dump` returned."""
        self.best = saved.get("best", self.best)
        self.since_best = saved.get("since_best", self.since_best)


def _first_best(scored: Sequence[tuple[int, dict | None]], name: str, mode: str) -> int | None:
    """The step `BestTracker` calls best among (step, metrics) pairs, in step order."""
    tracker = BestTracker(name, mode)
    for step, metrics in sorted(scored, key=lambda pair: pair[0]):
        tracker.update(step, metrics)
    return None if tracker.best is None else tracker.best["step"]


@dataclasses.dataclass
class _FirstBest(policies.PreservationPolicy):
    """Keeps the one checkpoint `Checkpointer.best_step` names (Orbax's `BestN` keeps the
    newest of tied checkpoints)."""

    metric: str
    mode: str

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        best = _first_best([(c.step, c.metrics) for c in checkpoints], self.metric, self.mode)
        return [c.step == best for c in checkpoints]


# --- checksums -------------------------------------------------------------------------


def tree_checksums(tree: Any) -> dict[str, list]:
    """{path: [dtype name, plain sum, weighted sum]} for every array leaf of `tree`.

    JAX arrays (sharded ones across processes included) are summed on their devices by
    one jitted function per device set; NumPy arrays on the host by the same formula.
    Leaves that are neither (Python scalars, None) are left out.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    result: dict[str, list] = {}
    groups: dict[tuple[int, ...], list[tuple[str, jax.Array]]] = {}
    for path, leaf in leaves:
        name = path_name(path)
        if isinstance(leaf, jax.Array):
            devices = tuple(sorted(d.id for d in leaf.sharding.device_set))
            groups.setdefault(devices, []).append((name, leaf))
            result[name] = [str(leaf.dtype)]  # keeps the tree order in the dict
        elif isinstance(leaf, np.ndarray | np.generic):
            result[name] = [str(leaf.dtype), *_host_checksum(np.asarray(leaf))]
    for group in groups.values():
        sums = _fetch(_device_checksums([leaf for _, leaf in group]))
        for (name, _), (plain, weighted) in zip(group, sums.tolist(), strict=True):
            result[name] += [int(plain), int(weighted)]
    return result


def _fetch(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


@jax.jit
def _device_checksums(leaves: list[jax.Array]) -> jax.Array:
    """(len(leaves), 2) uint32: the plain and the weighted sum of each leaf's words."""
    rows = []
    for leaf in leaves:
        words = _device_words(leaf)
        # One variadic reduce for both sums: XLA:CPU turns a lone integer `jnp.sum` into
        # a slow tree of windowed reductions (5x slower here on a 4096x4096 array).
        plain, weighted = jax.lax.reduce(
            (words, words * _position_weights(words.shape)),
            (jnp.uint32(0), jnp.uint32(0)),
            lambda a, b: (a[0] + b[0], a[1] + b[1]),
            tuple(range(words.ndim)),
        )
        rows.append(jnp.stack([plain, weighted]))
    return jnp.stack(rows)


def _bits(dtype) -> int:
    kind = jnp.finfo if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo
    return kind(dtype).bits


def _device_words(x: jax.Array) -> jax.Array:
    """`x`'s bits as uint32 words: 8/16-bit values widened, 64-bit ones split in two
    (the same words as `_host_words` reads from memory)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    bits = _bits(x.dtype)
    if bits < 8:  # int4, float4, ...: their values, widened
        x = x.astype(jnp.int8 if jnp.issubdtype(x.dtype, jnp.integer) else jnp.float32)
        bits = _bits(x.dtype)
    if bits == 64:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _position_weights(shape: tuple[int, ...]) -> jax.Array:
    """2*i+1 (mod 2**32) for the flat position i of each element, from iotas (no
    reshape: the sharded layout stays as it is)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
            stride % 2**32
        )
        stride *= shape[axis]
    return index * jnp.uint32(2) + jnp.uint32(1)


def _host_words(x: np.ndarray) -> np.ndarray:
    """`x`'s bits as a flat uint32 array (see `_device_words`)."""
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    if x.dtype.kind in "iuf" and _bits(x.dtype) < 8:
        x = x.astype(np.int8 if x.dtype.kind in "iu" else np.float32)
    flat = np.ascontiguousarray(x).reshape(-1)
    if x.dtype.itemsize % 4 == 0:
        return flat.view(np.uint32)
    unsigned = {1: np.uint8, 2: np.uint16}[x.dtype.itemsize]
    return flat.view(unsigned).astype(np.uint32)


def _host_checksum(x: np.ndarray) -> tuple[int, int]:
    words = _host_words(x)
    weights = np.arange(words.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    return int(np.sum(words, dtype=np.uint32)), int(np.sum(words * weights, dtype=np.uint32))


# --- messages and names ----------------------------------------------------------------


def _drop_closed_event_loop_reports() -> None:
    """From now on, drops the "Event loop is closed" errors and the "Task exception was
    never retrieved" logs of failed restores.

    When one array of a checkpoint fails to read, Orbax closes its event loop while
    tensorstore still completes the reads of the other arrays; each completion then
    reports a `RuntimeError('Event loop is closed')` through `sys.unraisablehook`, later
    and from other threads (a dozen tracebacks after jdl's one error), and the reads that
    failed too may be logged by asyncio when their tasks are collected, at any later
    moment, up to the exit. They mean nothing more than the failure already reported, so
    these filters (installed once) drop exactly those: the hook hands every other report
    to the hook that was there before; the "asyncio" logger's filter drops only unretrieved
    task errors that come from tensorstore.
    """
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _FailedReadTaskFilter) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_FailedReadTaskFilter())
    if getattr(sys.unraisablehook, "_jdl_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jdl_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class _FailedReadTaskFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records of tensorstore reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (
            str(record.msg).startswith("Task exception was never retrieved")
            and error is not None
            and "tensorstore_spec" in str(error)
        )


@contextlib.contextmanager
def _quiet_library_logs() -> Iterator[None]:
    """Silences Orbax's, absl's and tensorstore's loggers: a checkpoint that fails to
    restore makes them print internal tracebacks, while jdl reports each bad step in one
    line and, if none is readable, raises one error."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    before = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, before, strict=True):
            logger.disabled = disabled


def _one_line(error: Exception, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(path): tuple(np.shape(leaf)) for path, leaf in leaves}


def path_name(path: tuple) -> str:
    """A pytree key path as "a/b/0" (NNX `value` wrappers left out): the name rules match."""
    kept = tuple(key for key in path if getattr(key, "name", getattr(key, "key", None)) != "value")
    return jax.tree_util.keystr(kept, simple=True, separator="/")
