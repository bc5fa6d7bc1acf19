"""The in-memory dataset type that every small-data loader returns.

A `Dataset` is a set of named splits ("train", "test", optionally "validation"),
each a dict of NumPy arrays with a shared leading example dimension. Inputs are
under "x" and integer targets under "y"; models and losses read those keys.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jdl.errors import UserError

Split = dict[str, np.ndarray]


class NonFiniteDataError(UserError, ValueError):
    """A floating-point input array holds NaN or infinity."""


class EmptyDataError(UserError, ValueError):
    """A data split has no examples, or its arrays disagree on how many there are."""


def check_finite(arrays: Split, *, where: str) -> None:
    """Raises if a floating-point array in `arrays` holds NaN or +-inf.

    One vectorised pass on the host per array (integer arrays are skipped), so it
    is cheap next to training; loaders and `InMemoryData` call it once.

    Args:
      arrays: name -> array with a leading example dimension.
      where: what the arrays are, for the message (e.g. "mnist/train").

    Raises:
      NonFiniteDataError: naming the array, the first bad example index, the
        position inside it and the bad value.
    """
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind not in "fc" or value.size == 0:
            continue
        finite = np.isfinite(value)
        if finite.all():
            continue
        position = np.unravel_index(int(np.argmin(finite.reshape(-1))), value.shape)
        index = int(position[0]) if value.ndim else 0
        raise NonFiniteDataError(
            f"{where}: array {name!r} holds {value[position]} at example {index} "
            f"(position {tuple(int(i) for i in position)}); clean or drop such examples "
            "before training"
        )


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Named splits of host arrays plus the facts a model needs.

    Attributes:
      name: short dataset name, e.g. "mnist".
      splits: split name -> {"x": array (N, ...), "y": int32 array (N,)}.
      num_classes: number of target classes (0 for regression).
      source: one human-readable line saying where the data came from.
    """

    name: str
    splits: dict[str, Split]
    num_classes: int
    source: str

    def __post_init__(self):
        for split_name, arrays in self.splits.items():
            sizes = {key: len(value) for key, value in arrays.items()}
            if len(set(sizes.values())) != 1:
                raise ValueError(
                    f"{self.name}/{split_name}: arrays disagree on the number of examples: {sizes}"
                )
            check_finite(arrays, where=f"{self.name}/{split_name}")

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise KeyError(f"{self.name} has no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[split]

    def num_examples(self, split: str) -> int:
        """The number of examples in `split`."""
        return len(self[split]["y"])


def stratified_split(split: Split, *, fraction: float, seed: int) -> tuple[Split, Split]:
    """Splits one split into two, keeping class proportions, deterministically.

    Args:
      split: {"x": (N, ...), "y": int (N,)}.
      fraction: share of each class that goes to the second part, in (0, 1).
      seed: fixes which examples go where.

    Returns:
      (first, second): the two parts, each in a seeded shuffled order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(split["y"])
    rng = np.random.default_rng(seed)
    first_idx, second_idx = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_second = int(round(len(members) * fraction))
        second_idx.append(members[:n_second])
        first_idx.append(members[n_second:])
    first = rng.permutation(np.concatenate(first_idx))
    second = rng.permutation(np.concatenate(second_idx))
    return (
        {key: value[first] for key, value in split.items()},
        {key: value[second] for key, value in split.items()},
    )
