"""CIFAR-10 from the standard python batches (`cifar-10-batches-py`).

The official archive `cifar-10-python.tar.gz` holds one directory,
`cifar-10-batches-py/`, with seven pickled files: `data_batch_1` ... `data_batch_5`
(50,000 training images), `test_batch` (10,000) and `batches.meta`. Each batch is a
dict with `b"data"`, a uint8 array (N, 3072) whose rows are one image in CHW order
(1024 red, then 1024 green, then 1024 blue values, each channel row-major), and
`b"labels"`, N ints in [0, 10).

Files are looked up in `data_dir`, else `$JDL_DATA_DIR/cifar10`, else
`~/.cache/jdl/cifar10`: first the extracted `cifar-10-batches-py/` directory, then
the archive beside it. A missing archive is downloaded (when allowed) and checked
against its published MD5 before anything is extracted; only the seven expected
regular files are extracted, by name, so a malicious archive cannot write elsewhere.
Batches are unpickled with an unpickler that only rebuilds NumPy arrays, so a
tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from jdl.data import download as downloads  # `download` is load_cifar10's flag.
from jdl.data.dataset import Dataset, Split
from jdl.data.download import DatasetUnavailableError
from jdl.errors import UserError

logger = logging.getLogger(__name__)

NAME = "cifar10"
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)  # (H, W, C) of the returned images.
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"
# Base URLs tried in order; the archive's URL is base + ARCHIVE.
MIRRORS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/",)
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
FILES = (*TRAIN_BATCHES, TEST_BATCH, META)
DOWNLOAD_TIMEOUT_S = 30.0

# Per-channel (R, G, B) mean and standard deviation of the 50,000 training images in
# [0, 1]: the statistics of all training pixels of each channel. (The often quoted std
# (0.2023, 0.1994, 0.2010) is the spread of per-image means, not of pixels.)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class CifarFormatError(UserError, ValueError):
    """A CIFAR-10 file is truncated, corrupt or not in the standard format."""


def load_cifar10(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    normalize: bool = False,
) -> Dataset:
    """Loads CIFAR-10 as a `Dataset` with "train" (50,000) and "test" (10,000) splits.

    Args:
      data_dir: directory holding `cifar-10-batches-py/` or `cifar-10-python.tar.gz`;
        None means `$JDL_DATA_DIR/cifar10`, else `~/.cache/jdl/cifar10`.
      download: fetch the archive from `MIRRORS` into `data_dir` when neither the
        batches nor the archive are there.
      normalize: False returns pixels in [0, 1]; True returns `(pixel - MEAN) / STD`
        per channel, the standard CIFAR normalisation (roughly zero mean, unit std).

    Returns:
      Splits {"x": float32 (N, 32, 32, 3) NHWC, RGB, "y": int32 (N,) in [0, 10)};
      class `i` is `CLASS_NAMES[i]`.

    Raises:
      DatasetUnavailableError: neither the batches nor the archive are present and the
        archive could not be downloaded (or `download` is False).
      ChecksumMismatchError: the local or downloaded archive has the wrong MD5.
      CifarFormatError: a batch or the archive is truncated or corrupt, a batch has
        the wrong shape or dtype, its label and image counts differ, or a label
        lies outside [0, 10).
    """
    directory = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    batches = directory / BATCHES_DIR
    missing = [name for name in FILES if not (batches / name).is_file()]
    if missing:
        _extract(_archive(directory, missing, download), batches, missing)
    _check_meta(batches / META)
    train = [read_batch(batches / name) for name in TRAIN_BATCHES]
    images = np.concatenate([x for x, _ in train])
    labels = np.concatenate([y for _, y in train])
    test_images, test_labels = read_batch(batches / TEST_BATCH)
    splits = {
        "train": _to_split(images, labels, normalize),
        "test": _to_split(test_images, test_labels, normalize),
    }
    scale = "normalised by the per-channel mean/std" if normalize else "in [0, 1]"
    return Dataset(
        name=NAME,
        splits=splits,
        num_classes=NUM_CLASSES,
        source=f"cifar10: standard python batches in {batches}, pixels {scale}",
    )


def default_data_dir() -> Path:
    """Returns `$JDL_DATA_DIR/cifar10` if the variable is set, else `~/.cache/jdl/cifar10`."""
    return downloads.default_data_dir(NAME)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one pickled CIFAR-10 batch.

    Args:
      path: a `data_batch_*` or `test_batch` file (a pickled dict, any protocol).

    Returns:
      (images uint8 (N, 32, 32, 3) NHWC, labels int32 (N,)).

    Raises:
      CifarFormatError: the file is truncated or corrupt, lacks `data` or `labels`,
        or holds arrays of the wrong shape, dtype, count or label range.
    """
    batch = _unpickle(path)
    data, labels = _entry(batch, "data", path), _entry(batch, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise CifarFormatError(
            f"{path}: expected uint8 data of shape (N, 3072), got {_describe(data)}; "
            f"{_replace_hint(path)}"
        )
    if data.shape[1] != 3072:
        raise CifarFormatError(
            f"{path}: expected rows of 3072 = 3 * 32 * 32 values, got shape {data.shape}; "
            f"{_replace_hint(path)}"
        )
    labels = _check_labels(labels, len(data), path)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    return images, labels


def _archive(directory: Path, missing: list[str], download: bool) -> Path:
    """The verified archive in `directory`, downloaded first if needed and allowed."""
    archive = directory / ARCHIVE
    if archive.is_file():
        downloads.verify(archive, ARCHIVE_MD5)
        return archive
    failure = "download disabled"
    if download:
        still_missing, failure = downloads.download_missing(
            [ARCHIVE], directory, MIRRORS, {ARCHIVE: ARCHIVE_MD5}, timeout_s=DOWNLOAD_TIMEOUT_S
        )
        if not still_missing:
            return archive
        failure = f"download failed ({failure})"
    raise DatasetUnavailableError(
        f"cifar10 files missing from {directory / BATCHES_DIR}: {', '.join(missing)}, and no "
        f"{ARCHIVE} in {directory}; {failure}. Put {ARCHIVE} (or its extracted {BATCHES_DIR}/) "
        f"in {directory}, pass data_dir=..., or set JDL_DATA_DIR to a directory whose "
        "cifar10/ subdirectory holds it"
    )


def _extract(archive: Path, batches: Path, names: list[str]) -> None:
    """Extracts `names` from the archive's `cifar-10-batches-py/` into `batches`.

    Each file is written to a temporary directory beside `batches` and renamed into
    place, so an interrupted extraction leaves no partial file under a real name.
    Members are read by exact name; links, absolute paths and other members are
    never written.
    """
    wanted = {f"{BATCHES_DIR}/{name}": name for name in names}
    batches.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=batches.parent, prefix=f".{BATCHES_DIR}."))
    try:
        found = _extract_members(archive, wanted, staging)
        absent = sorted(set(wanted.values()) - found)
        if absent:
            raise CifarFormatError(
                f"{archive}: the archive has no regular file {BATCHES_DIR}/{absent[0]}"
                f"{' (and others)' if len(absent) > 1 else ''}; it is not the standard "
                f"{ARCHIVE} -- delete it so it is downloaded again"
            )
        for name in names:
            os.replace(staging / name, batches / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("extracted %s from %s into %s", ", ".join(names), archive, batches)


def _extract_members(archive: Path, wanted: dict[str, str], staging: Path) -> set[str]:
    """Copies the regular-file members named in `wanted` into `staging`; returns their names."""
    found: set[str] = set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is None or not member.isfile():
                    continue
                source = tar.extractfile(member)
                with source, (staging / name).open("wb") as out:
                    shutil.copyfileobj(source, out)
                found.add(name)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise CifarFormatError(
            f"{archive}: truncated or corrupt archive ({err}); delete it so it is downloaded "
            "again, or replace it with the official file"
        ) from err
    return found


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only; any other global is refused."""

    _ALLOWED = {
        # NumPy < 2 (and the original files) name the module numpy.core; NumPy 2 numpy._core.
        ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes with protocol < 3 as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            # The original files were written by Python 2: its str keys load as bytes.
            return _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise CifarFormatError(
            f"{path}: truncated or corrupt pickle ({type(err).__name__}: {err}); "
            f"{_replace_hint(path)}"
        ) from err


def _entry(batch: Any, key: str, path: Path) -> Any:
    """`batch[key]`, accepting bytes keys (the original files) and str keys."""
    if isinstance(batch, dict):
        for candidate in (key.encode(), key):
            if candidate in batch:
                return batch[candidate]
    keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
    raise CifarFormatError(
        f"{path}: expected a pickled dict with {key!r}, got {keys}; {_replace_hint(path)}"
    )


def _check_labels(labels: Any, count: int, path: Path) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise CifarFormatError(
            f"{path}: expected a list of int labels, got {_describe(labels)}; {_replace_hint(path)}"
        )
    if len(labels) != count:
        raise CifarFormatError(
            f"{path} holds {len(labels)} labels but {count} images; {_replace_hint(path)}"
        )
    if labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
        raise CifarFormatError(
            f"{path}: labels must lie in [0, {NUM_CLASSES}), found "
            f"[{labels.min()}, {labels.max()}]; {_replace_hint(path)}"
        )
    return labels.astype(np.int32)


def _check_meta(path: Path) -> None:
    names = _entry(_unpickle(path), "label_names", path)
    if not isinstance(names, list | tuple) or len(names) != NUM_CLASSES:
        raise CifarFormatError(
            f"{path}: expected {NUM_CLASSES} label names, got {_describe(names)}; "
            f"{_replace_hint(path)}"
        )


def _to_split(images: np.ndarray, labels: np.ndarray, normalize: bool) -> Split:
    """uint8 NHWC images -> float32 in [0, 1], or standardised per channel."""
    x = images.astype(np.float32) / 255.0
    if normalize:
        x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return {"x": x, "y": labels}


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    if isinstance(value, list | tuple):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _replace_hint(path: Path) -> str:
    return (
        f"delete {path.parent} so it is extracted again from {ARCHIVE}, "
        "or replace it with the official files"
    )
