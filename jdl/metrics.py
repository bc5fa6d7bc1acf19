"""Classification metrics for jdl, plus host-side averaging of metric dicts.

The metric functions are pure and safe under `jax.jit`/`jax.vmap`, so they can live inside a
compiled eval step next to the loss. Like `jdl.losses`, they take keyword-only arguments and
return PER-EXAMPLE values (0/1 correctness) rather than a batch mean, so the caller can mask
padding or weight examples with `jdl.losses.weighted_mean` before reducing.

Tie-breaking is the same everywhere: among equal logits the lower class index ranks higher,
which is what `jnp.argmax` and `jax.lax.top_k` do. In particular all-equal logits (e.g. a
freshly zero-initialised head) predict class 0; ties never count as correct for every class.

`MetricAverager` runs on the host: it pulls the (already reduced) scalars of each eval batch
off the device and keeps a weighted running average across batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jdl.errors import UserError

__all__ = [
    "FrechetInputError",
    "MetricAverager",
    "accuracy",
    "confusion_matrix",
    "feature_statistics",
    "frechet_distance",
    "topk_accuracy",
]


def _check_logits_labels(logits: jax.Array, labels: jax.Array) -> None:
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must have a floating dtype, got {logits.dtype}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have a non-empty trailing class axis (..., C), got shape {logits.shape}."
        )
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            "logits.shape[:-1] must equal labels.shape, got "
            f"logits.shape={logits.shape} and labels.shape={labels.shape}."
        )


def accuracy(*, logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    """Per-example top-1 correctness.

    Args:
      logits: float array `(..., C)`.
      labels: integer array `(...)` (= `logits.shape[:-1]`).

    Returns:
      float32 array of shape `labels.shape`: 1.0 where `argmax(logits) == label`, else 0.0.
      Ties go to the lowest class index. Labels outside `[0, C)` are never correct.

    Raises:
      ValueError: if `logits.shape[:-1] != labels.shape` or there is no class axis.
      TypeError: if `logits` is not floating or `labels` is not integer.

    Example:
      >>> import jax.numpy as jnp
      >>> accuracy(logits=jnp.array([[0.1, 0.9], [0.8, 0.2]]), labels=jnp.array([1, 1]))
      Array([1., 0.], dtype=float32)
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _check_logits_labels(logits, labels)
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def topk_accuracy(*, logits: ArrayLike, labels: ArrayLike, k: int) -> jax.Array:
    """Per-example top-k correctness: is the label among the `k` largest logits?

    Implemented as a rank computation rather than a sort: the label's rank is the number of
    classes that beat it (a strictly larger logit, or an equal logit at a lower index), and
    the example is correct when that rank is below `k`. This is O(C) per example, and the
    tie-breaking matches `accuracy` (so `k=1` reproduces it exactly) and `jax.lax.top_k`.

    Args:
      logits: float array `(..., C)`.
      labels: integer array `(...)` (= `logits.shape[:-1]`).
      k: static Python int with `1 <= k <= C`.

    Returns:
      float32 array of shape `labels.shape` with 1.0 / 0.0. Labels outside `[0, C)` are never
      correct.

    Raises:
      ValueError: on a shape mismatch, a missing class axis, or `k` outside `[1, C]`.
      TypeError: if `logits` is not floating, `labels` is not integer, or `k` is not an int.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _check_logits_labels(logits, labels)
    num_classes = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"k must be a Python int, got {type(k).__name__}.")
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in [1, {num_classes}] for {num_classes} classes, got {k}.")

    valid = (labels >= 0) & (labels < num_classes)
    safe_labels = jnp.clip(labels, 0, num_classes - 1)
    label_logit = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)
    class_index = jnp.arange(num_classes)
    beats_label = (logits > label_logit) | (
        (logits == label_logit) & (class_index < safe_labels[..., None])
    )
    rank = jnp.sum(beats_label, axis=-1)
    return (valid & (rank < k)).astype(jnp.float32)


def confusion_matrix(*, logits: ArrayLike, labels: ArrayLike, num_classes: int) -> jax.Array:
    """Confusion matrix of argmax predictions against labels.

    Same convention as `sklearn.metrics.confusion_matrix(labels, predictions)`: entry
    `[i, j]` counts examples with true label `i` predicted as class `j`, so rows sum to the
    per-class support. Built with a single scatter-add, so it jit-compiles to one kernel and
    matrices from several batches (or devices) can simply be summed.

    Args:
      logits: float array `(..., num_classes)`; all leading axes are treated as examples.
      labels: integer array `(...)` (= `logits.shape[:-1]`).
      num_classes: static Python int, must equal `logits.shape[-1]`.

    Returns:
      int32 array `(num_classes, num_classes)`. Examples whose label is outside
      `[0, num_classes)` (e.g. -1 padding) are not counted.

    Raises:
      ValueError: on a shape mismatch or if `logits.shape[-1] != num_classes`.
      TypeError: if `logits` is not floating or `labels` is not integer.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
      >>> confusion_matrix(logits=logits, labels=jnp.array([0, 1, 1]), num_classes=2)
      Array([[1, 0],
             [1, 1]], dtype=int32)
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _check_logits_labels(logits, labels)
    if logits.shape[-1] != num_classes:
        raise ValueError(
            f"logits.shape[-1] must equal num_classes, got logits.shape={logits.shape} and "
            f"num_classes={num_classes}."
        )
    predictions = jnp.argmax(logits, axis=-1).reshape(-1)
    labels = labels.reshape(-1)
    valid = (labels >= 0) & (labels < num_classes)
    # JAX wraps negative indices and drops or clips out-of-range ones depending on the mode;
    # rather than rely on either, clip to a legal cell and add 0 there for invalid labels.
    flat_index = jnp.clip(labels, 0, num_classes - 1) * num_classes + predictions
    counts = jnp.zeros(num_classes * num_classes, jnp.int32)
    counts = counts.at[flat_index].add(valid.astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


class MetricAverager:
    """Host-side running weighted average of flat dicts of scalar metrics.

    Meant for aggregating per-batch results on the host, e.g. over the batches of an eval
    pass: each `add` converts its values with `np.asarray` (which waits for the device and
    copies to host memory), so keep it out of compiled code and call it once per batch with
    already-reduced scalars. Sums are kept as Python floats (float64) so long runs do not
    drift.

    Each key is averaged over the `add` calls that contained it, with its own total weight,
    so a metric that is only reported on some batches is still averaged correctly.

    Example:
      averager = MetricAverager()
      for batch in eval_batches:
          metrics = eval_step(state, batch)        # {"loss": scalar, "accuracy": scalar}
          averager.add(metrics, weight=batch_size)  # weight by examples in the batch
      summary = averager.result()
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: Mapping[str, ArrayLike], weight: float = 1.0) -> None:
        """Accumulates one set of scalar metrics with the given weight.

        Args:
          metrics: mapping from name to a scalar (Python number, NumPy or JAX array with a
            single element).
          weight: finite, non-negative weight for these values (e.g. the number of real
            examples in the batch). Weight 0 records the keys but does not move the average.

        Raises:
          ValueError: if a value is not a single element or `weight` is negative or not
            finite. Nothing is accumulated when this is raised.
        """
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be finite and >= 0, got {weight}.")
        # Convert and validate everything first so that a bad entry leaves the state intact.
        converted: dict[str, float] = {}
        for name, value in metrics.items():
            array = np.asarray(value)
            if array.size != 1:
                raise ValueError(
                    f"metric {name!r} must be a scalar, got an array of shape {array.shape}."
                )
            converted[name] = float(array.reshape(()))
        for name, value in converted.items():
            # A zero-weight value is skipped outright so a NaN from an empty batch cannot
            # poison the sum (0 * nan is nan).
            contribution = weight * value if weight > 0 else 0.0
            self._sums[name] = self._sums.get(name, 0.0) + contribution
            self._weights[name] = self._weights.get(name, 0.0) + weight

    def result(self) -> dict[str, float]:
        """Weighted average of every key seen since the last `reset`.

        Returns:
          Dict name -> `sum(weight * value) / sum(weight)`; NaN for a key whose total weight
          is 0. Empty if nothing was added.
        """
        return {
            name: (total / self._weights[name]) if self._weights[name] > 0 else math.nan
            for name, total in self._sums.items()
        }

    def reset(self) -> None:
        """Forgets everything accumulated so far."""
        self._sums.clear()
        self._weights.clear()


# ------------------------------------------------------------------ distances between sets


class FrechetInputError(UserError, ValueError):
    """Means and covariances that do not describe two Gaussians of one dimension."""


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), float64, N >= 2.

    The covariance is the unbiased one (divides by N - 1), as in the reference FID code.
    """
    array = np.asarray(features, np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise FrechetInputError(f"features must have shape (N, D) with N >= 2, got {array.shape}")
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike) -> float:
    """The squared Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

    d = |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2)), the FID formula.
    tr((cov1 cov2)^(1/2)) is computed as tr((S cov2 S)^(1/2)) with S = cov1^(1/2): both
    square roots are of symmetric positive semi-definite matrices, so they come from
    `eigh` with tiny negative eigenvalues (rounding) clipped to 0 -- real, no complex
    `sqrtm`, and stable for singular covariances (fewer samples than dimensions).
    Computed on the host in float64.

    Args:
      mu1: the first mean, shape (D,).
      cov1: the first covariance, symmetric positive semi-definite (D, D).
      mu2: the second mean, shape (D,).
      cov2: the second covariance, (D, D).

    Returns:
      The distance (>= 0 up to rounding) as a Python float.

    Raises:
      FrechetInputError: shapes that do not fit one dimension D, or non-finite values.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu2.shape != (dim,) or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise FrechetInputError(
            "frechet_distance needs means (D,) and covariances (D, D) of one D, got "
            f"{mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, cov1, cov2)):
        raise FrechetInputError("frechet_distance got NaN or infinite means or covariances")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T
