"""Small in-memory datasets, the IDX file format and on-device image augmentations.

Every loader returns a `Dataset` whose splits are {"x": float32, "y": int32}.
`DATASETS` maps a dataset name to its loader, called with keyword arguments only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from jdl.data.augment import random_crop, random_flip_left_right, random_translate, translate
from jdl.data.dataset import Dataset, stratified_split
from jdl.data.digits import load_digits
from jdl.data.idx import IdxFormatError, read_idx, write_idx
from jdl.data.iris import load_iris
from jdl.data.mnist import ChecksumMismatchError, DatasetUnavailableError, load_mnist

DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist": load_mnist,
    "fashion_mnist": functools.partial(load_mnist, variant="fashion_mnist"),
    "iris": load_iris,
    "digits": load_digits,
}

__all__ = [
    "DATASETS",
    "ChecksumMismatchError",
    "Dataset",
    "DatasetUnavailableError",
    "IdxFormatError",
    "load_digits",
    "load_iris",
    "load_mnist",
    "random_crop",
    "random_flip_left_right",
    "random_translate",
    "read_idx",
    "stratified_split",
    "translate",
    "write_idx",
]
