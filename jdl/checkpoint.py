"""Checkpoints: a thin layer over Orbax's `CheckpointManager`.

Each checkpoint holds two items: the `TrainState` pytree ("state") and a small
JSON dict describing the position in the data ("data"), so that a resumed run
sees exactly the batches an uninterrupted run would have seen.

Orbax writes each checkpoint to a temporary directory and renames it only
when complete, so a checkpoint is never visible as "latest" before it is
whole. Saves are asynchronous: training continues while the arrays are
written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from jdl.errors import UserError

log = logging.getLogger(__name__)


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint does not fit the structure or shapes of the state it restores into."""


class CheckpointCorruptError(UserError, ValueError):
    """No checkpoint in the directory could be read (truncated, missing or garbled files)."""


class CheckpointWriteError(UserError, OSError):
    """Writing a checkpoint failed (e.g. the disk is full); earlier checkpoints are intact."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` returns."""

    step: int
    state: Any
    data_state: dict


class Checkpointer:
    """Saves and restores `TrainState`s under one directory.

    Keeps the latest `max_to_keep` checkpoints and, when `best_metric` is set,
    also the single best one by that metric (whatever its age).

    Args:
      directory: where the step folders go (created if missing).
      max_to_keep: number of most recent checkpoints kept.
      best_metric: name of a metric passed to `save(..., metrics=...)`; the best
        checkpoint by it is kept in addition to the latest ones.
      best_mode: "max" or "min" for `best_metric`.
      async_save: write in a background thread while training continues.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric = best_metric
        self.best_mode = best_mode
        keep: list[policies.PreservationPolicy] = [policies.LatestN(n=max_to_keep)]
        if best_metric is not None:
            keep.append(
                policies.BestN(
                    get_metric_fn=lambda metrics: metrics[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn makes Orbax store each checkpoint's metrics; what is kept is
            # decided by the preservation policy alone.
            best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
            best_mode=best_mode,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            create=True,
            # Half-written step folders of a killed or failed run are removed on start.
            cleanup_tmp_directories=True,
        )
        self._writing_step: int | None = None  # the step of an unfinished async save
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
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
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Starts saving `state` at `step` (returns before the write finishes when async).

        Args:
          step: the training step the state belongs to.
          state: the pytree to save (e.g. a `TrainState`).
          data_state: JSON-serialisable position in the data stream.
          metrics: scalar metrics of this step; `best_metric` is read from here.

        Raises:
          CheckpointWriteError: this or the previous (asynchronous) save failed, e.g. with
            a full disk. Earlier checkpoints are untouched; the failed step's partial
            files are removed when the next run starts.
        """
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self.wait()  # an earlier async write that failed is reported here, with its step
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state or {}),
                ),
                metrics=metrics,
            )
        except Exception as error:
            raise self._write_error(step, error) from error
        self._writing_step = step

    def restore(self, target: Any, *, step: int | None = None) -> Restored:
        """Restores the checkpoint at `step` (default: the latest) into `target`'s layout.

        Args:
          target: a pytree with the structure, shapes, dtypes and shardings to restore
            into: a live state or its `jax.ShapeDtypeStruct` abstraction.
          step: which checkpoint; None means the newest readable one: a checkpoint that
            fails to restore (truncated, missing or garbled files) is reported in a one-line
            warning, renamed to `<step>.corrupt` so that later saves can reuse its step, and
            the next older one is tried.

        Raises:
          FileNotFoundError: there is no checkpoint (at that step).
          CheckpointMismatchError: the checkpoint's tree or shapes differ from `target`;
            the message names the first differing parameter path and both shapes.
          CheckpointCorruptError: no checkpoint could be read.
        """
        if step is not None:
            return self._restore_step(target, step)
        failures: list[tuple[int, Exception]] = []
        for candidate in sorted(self.all_steps(), reverse=True):
            try:
                restored = self._restore_step(target, candidate)
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
        raise CheckpointCorruptError(
            f"no checkpoint in {self.directory} could be read: "
            + "; ".join(f"step {bad}: {_one_line(error)}" for bad, error in failures)
            + ". Delete the directory to start afresh."
        ) from failures[0][1]

    def _restore_step(self, target: Any, step: int) -> Restored:
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        self._check_compatible(step, abstract)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        return Restored(step=step, state=restored["state"], data_state=dict(restored["data"]))

    def _check_compatible(self, step: int, abstract: Any) -> None:
        saved = self._manager.item_metadata(step)["state"]
        saved_shapes = _shapes_by_path(saved)
        target_shapes = _shapes_by_path(abstract)
        if target_shapes and not saved_shapes:  # e.g. its tree metadata file is gone
            raise CheckpointCorruptError(
                f"checkpoint at step {step} in {self.directory} lists no arrays (missing "
                "or empty tree metadata)"
            )
        for path, shape in target_shapes.items():
            if path not in saved_shapes:
                raise CheckpointMismatchError(
                    f"checkpoint at step {step} in {self.directory} has no entry {path!r} "
                    f"(the model expects shape {shape}); was it written by a different model?"
                )
            if saved_shapes[path] != shape:
                raise CheckpointMismatchError(
                    f"checkpoint at step {step} in {self.directory}: {path!r} has shape "
                    f"{saved_shapes[path]} but the model expects {shape}"
                )
        extra = sorted(set(saved_shapes) - set(target_shapes))
        if extra:
            raise CheckpointMismatchError(
                f"checkpoint at step {step} in {self.directory} has entries the model lacks, "
                f"first {extra[0]!r} (shape {saved_shapes[extra[0]]})"
            )

    def best_step(self) -> int | None:
        """The step of the best checkpoint by `best_metric`, or None."""
        if self.best_metric is None:
            return None
        scored = []
        for step in self.all_steps():
            metrics = self._manager.metrics(step)
            if metrics and self.best_metric in metrics:
                scored.append((float(metrics[self.best_metric]), step))
        if not scored:
            return None
        pick = min if self.best_mode == "min" else max
        return pick(scored)[1]

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

    def close(self) -> None:
        """Waits for pending saves (raising `CheckpointWriteError` if one failed), then closes."""
        try:
            self.wait()
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
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            if os.path.isdir(path):
                os.replace(path, f"{path}.corrupt")
        self._manager.reload()


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
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if name == "value":  # NNX Variable wrapper: not part of the parameter's name
            continue
        parts.append(str(name))
    return "/".join(parts)
