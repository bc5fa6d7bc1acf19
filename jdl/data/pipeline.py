"""Feeding batches to the training loop: the `TrainData` protocol and its implementations.

`fit` meets its training data through one protocol, `TrainData` (below): a batch size,
the data argument of each compiled chunk (`chunk_inputs`), a hashable, array-free
`program` that turns that argument into each step's batch inside the compiled chunk,
the data position saved with checkpoints, and where the data goes on a device mesh. Any
object with these members trains with `fit` and resumes exactly; nothing in jdl checks
its class.

`InMemoryData` is the fast path for datasets that fit on the device: the
arrays are put on the device once, and batches are drawn *inside* the jitted
chunk of training steps: a fresh permutation per epoch, from
`fold_in(seed_key, epoch)`. No host work and no transfer happens per step, and
the data position is a pure function of the step, so resuming at step s sees
exactly the batches an uninterrupted run sees.

`StreamingData` is the path for datasets that do not fit on the device: a grain
pipeline on the host (per-process shard, per-epoch shuffle, augmentation maps,
batching) whose batches a background thread puts on the device ahead of the
compute. `fit` feeds them to the chunk program as inputs, and the grain
iterator's state is saved with every checkpoint.

`IterableData` feeds the batches of any Python iterator (a generator, a Hugging Face
dataset's `iter`) the same way; it resumes by re-creating the iterator and skipping the
batches already trained on.
"""

from __future__ import annotations

import collections
import functools
import json
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jdl.data.dataset import check_finite
from jdl.errors import UserError

_SHUFFLE_SALT = 0x5EED


class BatchSizeError(UserError, ValueError):
    """A batch size that the data cannot fill: below 1 or larger than the data set."""


class DataSetupMismatchError(UserError, ValueError):
    """A checkpoint's data position was made with another data set-up (seed, size, batch)."""


class LabelRangeError(UserError, ValueError):
    """Integer class labels outside [0, num_classes)."""


class TrainDataError(UserError, TypeError):
    """An object passed as training data does not implement `TrainData`."""


class IterableDataError(UserError, ValueError):
    """An `IterableData` iterator gave a batch of the wrong form, or ran out of batches."""


@runtime_checkable
class DataProgram(Protocol):
    """The traced part of a `TrainData`: how a chunk program turns its data argument into batches.

    Both methods run inside the jitted chunk program (`jdl.make_chunk_runner`), traced once
    per program and per shape of the data argument. The object must be hashable and hold no
    arrays: compiled chunk programs are cached on it, so two data objects with equal programs
    share one compile (two `InMemoryData` of the same size, batch size and seed do), and the
    cache keeps no data alive. Hence both methods may depend only on their arguments and on
    the fields that make up the program's equality, never on arrays held elsewhere (a frozen
    dataclass of plain settings is the natural form; see `BatchSampler`, `HostBatches`).
    """

    def step_inputs(self, first_step: jax.Array, inputs: Any, length: int) -> Any:
        """The per-step inputs of a chunk of `length` steps, computed once before its loop.

        Args:
          first_step: int32 scalar (traced), the global step of the chunk's first step.
          inputs: the chunk's data argument, `TrainData.chunk_inputs(count, length)`.
          length: the chunk length (static).

        Returns:
          A pytree whose every leaf has leading axis `length`; row i belongs to step
          `first_step + i`. Rows at and past the chunk's `count` may hold anything valid:
          their steps are not trained on.
        """
        ...

    def step_batch(self, inputs: Any, step_input: Any) -> Mapping[str, jax.Array]:
        """The batch of one step (traced): from the chunk's data argument and that step's row
        of `step_inputs`. Every leaf has leading axis `batch_size` (the global batch)."""
        ...


@dataclass(frozen=True)
class MeshPlacement:
    """Where data goes on a device mesh; `jdl.parallel.place_for_fit` builds it for `fit`.

    Attributes:
      mesh: the device mesh.
      batch_sharding: the sharding of one global batch, its rows split over the mesh's
        batch axes: where host batches are put (`jax.device_put`, or
        `jax.make_array_from_process_local_data` with several processes).
      place_arrays: `{name: array} -> {name: jax.Array}`, a data set's arrays placed on
        the mesh for gathering inside the compiled program (replicated; global arrays of
        a multi-process run stay as they are).
    """

    mesh: jax.sharding.Mesh
    batch_sharding: jax.sharding.Sharding
    place_arrays: Callable[[Mapping[str, Any]], dict[str, jax.Array]]


@runtime_checkable
class TrainData(Protocol):
    """What `jdl.fit` needs from its training data. Implemented by `InMemoryData`,
    `StreamingData`, `IterableData` and `jdl.data.RandomWindows`; a user's own class that
    has these members is just as welcome (no base class, `isinstance(obj, TrainData)`
    checks the members).

    How `fit` uses it, per chunk of at most `length` (`steps_per_dispatch`) steps:

    1. Host side, before the chunk: `inputs = data.chunk_inputs(count, length)`, where
       `count` (1 <= count <= length) is the number of steps the chunk trains. The result
       is the chunk program's data argument, a pytree of arrays whose shapes and dtypes are
       the same for every chunk (else the program compiles again): e.g. the device arrays
       of the whole set, or `length` host batches already put on the device. A source fed
       from the host advances its position by exactly `count` batches.
    2. Traced, inside the one compiled program: `xs = data.program.step_inputs(first_step,
       inputs, length)` before the loop, then `data.program.step_batch(inputs, xs[i])` is
       the batch of step `first_step + i` (see `DataProgram`). Steps at and past `count` do
       not train.
    3. Host side, at checkpoints: `data.data_state(step)`, the JSON-able position after
       `step` steps (the chunk inputs of those steps have been taken). It also records the
       set-up facts that fix the batches (seed, sizes, batch size, ...).
    4. Host side, on resume, before any chunk: `data.restore_data_state(saved)` raises
       `DataSetupMismatchError` when `saved` was written with another set-up (use
       `check_same_setup`) and otherwise sets the position, so the next `chunk_inputs`
       continues where `data_state` left off.
    5. `data.close()` at the end of `fit`, also after an error: stops background work. The
       object must stay usable: a later `fit` call goes on from the position reached.

    Determinism needed for an exact resume: the batch of global step s depends only on the
    set-up and s (not on how the run was cut into chunks, on timing or on threads), and a
    fresh object of the same set-up, given `restore_data_state(data_state(s))`, yields the
    batches of steps s, s + 1, ... that the uninterrupted run trained on.

    Attributes:
      batch_size: the global batch size (all processes together); the leading axis of
        every batch.
      program: the traced part, a hashable, array-free `DataProgram`; compiled programs
        are cached on it.
    """

    batch_size: int
    program: DataProgram

    def chunk_inputs(self, count: int, length: int) -> Any:
        """The data argument of the next chunk program (host side; see the class)."""
        ...

    def data_state(self, step: int) -> dict:
        """The JSON-able data position after `step` steps, with the set-up facts."""
        ...

    def restore_data_state(self, data_state: Mapping[str, Any]) -> None:
        """Checks that `data_state` comes from the same set-up, then moves to its position."""
        ...

    def place_on_mesh(self, placement: MeshPlacement) -> None:
        """Puts the data on `placement.mesh` before training (`fit` with a mesh): arrays
        gathered inside the program via `placement.place_arrays`, host batches sent with
        `placement.batch_sharding` unless the data has a sharding of its own."""
        ...

    def close(self) -> None:
        """Stops background work (prefetch threads); the object stays usable."""
        ...


# What `check_train_data` asks for, in the order its message names the missing ones.
_TRAIN_DATA_MEMBERS = (
    "batch_size",
    "program",
    "chunk_inputs",
    "data_state",
    "restore_data_state",
    "place_on_mesh",
    "close",
)


def check_train_data(data: Any) -> TrainData:
    """Returns `data` if it implements `TrainData` with a hashable program, else raises.

    Raises:
      TrainDataError: (a TypeError) naming the missing members, or the unhashable program.
    """
    missing = [name for name in _TRAIN_DATA_MEMBERS if not hasattr(data, name)]
    if missing:
        raise TrainDataError(
            f"train_data of type {type(data).__name__} is not a jdl.TrainData: it lacks "
            f"{', '.join(missing)}; use jdl.InMemoryData, jdl.StreamingData, "
            "jdl.IterableData or implement the protocol (docs/concepts/data.md)"
        )
    try:
        hash(data.program)
    except TypeError:
        raise TrainDataError(
            f"{type(data).__name__}.program (a {type(data.program).__name__}) is not "
            "hashable; compiled programs are cached on it: make it a frozen dataclass of "
            "the settings its traced batches depend on"
        ) from None
    return data


def check_same_setup(
    saved: Mapping[str, Any], expected: Mapping[str, Any], *, keys: Sequence[str]
) -> None:
    """Raises unless a checkpoint's data position was written with this data set-up.

    Compares `saved[key]` with `expected[key]` for each of `keys`, in order, after a JSON
    round trip of both (a checkpoint's tuples come back as lists). Put "kind" first when
    both record one: a position of another kind of data is named as such.

    Args:
      saved: the checkpoint's data position (`Restored.data_state`).
      expected: this run's (typically `data.data_state(0)`).
      keys: the set-up facts that fix the batches (seed, sizes, batch size, ...).

    Raises:
      DataSetupMismatchError: (a ValueError) naming the first key that differs or that
        the checkpoint does not record, with both values.
    """
    for key in keys:
        want = _json_normal(expected[key])
        if key not in saved:
            raise DataSetupMismatchError(
                f"the checkpoint's data position records no {key} (this run uses {want!r}); "
                "it was written with another data set-up: use it or a new workdir"
            )
        got = _json_normal(saved[key])
        if got == want:
            continue
        if key == "kind":
            raise DataSetupMismatchError(
                f"the checkpoint's data position is of kind {got!r}, but this run's data is "
                f"of kind {want!r}; resuming would not see the same batches. Use the original "
                "data set-up or a new workdir."
            )
        raise DataSetupMismatchError(
            f"the checkpoint was written with data {key}={got!r}, but this run uses "
            f"{want!r}; resuming would not see the same batches. Use the original settings "
            "or a new workdir."
        )


def _json_normal(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_scalar))


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def check_labels(labels: np.ndarray | jax.Array, num_classes: int, *, where: str) -> None:
    """Raises if integer class labels fall outside ``[0, num_classes)``.

    A label out of range does not fail inside a jitted loss: the one-hot of a label
    >= num_classes is all zeros and `jnp.take_along_axis` clamps, so training runs
    on a silently wrong target. One vectorised pass on the host (call it once per
    split, before training). Arrays of another dtype (float targets, regression)
    are not class labels and are left alone.

    Args:
      labels: integer class ids of any shape, e.g. (N,) or (N, T).
      num_classes: the number of classes the model predicts, >= 1.
      where: what the labels are, for the message (e.g. "train data").

    Raises:
      LabelRangeError: (a ValueError) naming `where`, how many labels are out of
        range, the range they span, and a hint when the labels look 1-based
        (their maximum equals `num_classes`).

    Example:
      >>> check_labels(np.array([0, 2, 1]), 3, where="train")
      >>> check_labels(np.array([1, 2, 3]), 3, where="train")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      jdl.data.pipeline.LabelRangeError: train: 1 of 3 labels lie outside [0, 3) ...1-based...
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.size == 0:
        return
    low, high = labels.min(), labels.max()
    if low >= 0 and high < num_classes:
        return
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if low >= 0 and high == num_classes:
        advice = f"the labels look 1-based: subtract 1 so that they run from 0 to {num_classes - 1}"
    else:
        advice = (
            f"give the model one output per class (it has {num_classes}) or map the "
            f"labels to 0..{num_classes - 1}"
        )
    raise LabelRangeError(
        f"{where}: {bad.size} of {labels.size} labels lie outside [0, {num_classes}) "
        f"(out of range: {bad.min()} to {bad.max()}; all labels: {low} to {high}); {advice}"
    )


@dataclass(frozen=True)
class BatchSampler:
    """Which examples make the batch of each step: the array-free part of `InMemoryData`.

    Hashable and small, so compiled programs can be cached on it (two datasets with the
    same sampler draw their batches the same way; only the arrays passed in differ). It is
    `InMemoryData.program` (a `DataProgram`): a chunk's data argument is the stored arrays,
    its per-step inputs the example indices of each step (`chunk_indices`).
    """

    seed: int
    num_examples: int
    batch_size: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def epoch_permutation(self, epoch: jax.Array) -> jax.Array:
        """The example order of `epoch` (int32 (N,)), identical on every call."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), _SHUFFLE_SALT)
        return jax.random.permutation(jax.random.fold_in(key, epoch), self.num_examples)

    def chunk_indices(self, first_step: jax.Array, length: int) -> jax.Array:
        """Example indices, int32 (length, batch_size), of steps `first_step + i`. Traceable.

        Row i is the batch of step `first_step + i`: the `batch_size` examples at position
        `(step % steps_per_epoch) * batch_size` of its epoch's `epoch_permutation`, across
        epoch boundaries too. Computed once before a chunk's loop, so the loop body only
        gathers: the permutations of the (at most `span`) epochs the chunk touches are
        made here, the second and later ones only if the chunk reaches them.
        """
        steps = first_step + jnp.arange(length)
        first_epoch = first_step // self.steps_per_epoch
        epoch_offsets = steps // self.steps_per_epoch - first_epoch
        span = min(length, (length - 1) // self.steps_per_epoch + 2)
        if span > 2:  # tiny epochs: nearly every epoch in range is used, shuffle them all
            orders = jax.vmap(self.epoch_permutation)(first_epoch + jnp.arange(span))
        else:
            first = self.epoch_permutation(first_epoch)
            orders = first[None]
            if span == 2:
                second = jax.lax.cond(  # a small sort, no model inside: cheap as a cond
                    epoch_offsets[-1] > 0,
                    lambda: self.epoch_permutation(first_epoch + 1),
                    lambda: jnp.zeros_like(first),
                )
                orders = jnp.stack([first, second])
        positions = (steps % self.steps_per_epoch) * self.batch_size
        return jax.vmap(
            lambda offset, position: jax.lax.dynamic_slice(
                orders, (offset, position), (1, self.batch_size)
            )[0]
        )(epoch_offsets, positions)

    def take_batch(self, arrays: Mapping[str, jax.Array], indices: jax.Array):
        """The batch of the examples at `indices` (one row of `chunk_indices`). Traceable."""
        return {name: jnp.take(value, indices, axis=0) for name, value in arrays.items()}

    def step_inputs(self, first_step: jax.Array, arrays: Mapping[str, jax.Array], length: int):
        """`DataProgram.step_inputs`: the chunk's example indices (`chunk_indices`)."""
        del arrays
        return self.chunk_indices(first_step, length)

    def step_batch(self, arrays: Mapping[str, jax.Array], indices: jax.Array):
        """`DataProgram.step_batch`: the examples at one step's `indices` (`take_batch`)."""
        return self.take_batch(arrays, indices)


class InMemoryData:
    """A dataset held on the device, shuffled every epoch inside jit (a `TrainData`).

    Each epoch is a new permutation of all examples; the last incomplete batch
    of an epoch is dropped, so every batch has `batch_size` examples. The chunk
    program's data argument is the stored arrays; its `program` is the `BatchSampler`.

    Args:
      arrays: {"x": (N, ...), "y": (N,)} host or device arrays.
      batch_size: global batch size.
      seed: the shuffle seed (the run seed is a good choice).
      sharding: optional `jax.sharding.Sharding` for the stored arrays (e.g.
        replicated over a mesh); batches are gathered from them inside jit.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray | jax.Array],
        *,
        batch_size: int,
        seed: int,
        sharding: jax.sharding.Sharding | None = None,
    ):
        sizes = {name: len(value) for name, value in arrays.items()}
        if not sizes:
            raise ValueError("InMemoryData needs at least one array, e.g. {'x': ..., 'y': ...}")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays disagree on the number of examples: {sizes}")
        check_finite(  # once, on the host: a NaN input would only show up as a NaN loss
            {
                name: value
                for name, value in arrays.items()
                if not (isinstance(value, jax.Array) and not value.is_fully_addressable)
            },
            where="InMemoryData",
        )
        self.num_examples = next(iter(sizes.values()))
        if batch_size < 1:
            raise BatchSizeError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > self.num_examples:
            raise BatchSizeError(
                f"batch_size {batch_size} is larger than the dataset ({self.num_examples} "
                f"examples): every batch is full, so no step could be drawn; use a batch size "
                f"of at most {self.num_examples}"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.sampler = BatchSampler(seed, self.num_examples, batch_size)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.arrays = {
            # a global array of a multi-process run (jdl.parallel.global_arrays) stays put
            name: value
            if isinstance(value, jax.Array) and not value.is_fully_addressable
            else jax.device_put(np.asarray(value), sharding)
            for name, value in arrays.items()
        }

    @property
    def program(self) -> BatchSampler:
        """The traced part (`TrainData.program`): the array-free sampler."""
        return self.sampler

    def data_state(self, step: int) -> dict:
        """The JSON-able position in the data after `step` steps (saved in checkpoints)."""
        return {
            "kind": "in_memory",
            "epoch": int(step // self.steps_per_epoch),
            "position": int(step % self.steps_per_epoch),
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
        }

    def restore_data_state(self, data_state: Mapping[str, Any]) -> None:
        """Checks a checkpoint's data set-up; the position itself follows from the step.

        Raises:
          DataSetupMismatchError: another kind of data, seed, size or batch size.
        """
        check_same_setup(
            data_state,
            self.data_state(0),
            keys=("kind", "seed", "num_examples", "batch_size"),
        )

    def chunk_inputs(self, count: int, length: int) -> Mapping[str, jax.Array]:
        """The data argument of a chunk program: the stored arrays (batches are drawn inside)."""
        del count, length
        return self.arrays

    def place_on_mesh(self, placement: MeshPlacement) -> None:
        """Places the stored arrays on the mesh (replicated; global arrays stay)."""
        self.arrays = placement.place_arrays(self.arrays)

    def close(self) -> None:
        """Nothing to release (part of `TrainData`)."""


Example = dict[str, np.ndarray]
Transform = Callable[[Example, np.random.Generator], Example]


@dataclass(frozen=True)
class HostBatches:
    """The `DataProgram` of data fed from the host (`StreamingData`, `IterableData`).

    A chunk's data argument is a tuple of `length` batches already on the device (from
    `chunk_inputs`); step i trains on batch i. All instances are equal, so every host-fed
    data set of the same batch shapes shares one compiled program.
    """

    def step_inputs(self, first_step: jax.Array, batches: Sequence[Any], length: int):
        """The chunk's batches stacked on a new leading axis of size `length`."""
        del first_step, length
        return jax.tree.map(lambda *values: jnp.stack(values), *batches)

    def step_batch(self, batches: Sequence[Any], batch: Any):
        """One step's batch: its row of the stack, as it is."""
        del batches
        return batch


def _padded_chunk(next_batch: Callable[[], tuple[Any, Any]], count: int, length: int) -> tuple:
    """The next `count` batches from `next_batch`, padded to `length` with the last one."""
    if not 1 <= count <= length:
        raise ValueError(f"count must be in [1, {length}], got {count}")
    batches = [next_batch()[0] for _ in range(count)]
    return tuple(batches + [batches[-1]] * (length - count))


class StreamingData:
    """A dataset streamed from the host through a grain pipeline, prefetched to the device.

    A `TrainData` whose chunk program takes the chunk's batches as its data argument
    (`program` is `HostBatches`).

    For data that does not fit on the device. Each process reads its own shard
    (examples `process_index::process_count`, after cutting the set to a multiple of
    `process_count` so every shard has the same length), shuffles it with a new
    permutation every epoch (grain's `shuffle`, seeded by `seed + epoch`), applies the
    `transforms` to each example on the host, and batches `batch_size // process_count`
    examples, dropping each epoch's incomplete last batch. A background thread puts
    the next `prefetch` batches on the device while the device computes.

    Determinism: the batch of step s depends only on (seed, s, the data and the
    transforms), not on timing or threads. The position in the stream is the grain
    iterator's state (`get_state`/`set_state`) after the last batch `fit` used; it is
    saved with every checkpoint (`data_state`), so a resumed run sees exactly the
    batches an uninterrupted run would have seen. The prefetched batches that were not
    used yet are dropped and read again after a resume.

    Args:
      source: {"x": (N, ...), "y": (N,)} host arrays (numpy or `np.memmap`), or any
        random-access source (`len()` and `source[i] -> {name: array}`, e.g. a grain
        `ArrayRecordDataSource` with a parsing map) of N examples.
      batch_size: global batch size (all processes together); a multiple of
        `process_count`.
      seed: shuffle and augmentation seed, in [0, 2**32).
      transforms: per-example host-side maps `(example, rng) -> example`, applied in
        order; `rng` is a `np.random.Generator` seeded from (seed, transform, epoch,
        position), so augmentations differ per epoch and are reproducible.
      prefetch: how many batches wait on the device (the queue bound).
      worker_threads: grain threads reading and transforming examples.
      sharding: where batches go (`jax.device_put` target); with several processes, a
        sharding of the global batch built with `jax.make_array_from_process_local_data`.
      process_index: this process's index among `process_count` (default: JAX's).
      process_count: how many processes share the data (default: JAX's).

    Raises:
      ValueError: sizes disagree.
      BatchSizeError: (a ValueError) the batch does not split over the processes, or
        the data (a shard) has fewer examples than one batch.
    """

    kind = "streaming"
    program = HostBatches()

    def __init__(
        self,
        source: Mapping[str, np.ndarray] | Any,
        *,
        batch_size: int,
        seed: int,
        transforms: Sequence[Transform] = (),
        prefetch: int = 2,
        worker_threads: int = 2,
        sharding: jax.sharding.Sharding | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        import grain  # imported here: it adds seconds to `import jdl`, and only streams need it

        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if isinstance(source, Mapping):
            source = ArraySource(source)
        if batch_size < 1 or batch_size % self.process_count:
            raise BatchSizeError(
                f"batch_size {batch_size} must be >= 1 and a multiple of the process count "
                f"{self.process_count}"
            )
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.batch_size, self.seed, self.sharding = batch_size, seed, sharding
        self.local_batch_size = batch_size // self.process_count
        self.num_examples = len(source) - len(source) % self.process_count
        shard_size = self.num_examples // self.process_count
        if shard_size < self.local_batch_size and self.process_count == 1:
            raise BatchSizeError(
                f"batch_size {batch_size} is larger than the dataset ({shard_size} examples): "
                "each epoch drops its incomplete last batch, so no step could be drawn; use a "
                f"batch size of at most {shard_size}"
            )
        if shard_size < self.local_batch_size:
            raise BatchSizeError(
                f"each of the {self.process_count} process shards has {shard_size} examples, "
                f"fewer than one batch of {self.local_batch_size} (batch_size {batch_size} / "
                f"{self.process_count} processes); use a batch size of at most "
                f"{shard_size * self.process_count}"
            )
        self.steps_per_epoch = shard_size // self.local_batch_size
        dataset = grain.MapDataset.source(source)[: self.num_examples]
        dataset = dataset[self.process_index :: self.process_count].shuffle(seed=seed)
        for i, transform in enumerate(transforms):
            dataset = dataset.random_map(transform, seed=(seed + 7919 * (i + 1)) % 2**32)
        # Batched per epoch, then repeated: grain passes the epoch on to `shuffle`
        # (a new permutation each epoch) and to `random_map` (new augmentations).
        dataset = dataset.batch(self.local_batch_size, drop_remainder=True).repeat(None)
        read_options = grain.ReadOptions(
            num_threads=worker_threads, prefetch_buffer_size=max(prefetch, worker_threads)
        )
        self._iterator = iter(dataset.to_iter_dataset(read_options))
        self._position = self._iterator.get_state()  # after the last batch handed out
        self._prefetch = prefetch
        self._prefetcher: _DevicePrefetcher | None = None

    def next_batch(self) -> tuple[dict[str, jax.Array], dict]:
        """The next batch on the device and the iterator state after it."""
        if self._prefetcher is None:
            # The thread gets no reference to `self`, so dropping the object stops it.
            to_device = functools.partial(_to_device, self.sharding, self.process_count > 1)
            self._prefetcher = _DevicePrefetcher(self._iterator, to_device, self._prefetch)
        batch, self._position = self._prefetcher.get()
        return batch, self._position

    def chunk_inputs(self, count: int, length: int) -> tuple[dict[str, jax.Array], ...]:
        """The next `count` batches, padded to `length` by repeating the last one.

        The chunk program skips the steps past its stop step, so the padding is never
        trained on and the stream advances by exactly `count` batches.
        """
        return _padded_chunk(self.next_batch, count, length)

    def data_state(self, step: int) -> dict:
        """The JSON-able stream position after the batches handed out so far."""
        return {
            "kind": self.kind,
            "step": int(step),
            "iterator": self._position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "process_count": self.process_count,
        }

    def restore_data_state(self, data_state: Mapping[str, Any]) -> None:
        """Moves the stream to a checkpoint's position (see `data_state`).

        Raises:
          DataSetupMismatchError: another kind of data, seed, size, batch size or
            process count.
        """
        check_same_setup(
            data_state,
            self.data_state(0),
            keys=("kind", "seed", "num_examples", "batch_size", "process_count"),
        )
        self.close()
        self._iterator.set_state(data_state["iterator"])
        self._position = self._iterator.get_state()

    def place_on_mesh(self, placement: MeshPlacement) -> None:
        """Sends batches split over the mesh's batch axes, unless `sharding` was given."""
        if self.sharding is None:
            self.sharding = placement.batch_sharding

    def close(self) -> None:
        """Stops the prefetch thread and rewinds the stream to the last batch handed out.

        The next `next_batch` starts prefetching again, so `fit` can be called again.
        """
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
            self._iterator.set_state(self._position)

    def __del__(self):
        prefetcher = getattr(self, "_prefetcher", None)
        if prefetcher is not None:
            prefetcher.close()


class IterableData:
    """Batches from a Python iterator, fed to the device like `StreamingData` (a `TrainData`).

    For a source jdl has no class for: a generator, a Hugging Face dataset
    (`lambda: dataset.with_format("numpy").iter(batch_size, drop_last_batch=True)`), a
    reader of one's own files. `make_iterator()` returns an iterator of batches, each a
    dict {name: array} of `batch_size // process_count` rows (this process's share of the
    global batch); every batch has the first one's names, shapes and dtypes. A background
    thread checks each batch (rows, layout, finite values), puts it on the device and keeps
    `prefetch` of them ready while the device computes. The chunk program's data argument
    is the chunk's batches (`program` is `HostBatches`), as for `StreamingData`.

    Resume: the position is the number of batches handed to `fit`. A resumed run calls
    `make_iterator()` again and skips that many batches (read on the host, never sent to
    the device). An exact resume therefore needs `make_iterator()` to yield the same
    batches in the same order on every call: seed every shuffle and augmentation (and
    record the seed in `setup`); draw nothing from the clock or global random state. The
    iterator must yield a batch for every step of the run (loop over the epochs inside
    it); one that ends early stops the run with `IterableDataError`.

    Args:
      make_iterator: `() -> Iterator[{name: array}]`, called lazily: at the first batch,
        and again at the first batch after `restore_data_state`.
      batch_size: global batch size (all processes together); a multiple of
        `process_count`.
      setup: JSON-able facts that fix the batches (dataset name, seed, ...): saved with
        every checkpoint and compared on resume, so that a resume with another set-up
        raises `DataSetupMismatchError` instead of training on other batches.
      prefetch: how many batches wait on the device.
      sharding: where batches go (`jax.device_put` target); with several processes, a
        sharding of the global batch (`fit` with a mesh sets it).
      process_count: how many processes share the data (default: JAX's); each one's
        iterator yields its own rows.

    Raises:
      BatchSizeError: (a ValueError) the batch does not split over the processes.
      IterableDataError: (a ValueError) `make_iterator` is not callable, `setup` is not a
        JSON-able dict, or `prefetch` < 1.
    """

    kind = "iterable"
    program = HostBatches()

    def __init__(
        self,
        make_iterator: Callable[[], Iterator[Mapping[str, Any]]],
        *,
        batch_size: int,
        setup: Mapping[str, Any] | None = None,
        prefetch: int = 2,
        sharding: jax.sharding.Sharding | None = None,
        process_count: int | None = None,
    ):
        if not callable(make_iterator):
            raise IterableDataError(
                f"make_iterator must be a function that returns a new iterator of batches "
                f"(e.g. lambda: iter(batches)), got a {type(make_iterator).__name__}"
            )
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size < 1 or batch_size % self.process_count:
            raise BatchSizeError(
                f"batch_size {batch_size} must be >= 1 and a multiple of the process count "
                f"{self.process_count}"
            )
        if prefetch < 1:
            raise IterableDataError(f"prefetch must be >= 1, got {prefetch}")
        try:
            self.setup = _json_normal(dict(setup or {}))
        except (TypeError, ValueError):
            raise IterableDataError(
                f"setup must be a dict of JSON values (numbers, strings, lists, dicts), got "
                f"{setup!r}"
            ) from None
        self.batch_size, self.sharding = batch_size, sharding
        self.local_batch_size = batch_size // self.process_count
        self._make_iterator = make_iterator
        self._prefetch = prefetch
        self._reader: _BatchReader | None = None  # made at the first batch
        self._position = 0  # batches handed out
        self._pending: collections.deque = collections.deque()  # read, then `close`d
        self._prefetcher: _DevicePrefetcher | None = None

    def next_batch(self) -> tuple[dict[str, jax.Array], int]:
        """The next batch on the device and the number of batches handed out after it."""
        if self._pending:
            batch, self._position = _unpack(self._pending.popleft())
            return batch, self._position
        if self._prefetcher is None:
            if self._reader is None:
                self._reader = _BatchReader(
                    self._make_iterator(), rows=self.local_batch_size, skip=self._position
                )
            to_device = functools.partial(_to_device, self.sharding, self.process_count > 1)
            self._prefetcher = _DevicePrefetcher(self._reader, to_device, self._prefetch)
        batch, self._position = self._prefetcher.get()
        return batch, self._position

    def chunk_inputs(self, count: int, length: int) -> tuple[dict[str, jax.Array], ...]:
        """The next `count` batches, padded to `length` by repeating the last one (the
        padding is never trained on; the position advances by exactly `count`)."""
        return _padded_chunk(self.next_batch, count, length)

    def data_state(self, step: int) -> dict:
        """The JSON-able position (batches handed out so far) and the set-up."""
        return {
            "kind": self.kind,
            "step": int(step),
            "batches": self._position,
            "batch_size": self.batch_size,
            "process_count": self.process_count,
            "setup": self.setup,
        }

    def restore_data_state(self, data_state: Mapping[str, Any]) -> None:
        """Checks the set-up; the next batch comes from a new iterator, past the
        `data_state["batches"]` batches already trained on.

        Raises:
          DataSetupMismatchError: another kind of data, batch size, process count or setup.
        """
        check_same_setup(
            data_state,
            self.data_state(0),
            keys=("kind", "batch_size", "process_count", "setup"),
        )
        self.close()
        self._pending.clear()
        self._reader = None
        self._position = int(data_state["batches"])

    def place_on_mesh(self, placement: MeshPlacement) -> None:
        """Sends batches split over the mesh's batch axes, unless `sharding` was given."""
        if self.sharding is None:
            self.sharding = placement.batch_sharding

    def close(self) -> None:
        """Stops the prefetch thread. The batches it read ahead are kept (on the device)
        and handed out first by the next `fit`, so nothing is read twice or lost."""
        if self._prefetcher is not None:
            self._pending.extend(self._prefetcher.close())
            self._prefetcher = None

    def __del__(self):
        prefetcher = getattr(self, "_prefetcher", None)
        if prefetcher is not None:
            prefetcher.close()


class _BatchReader:
    """A user's iterator of host batches, checked batch by batch and counted.

    `get_state()` is the number of batches read (those skipped at the start included), the
    position `IterableData` saves. Runs in the prefetch thread, so its errors reach `fit`
    through `_unpack`.
    """

    def __init__(self, iterator: Iterator[Mapping[str, Any]], *, rows: int, skip: int):
        self._iterator = iter(iterator)
        self.rows = rows
        self._layout: dict | None = None
        for skipped in range(skip):  # read on the host and dropped: already trained on
            if next(self._iterator, _END) is _END:
                raise IterableDataError(
                    f"the IterableData iterator ended after {skipped} batches while skipping "
                    f"the {skip} that the checkpoint had trained on; make_iterator must yield "
                    "the same batches on every call"
                )
        self.position = skip

    def __iter__(self) -> _BatchReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator, _END)
        if batch is _END:
            raise IterableDataError(
                f"the IterableData iterator ended after {self.position} batches, but the run "
                "needs more: yield a batch for every step (loop over the epochs inside it)"
            )
        batch = self._checked(batch)
        self.position += 1
        return batch

    def get_state(self) -> int:
        return self.position

    def _checked(self, batch: Any) -> dict[str, np.ndarray]:
        where = f"IterableData batch {self.position}"
        if not isinstance(batch, Mapping) or not batch:
            raise IterableDataError(
                f"{where} is {type(batch).__name__!r}, not a non-empty dict of arrays such as "
                "{'x': ..., 'y': ...}"
            )
        arrays = {name: np.asarray(value) for name, value in batch.items()}
        for name, value in arrays.items():
            if value.dtype.kind not in "biufc":
                raise IterableDataError(
                    f"{where}: array {name!r} has dtype {value.dtype}, which cannot go on the "
                    "device; yield numbers only (tokenize or encode text first)"
                )
            if value.ndim == 0 or value.shape[0] != self.rows:
                raise IterableDataError(
                    f"{where}: array {name!r} has shape {value.shape}, but every batch needs "
                    f"{self.rows} rows (batch_size / process count); drop the incomplete last "
                    "batch of an epoch"
                )
        layout = {name: (value.shape, str(value.dtype)) for name, value in arrays.items()}
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise IterableDataError(
                f"{where} has arrays {layout}, but the first batch had {self._layout}; every "
                "batch needs the same names, shapes and dtypes (pad variable lengths)"
            )
        check_finite(arrays, where=where)
        return arrays


_END = object()


class ArraySource:
    """A grain random-access source over equal-length host arrays: `source[i] -> {name: row}`.

    The arrays are checked once for NaN and infinities (`check_finite`, one pass on the
    host), as `InMemoryData` checks its arrays: a bad input is named here instead of
    showing up later as a non-finite loss.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], *, where: str = "StreamingData"):
        sizes = {name: len(value) for name, value in arrays.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"arrays must be non-empty and agree in length, got {sizes}")
        self.arrays = {name: np.asarray(value) for name, value in arrays.items()}
        check_finite(self.arrays, where=where)
        self._length = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Example:
        return {name: value[index] for name, value in self.arrays.items()}


def _to_device(
    sharding: jax.sharding.Sharding | None, multi_process: bool, batch: Example
) -> dict[str, jax.Array]:
    """Puts a host batch on the device(s); with several processes, as one global array."""
    if multi_process and sharding is not None:
        return {
            name: jax.make_array_from_process_local_data(sharding, value)
            for name, value in batch.items()
        }
    return jax.device_put(batch, sharding)


class _DevicePrefetcher:
    """A daemon thread that reads batches, puts them on the device and queues them.

    The queue is bounded, so at most `size` batches wait on the device (plus one being
    put). Each item carries the iterator state after its batch, which becomes the
    stream position once the consumer takes it. An exception in the thread is raised
    in the consumer (a `UserError` as it is, anything else inside a RuntimeError).
    """

    def __init__(self, iterator, to_device: Callable, size: int):
        self._iterator, self._to_device = iterator, to_device
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._unsent: list = []  # read while stopping: kept, not lost (see `close`)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jdl-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._iterator)
                item = (self._to_device(batch), self._iterator.get_state())
                if not self._put(item):
                    self._unsent.append(item)
        except BaseException as error:  # handed to the consumer, which raises it
            failure = _Failure(error)
            if not self._put(failure):
                self._unsent.append(failure)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> tuple[dict[str, jax.Array], dict]:
        return _unpack(self._queue.get())

    def close(self) -> list:
        """Stops the thread; returns the items read but not taken, in order."""
        self._stop.set()
        self._thread.join()
        left = []
        while True:
            try:
                left.append(self._queue.get_nowait())
            except queue.Empty:
                return left + self._unsent


def _unpack(item) -> tuple[dict[str, jax.Array], Any]:
    """A prefetched (batch, state) item, or the error the reading thread met, raised."""
    if isinstance(item, _Failure):
        if isinstance(item.error, UserError):
            raise item.error
        raise RuntimeError("reading the next training batch failed") from item.error
    return item


@dataclass
class _Failure:
    error: BaseException
