"""Feeding batches to the training loop.

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

Both classes offer `fit` the same interface: `batch_size`, `steps_per_epoch`,
`chunk_inputs(count, length)` (the data argument of one chunk program),
`data_state(step)`, `restore_data_state(saved)` and `close()`.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    same sampler draw their batches the same way; only the arrays passed in differ).
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

    def batch_at(self, arrays: Mapping[str, jax.Array], order: jax.Array, step: jax.Array):
        """The batch for global `step`, given the current epoch's `order`. Traceable."""
        position = (step % self.steps_per_epoch) * self.batch_size
        indices = jax.lax.dynamic_slice(order, (position,), (self.batch_size,))
        return self.take_batch(arrays, indices)

    def chunk_indices(self, first_step: jax.Array, length: int) -> jax.Array:
        """Example indices, int32 (length, batch_size), of steps `first_step + i`. Traceable.

        Row i equals the indices `batch_at` uses for step `first_step + i`, across epoch
        boundaries too. Computed once before a chunk's loop, so the loop body only
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


class InMemoryData:
    """A dataset held on the device, shuffled every epoch inside jit.

    Each epoch is a new permutation of all examples; the last incomplete batch
    of an epoch is dropped, so every batch has `batch_size` examples.

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

    def epoch_permutation(self, epoch: jax.Array) -> jax.Array:
        """The example order of `epoch` (int32 (N,)), identical on every call."""
        return self.sampler.epoch_permutation(epoch)

    def batch_at(self, arrays: Mapping[str, jax.Array], order: jax.Array, step: jax.Array):
        """The batch for global `step`, given the current epoch's `order`. Traceable."""
        return self.sampler.batch_at(arrays, order, step)

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

    def check_data_state(self, data_state: dict) -> None:
        """Raises if a checkpoint's data position was made with another data set-up."""
        for key in ("seed", "num_examples", "batch_size"):
            if key in data_state and data_state[key] != getattr(self, key):
                raise DataSetupMismatchError(
                    f"the checkpoint was written with data {key}={data_state[key]}, but this "
                    f"run uses {getattr(self, key)}; resuming would not see the same batches. "
                    "Use the original settings or a new workdir."
                )

    def restore_data_state(self, data_state: dict) -> None:
        """Checks a checkpoint's data position; the position itself follows from the step."""
        self.check_data_state(data_state)

    def chunk_inputs(self, count: int, length: int) -> Mapping[str, jax.Array]:
        """The data argument of a chunk program: the stored arrays (batches are drawn inside)."""
        del count, length
        return self.arrays

    def close(self) -> None:
        """Nothing to release (kept for the interface `fit` uses)."""


Example = dict[str, np.ndarray]
Transform = Callable[[Example, np.random.Generator], Example]


class StreamingData:
    """A dataset streamed from the host through a grain pipeline, prefetched to the device.

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
        if not 1 <= count <= length:
            raise ValueError(f"count must be in [1, {length}], got {count}")
        batches = [self.next_batch()[0] for _ in range(count)]
        return tuple(batches + [batches[-1]] * (length - count))

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

    def check_data_state(self, data_state: dict) -> None:
        """Raises if a checkpoint's data position was made with another data set-up."""
        if data_state.get("kind") != self.kind:
            raise DataSetupMismatchError(
                f"the checkpoint's data position is of kind {data_state.get('kind')!r}, but "
                f"this run streams its data ({self.kind!r}); use the original data set-up or "
                "a new workdir"
            )
        for key in ("seed", "num_examples", "batch_size", "process_count"):
            if data_state.get(key) != getattr(self, key):
                raise DataSetupMismatchError(
                    f"the checkpoint was written with data {key}={data_state.get(key)}, but "
                    f"this run uses {getattr(self, key)}; resuming would not see the same "
                    "batches. Use the original settings or a new workdir."
                )

    def restore_data_state(self, data_state: dict) -> None:
        """Moves the stream to a checkpoint's position (see `data_state`)."""
        self.check_data_state(data_state)
        self.close()
        self._iterator.set_state(data_state["iterator"])
        self._position = self._iterator.get_state()

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
    in the consumer.
    """

    def __init__(self, iterator, to_device: Callable, size: int):
        self._iterator, self._to_device = iterator, to_device
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jdl-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._iterator)
                item = (self._to_device(batch), self._iterator.get_state())
                self._put(item)
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(_Failure(error))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def get(self) -> tuple[dict[str, jax.Array], dict]:
        item = self._queue.get()
        if isinstance(item, _Failure):
            raise RuntimeError("reading the next training batch failed") from item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _Failure:
    error: BaseException
