"""Fisher's iris flowers (bundled with scikit-learn): 150 examples, 4 features, 3 classes."""

from __future__ import annotations

import numpy as np

from jdl.data.dataset import Dataset, stratified_split


def load_iris(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Loads iris with a stratified train/test split and standardised features.

    Features are standardised with the train split's mean and standard
    deviation only, so nothing about the test split leaks into training.

    Args:
      seed: fixes the split.
      test_fraction: share of each class held out for "test", in (0, 1);
        0.2 gives 120 train / 30 test (40 / 10 per class).

    Returns:
      Splits {"x": float32 (N, 4), "y": int32 (N,) in [0, 3)}.

    Raises:
      ValueError: test_fraction outside (0, 1).
    """
    from sklearn.datasets import load_iris as sklearn_iris  # Deferred: sklearn imports slowly.

    bunch = sklearn_iris()
    everything = {"x": bunch.data.astype(np.float64), "y": bunch.target.astype(np.int32)}
    train, test = stratified_split(everything, fraction=test_fraction, seed=seed)
    mean = train["x"].mean(axis=0)
    std = train["x"].std(axis=0)
    for split in (train, test):
        split["x"] = ((split["x"] - mean) / std).astype(np.float32)
    return Dataset(
        name="iris",
        splits={"train": train, "test": test},
        num_classes=3,
        source=(
            f"iris from scikit-learn, stratified split (test_fraction={test_fraction}, "
            f"seed={seed}), features standardised with train statistics"
        ),
    )
