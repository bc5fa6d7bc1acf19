"""Loss functions for jdl training steps.

Every loss here is a pure function of JAX arrays and is safe to call under `jax.jit`,
`jax.grad` and `jax.vmap`. Conventions shared by all of them:

* Arguments are keyword-only, so `logits`/`labels` or `predictions`/`targets` can never be
  swapped silently.
* They return PER-EXAMPLE losses and never reduce: the caller decides how to average
  (plain mean, masked mean via `weighted_mean`, sum over tokens, ...).
* Shape and dtype problems are reported at trace time with `ValueError` / `TypeError`
  naming the offending shapes. Shapes must match exactly; nothing is broadcast implicitly,
  because an accidental broadcast (e.g. `(B,)` against `(B, 1)`) yields a `(B, B)` loss
  that still trains, just wrongly.
* Arithmetic runs in at least float32 (bfloat16/float16 inputs are upcast) and the result
  has that dtype, so log-sum-exp and the final reduction do not lose precision in
  low-precision training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

__all__ = [
    "binary_xent",
    "huber",
    "kl_divergence",
    "mse",
    "soft_xent",
    "softmax_xent",
    "weighted_mean",
]


# ---------------------------------------------------------------------------------------------
# Validation helpers (run at trace time: they only look at static shapes and dtypes).
# ---------------------------------------------------------------------------------------------


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """The float dtype the arithmetic runs in: the inputs' common float type, at least f32."""
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return jnp.promote_types(dtype, jnp.float32)


def _require_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}.")


def _require_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {name_a}.shape={a.shape} "
            f"and {name_b}.shape={b.shape}."
        )


def _require_class_axis(name: str, x: jax.Array) -> None:
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(
            f"{name} must have a non-empty trailing class axis (..., C), got shape {x.shape}."
        )


def _require_positive(name: str, value: float | jax.Array) -> None:
    # Only concrete Python numbers can be checked; a traced value is the caller's business.
    if isinstance(value, int | float) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")


# ---------------------------------------------------------------------------------------------
# Classification losses.
# ---------------------------------------------------------------------------------------------


def softmax_xent(
    *, logits: ArrayLike, labels: ArrayLike, label_smoothing: float = 0.0
) -> jax.Array:
    """Softmax cross-entropy against integer class labels, per example.

    With `label_smoothing = ls` the target distribution is `(1 - ls) * onehot + ls / C`,
    exactly as in PyTorch's `F.cross_entropy(..., label_smoothing=ls)`, so the loss is
    `(1 - ls) * nll + ls * mean_c(-log p_c)`.

    Args:
      logits: float array of shape `(..., C)`, unnormalised class scores.
      labels: integer array of shape `(...)` (= `logits.shape[:-1]`) with values in `[0, C)`.
      label_smoothing: float in `[0, 1]`.

    Returns:
      Float array of shape `labels.shape` (dtype at least float32). Examples whose label is
      outside `[0, C)` (negative ones included) get NaN, so a bad label shows up in the loss
      instead of silently training on a wrapped-around class. Padding examples (e.g. label
      -1) must be given weight 0 in `weighted_mean`, which excludes zero-weight entries
      entirely, NaN included.

    Raises:
      ValueError: if `logits.shape[:-1] != labels.shape`, `logits` has no class axis, or
        `label_smoothing` is outside `[0, 1]` (checked when it is a Python number; a traced
        value is used as is).
      TypeError: if `logits` is not floating or `labels` is not integer.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
      >>> softmax_xent(logits=logits, labels=jnp.array([0, 2])).round(4)
      Array([0.2395, 1.0986], dtype=float32)
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _require_float("logits", logits)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class indices, got dtype {labels.dtype}; "
            "use soft_xent for probability targets."
        )
    _require_class_axis("logits", logits)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            "logits.shape[:-1] must equal labels.shape, got "
            f"logits.shape={logits.shape} and labels.shape={labels.shape}."
        )
    if isinstance(label_smoothing, int | float) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")

    num_classes = logits.shape[-1]
    logits = logits.astype(_compute_dtype(logits))
    valid = (labels >= 0) & (labels < num_classes)
    # Clip only so the gather is well defined; invalid rows are replaced by NaN below.
    safe_labels = jnp.clip(labels, 0, num_classes - 1)
    if isinstance(label_smoothing, int | float) and label_smoothing == 0.0:
        # The common unsmoothed case gathers one logit per row instead of a one-hot product.
        loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    else:
        onehot = jax.nn.one_hot(safe_labels, num_classes, dtype=logits.dtype)
        targets = optax.smooth_labels(onehot, label_smoothing)
        loss = optax.losses.softmax_cross_entropy(logits, targets)
    return jnp.where(valid, loss, jnp.nan)


def soft_xent(*, logits: ArrayLike, targets: ArrayLike) -> jax.Array:
    """Softmax cross-entropy against a target distribution, per example.

    Computes `-sum_c targets[..., c] * log_softmax(logits)[..., c]`. Gradients flow into
    `targets` too; wrap them in `jax.lax.stop_gradient` when they come from another model.

    Args:
      logits: float array of shape `(..., C)`.
      targets: float array of shape `(..., C)`, each row a probability distribution (rows
        are not renormalised; a target summing to `s` scales the loss by `s`).

    Returns:
      Float array of shape `logits.shape[:-1]` (dtype at least float32).

    Raises:
      ValueError: if the shapes differ or there is no class axis.
      TypeError: if either input is not floating.
    """
    logits = jnp.asarray(logits)
    targets = jnp.asarray(targets)
    _require_float("logits", logits)
    _require_float("targets", targets)
    _require_class_axis("logits", logits)
    _require_same_shape("logits", logits, "targets", targets)
    dtype = _compute_dtype(logits, targets)
    log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
    targets = targets.astype(dtype)
    # A zero target weight must contribute exactly 0 even where log_probs is -inf (masked
    # classes): 0 * -inf would be NaN. Masking the log before the product also keeps the
    # gradient with respect to `targets` finite there.
    safe_log_probs = jnp.where(targets == 0, 0.0, log_probs)
    return -jnp.sum(targets * safe_log_probs, axis=-1)


def binary_xent(*, logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    """Sigmoid binary cross-entropy from logits, elementwise.

    Computes `-(y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x)))` as optax's
    `sigmoid_binary_cross_entropy` does, with `log_sigmoid(x)` and `log_sigmoid(-x)`, which
    do not overflow for large `|x|`.

    Args:
      logits: float array of any shape.
      labels: array of the same shape with values in `[0, 1]` (soft labels allowed; integer
        or boolean labels are converted to float).

    Returns:
      Float array of shape `logits.shape` (dtype at least float32).

    Raises:
      ValueError: if the shapes differ.
      TypeError: if `logits` is not floating.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _require_float("logits", logits)
    _require_same_shape("logits", logits, "labels", labels)
    dtype = _compute_dtype(logits)
    return optax.losses.sigmoid_binary_cross_entropy(logits.astype(dtype), labels.astype(dtype))


def kl_divergence(
    *, logits: ArrayLike, target_logits: ArrayLike, temperature: float = 1.0
) -> jax.Array:
    """KL(p_target || p_model) between temperature-softened softmaxes, per example.

    With `p = softmax(target_logits / T)` and `q = softmax(logits / T)`, returns
    `sum_c p_c * (log p_c - log q_c)`, the distillation loss of Hinton et al. (2015).
    The result is NOT multiplied by `T**2`: distillation callers that want the soft-target
    gradients to keep their magnitude as `T` changes should scale by `temperature**2`
    themselves. Gradients flow into `target_logits` too; wrap a teacher's logits in
    `jax.lax.stop_gradient` if it must stay fixed.

    Args:
      logits: float array `(..., C)`, the model (student) logits.
      target_logits: float array `(..., C)`, the target (teacher) logits. `-inf` entries
        (masked classes) are allowed and contribute 0.
      temperature: positive float `T`.

    Returns:
      Float array of shape `logits.shape[:-1]` (dtype at least float32), `>= 0` up to
      rounding.

    Raises:
      ValueError: if the shapes differ, there is no class axis, or `temperature <= 0`
        (checked when it is a Python number).
      TypeError: if either input is not floating.
    """
    logits = jnp.asarray(logits)
    target_logits = jnp.asarray(target_logits)
    _require_float("logits", logits)
    _require_float("target_logits", target_logits)
    _require_class_axis("logits", logits)
    _require_same_shape("logits", logits, "target_logits", target_logits)
    _require_positive("temperature", temperature)
    dtype = _compute_dtype(logits, target_logits)
    log_q = jax.nn.log_softmax(logits.astype(dtype) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(target_logits.astype(dtype) / temperature, axis=-1)
    p = jnp.exp(log_p)
    # 0 * log(0) := 0. Without the `where`, a masked target class (log_p = -inf) would give
    # 0 * -inf = NaN in the value, and masking the log ratio (not the product) keeps the
    # gradient finite as well.
    log_ratio = jnp.where(p > 0, log_p - log_q, 0.0)
    return jnp.sum(p * log_ratio, axis=-1)


# ---------------------------------------------------------------------------------------------
# Regression losses.
# ---------------------------------------------------------------------------------------------


def mse(*, predictions: ArrayLike, targets: ArrayLike) -> jax.Array:
    """Squared error `(predictions - targets) ** 2`, elementwise.

    Args:
      predictions: float array of any shape.
      targets: array of the same shape.

    Returns:
      Float array of shape `predictions.shape` (dtype at least float32).

    Raises:
      ValueError: if the shapes differ.
      TypeError: if `predictions` is not floating.
    """
    predictions = jnp.asarray(predictions)
    targets = jnp.asarray(targets)
    _require_float("predictions", predictions)
    _require_same_shape("predictions", predictions, "targets", targets)
    dtype = _compute_dtype(predictions, targets)
    return optax.losses.squared_error(predictions.astype(dtype), targets.astype(dtype))


def huber(*, predictions: ArrayLike, targets: ArrayLike, delta: float = 1.0) -> jax.Array:
    """Huber loss, elementwise; equals PyTorch's `F.huber_loss(reduction="none", delta=delta)`.

    With `d = |predictions - targets|`: `0.5 * d**2` where `d < delta`, else
    `delta * (d - 0.5 * delta)`. Quadratic near zero, linear (gradient magnitude `delta`)
    for outliers.

    Args:
      predictions: float array of any shape.
      targets: array of the same shape.
      delta: positive float, the switch point between the quadratic and linear regimes.

    Returns:
      Float array of shape `predictions.shape` (dtype at least float32).

    Raises:
      ValueError: if the shapes differ or `delta <= 0` (checked when it is a Python number).
      TypeError: if `predictions` is not floating.
    """
    predictions = jnp.asarray(predictions)
    targets = jnp.asarray(targets)
    _require_float("predictions", predictions)
    _require_same_shape("predictions", predictions, "targets", targets)
    _require_positive("delta", delta)
    dtype = _compute_dtype(predictions, targets)
    # optax's clamp-based form: branch-free, no 0 * inf pitfalls in the gradient of a `where`.
    return optax.losses.huber_loss(predictions.astype(dtype), targets.astype(dtype), delta=delta)


# ---------------------------------------------------------------------------------------------
# Reduction.
# ---------------------------------------------------------------------------------------------


def weighted_mean(values: ArrayLike, weights: ArrayLike | None = None) -> jax.Array:
    """Mean of `values`, optionally weighted; the usual reduction of per-example losses.

    Without weights this is `mean(values)` over all elements. With weights it is
    `sum(values * w) / max(sum(w), tiny)` where `w` is `weights` broadcast to
    `values.shape`, so `weights` may be a mask of the same shape or anything that
    broadcasts to it (e.g. `(B, 1)` per-sequence weights for `(B, T)` token losses; each
    broadcast copy counts in the denominator). Entries with weight 0 are excluded outright,
    so a NaN or inf in a padded position does not leak into the mean (`0 * nan` would).
    When all weights are zero (a fully padded batch) the result is 0 rather than NaN.

    Args:
      values: float array of any shape.
      weights: optional non-negative array broadcastable to `values.shape` (bool masks are
        fine).

    Returns:
      Scalar float array (dtype at least float32).

    Raises:
      ValueError: if `weights` does not broadcast to `values.shape`.
    """
    values = jnp.asarray(values)
    dtype = _compute_dtype(values)
    values = values.astype(dtype)
    if weights is None:
        return jnp.mean(values)
    weights = jnp.asarray(weights)
    try:
        broadcast_shape = jnp.broadcast_shapes(weights.shape, values.shape)
    except ValueError:
        broadcast_shape = None
    if broadcast_shape != values.shape:
        raise ValueError(
            f"weights must broadcast to values.shape, got weights.shape={weights.shape} and "
            f"values.shape={values.shape}."
        )
    w = jnp.broadcast_to(weights.astype(dtype), values.shape)
    # Zero the values (not the product) so that both the result and its gradient ignore
    # whatever sits in zero-weight positions.
    safe_values = jnp.where(w == 0, 0.0, values)
    total = jnp.sum(w)
    return jnp.sum(safe_values * w) / jnp.maximum(total, jnp.finfo(dtype).tiny)
