"""Small in-memory datasets, the IDX file format and on-device image augmentations.

Every loader returns a `Dataset` whose splits are {"x": float32, "y": int32}.
`DATASETS` maps a dataset name to its loader, called with keyword arguments only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from jdl.data.augment import (
    cutout,
    mixup,
    random_crop,
    random_flip_left_right,
    random_translate,
    translate,
)
from jdl.data.cifar10 import CifarFormatError, load_cifar10
from jdl.data.cmudict import load_cmudict
from jdl.data.dataset import Dataset, NonFiniteDataError, check_finite, stratified_split
from jdl.data.digits import load_digits
from jdl.data.fsdd import load_fsdd, load_fsdd_recordings
from jdl.data.idx import IdxFormatError, read_idx, write_idx
from jdl.data.iris import load_iris
from jdl.data.mnist import ChecksumMismatchError, DatasetUnavailableError, load_mnist
from jdl.data.mnist1d import load_mnist1d
from jdl.data.tatoeba import TatoebaFormatError, load_tatoeba
from jdl.data.text import (
    CharVocab,
    RandomWindows,
    UnknownCharacterError,
    eval_windows,
    load_stdlib_source,
    load_text,
    split_text,
)
from jdl.data.tokenizer import (
    BPETokenizer,
    TokenizerFormatError,
    TokenizerNotFoundError,
    load_tokenizer,
)
from jdl.data.utterances import load_fsdd_utterances

DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist": load_mnist,
    "fashion_mnist": functools.partial(load_mnist, variant="fashion_mnist"),
    "iris": load_iris,
    "digits": load_digits,
    "cifar10": load_cifar10,
    "mnist1d": load_mnist1d,
}

__all__ = [
    "BPETokenizer",
    "CharVocab",
    "ChecksumMismatchError",
    "CifarFormatError",
    "DATASETS",
    "Dataset",
    "DatasetUnavailableError",
    "IdxFormatError",
    "NonFiniteDataError",
    "RandomWindows",
    "TatoebaFormatError",
    "TokenizerFormatError",
    "TokenizerNotFoundError",
    "UnknownCharacterError",
    "check_finite",
    "cutout",
    "eval_windows",
    "load_cifar10",
    "load_cmudict",
    "load_digits",
    "load_fsdd",
    "load_fsdd_recordings",
    "load_fsdd_utterances",
    "load_iris",
    "load_mnist",
    "load_mnist1d",
    "load_stdlib_source",
    "load_tatoeba",
    "load_text",
    "load_tokenizer",
    "mixup",
    "random_crop",
    "random_flip_left_right",
    "random_translate",
    "read_idx",
    "split_text",
    "stratified_split",
    "translate",
    "write_idx",
]
