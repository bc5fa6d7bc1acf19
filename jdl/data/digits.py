"""Handwritten 8x8 digits (bundled with scikit-learn): 1,797 images, 10 classes."""

from __future__ import annotations

import numpy as np

from jdl.data.dataset import Dataset, stratified_split

_MAX_PIXEL = 16.0  # The images count set pixels in 4x4 blocks, so values are 0..16.


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Loads the scikit-learn digits as NHWC images with a stratified train/test split.

    Args:
      seed: fixes the split.
      test_fraction: share of each class held out for "test", in (0, 1);
        0.2 gives 1,438 train / 359 test.

    Returns:
      Splits {"x": float32 (N, 8, 8, 1) in [0, 1], "y": int32 (N,) in [0, 10)}.

    Raises:
      ValueError: test_fraction outside (0, 1).
    """
    from sklearn.datasets import load_digits as sklearn_digits  # Deferred: sklearn is slow.

    bunch = sklearn_digits()
    images = (bunch.images / _MAX_PIXEL).astype(np.float32)[..., None]
    everything = {"x": images, "y": bunch.target.astype(np.int32)}
    train, test = stratified_split(everything, fraction=test_fraction, seed=seed)
    return Dataset(
        name="digits",
        splits={"train": train, "test": test},
        num_classes=10,
        source=(
            f"8x8 digits from scikit-learn, stratified split (test_fraction={test_fraction}, "
            f"seed={seed})"
        ),
    )
