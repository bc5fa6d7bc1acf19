"""Feeding batches to the training loop.

`InMemoryData` is the fast path for datasets that fit on the device: the
arrays are put on the device once, and batches are drawn *inside* the jitted
chunk of training steps: a fresh permutation per epoch, from
`fold_in(seed_key, epoch)`. No host work and no transfer happens per step, and
the data position is a pure function of the step, so resuming at step s sees
exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

_SHUFFLE_SALT = 0x5EED


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
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays disagree on the number of examples: {sizes}")
        self.num_examples = next(iter(sizes.values()))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > self.num_examples:
            raise ValueError(
                f"batch_size {batch_size} is larger than the dataset ({self.num_examples} "
                "examples); lower the batch size"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.sampler = BatchSampler(seed, self.num_examples, batch_size)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.arrays = {
            name: jax.device_put(np.asarray(value), sharding) for name, value in arrays.items()
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
                raise ValueError(
                    f"the checkpoint was written with data {key}={data_state[key]}, but this "
                    f"run uses {getattr(self, key)}; resuming would not see the same batches. "
                    "Use the original settings or a new workdir."
                )
