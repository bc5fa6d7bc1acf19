"""Attribution maps for classifiers: saliency, SmoothGrad, integrated gradients, Grad-CAM.

Every method takes a classifier `fn: (B, ...) -> (B, C)` logits (an NNX model in eval
mode is such a function; so is any pure function of the input), a batch `x` and the
target class of each example, and returns one map per example. Examples are independent
(the gradient of `sum_b logits[b, target_b]` is taken), so `fn` must not mix examples
(batch norm in eval mode is fine; in train mode it is not).

- `saliency`: d logit_target / d x (Simonyan et al., 2014).
- `smoothgrad`: saliency averaged over noisy copies of x (Smilkov et al., 2017).
- `integrated_gradients`: (x - x') * average gradient along the straight path from a
  baseline x' to x (Sundararajan et al., 2017); the attributions sum to
  f(x) - f(x') up to the quadrature error ("completeness").
- `grad_cam`: ReLU of the gradient-weighted channel sum of one layer's activations
  (Selvaraju et al., 2017). The layer is any submodule of an NNX model, named by its path
  (e.g. "convs/1" for the last conv of `jdl.models.CNN`): the model is not modified; a
  copy with that submodule wrapped is run.
- `save_heatmaps`: a PNG grid of images with their maps overlaid.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Classifier = Callable[[jax.Array], jax.Array]


def _target_logit_sum(fn: Classifier, target: jax.Array) -> Callable[[jax.Array], jax.Array]:
    def total(x):
        logits = fn(x)  # (B, C)
        return jnp.sum(jnp.take_along_axis(logits, target[:, None], axis=-1))

    return total


def saliency(fn: Classifier, x: jax.Array, target: jax.Array) -> jax.Array:
    """Gradient of each example's target logit with respect to its input.

    Args:
      fn: classifier, (B, ...) -> (B, C) logits.
      x: float (B, ...) inputs.
      target: int (B,) class per example.

    Returns:
      float array of x's shape.
    """
    target = jnp.asarray(target, jnp.int32)
    return jax.grad(_target_logit_sum(fn, target))(x)


def smoothgrad(
    fn: Classifier,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    num_samples: int = 25,
    noise_level: float = 0.15,
) -> jax.Array:
    """Saliency averaged over `num_samples` copies of x with Gaussian noise.

    The noise standard deviation is `noise_level * (max(x_b) - min(x_b))` per example, the
    paper's parametrisation (10-20% works well for images). `noise_level` may be traced.

    Returns:
      float array of x's shape.
    """
    if num_samples < 1 or (isinstance(noise_level, int | float) and noise_level < 0):
        raise ValueError(
            f"need num_samples >= 1 and noise_level >= 0, got {num_samples}, {noise_level}"
        )
    axes = tuple(range(1, x.ndim))
    sigma = noise_level * (
        jnp.max(x, axis=axes, keepdims=True) - jnp.min(x, axis=axes, keepdims=True)
    )

    def one_sample(sample_key):
        noisy = x + sigma * jax.random.normal(sample_key, x.shape, x.dtype)
        return saliency(fn, noisy, target)

    return jnp.mean(jax.lax.map(one_sample, jax.random.split(key, num_samples)), axis=0)


def integrated_gradients(
    fn: Classifier,
    x: jax.Array,
    target: jax.Array,
    *,
    baseline: jax.Array | None = None,
    steps: int = 64,
) -> jax.Array:
    """Integrated gradients with the trapezoidal rule on `steps` equal intervals.

    Args:
      fn: as in `saliency`.
      x: as in `saliency`.
      target: as in `saliency`.
      baseline: x' of x's shape (or broadcastable); None means zeros (a black image).
      steps: number of intervals; the error of completeness falls as 1 / steps**2.

    Returns:
      float array of x's shape; per example its sum approximates
      `fn(x)[b, t_b] - fn(baseline)[b, t_b]`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    baseline = jnp.zeros_like(x) if baseline is None else jnp.broadcast_to(baseline, x.shape)
    alphas = jnp.linspace(0.0, 1.0, steps + 1)
    weights = jnp.ones(steps + 1).at[0].set(0.5).at[-1].set(0.5) / steps  # trapezoid

    def gradient_at(alpha):
        return saliency(fn, baseline + alpha * (x - baseline), target)

    grads = jax.lax.map(gradient_at, alphas)  # (steps + 1, B, ...)
    return (x - baseline) * jnp.tensordot(weights, grads, axes=1)


def grad_cam(
    model: nnx.Module,
    x: jax.Array,
    target: jax.Array,
    *,
    layer: str,
    resize: bool = True,
) -> jax.Array:
    """Grad-CAM heatmaps from the outputs of the submodule at path `layer`.

    With A (B, H', W', K) the layer's output and y the target logit, the map is
    `relu(sum_k mean_ij(dy / dA_ijk) * A_ijk)`.

    Args:
      model: an NNX model (put it in eval mode first), (B, H, W, C) -> (B, classes).
      x: float (B, H, W, C) images.
      target: int (B,) class per example.
      layer: "/"-separated attribute names or list indices from the model to a submodule
        whose output is (B, H', W', K), e.g. "convs/1".
      resize: bilinearly resize the maps to (H, W).

    Returns:
      float32 (B, H, W) (or (B, H', W') without resize), >= 0.

    Raises:
      ValueError: `layer` names nothing in the model, or its output is not 4-D.
    """
    target = jnp.asarray(target, jnp.int32)
    graphdef, state = nnx.split(model)

    def logit_and_activation(offset):
        recorded = []

        def hook(activation):
            recorded.append(activation)
            return activation + offset

        copy = nnx.merge(graphdef, state)
        _wrap_submodule(copy, layer, hook)
        return _target_logit_sum(copy, target)(x), recorded[0]

    shape = jax.eval_shape(logit_and_activation, jnp.zeros(()))[1].shape
    if len(shape) != 4:
        raise ValueError(f"layer {layer!r} outputs shape {shape}; Grad-CAM needs (B, H, W, K)")
    grads, activations = jax.grad(logit_and_activation, has_aux=True)(jnp.zeros(shape))
    channel_weights = jnp.mean(grads, axis=(1, 2), keepdims=True)  # (B, 1, 1, K)
    cam = jax.nn.relu(jnp.sum(channel_weights * activations, axis=-1))  # (B, H', W')
    if resize:
        cam = jax.image.resize(cam, (cam.shape[0], *x.shape[1:3]), method="bilinear")
        cam = jnp.maximum(cam, 0.0)  # bilinear interpolation of >= 0 values, kept exact
    return cam.astype(jnp.float32)


class _Tap(nnx.Module):
    """Calls `inner`, then passes its output through `hook` (a Python function)."""

    def __init__(self, inner: nnx.Module, hook: Callable[[jax.Array], jax.Array]):
        self.inner = inner
        self.hook = hook

    def __call__(self, *args, **kwargs):
        return self.hook(self.inner(*args, **kwargs))


def _wrap_submodule(model: nnx.Module, path: str, hook) -> None:
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError("layer must name a submodule, e.g. 'convs/1'")
    parent = model
    try:
        for part in parts[:-1]:
            parent = _child(parent, part)
        inner = _child(parent, parts[-1])
    except (AttributeError, IndexError, KeyError) as error:
        raise ValueError(f"the model has no submodule at {path!r} ({error})") from None
    if not isinstance(inner, nnx.Module):
        raise ValueError(f"{path!r} is a {type(inner).__name__}, not an NNX submodule")
    if parts[-1].isdigit():
        parent[int(parts[-1])] = _Tap(inner, hook)
    else:
        setattr(parent, parts[-1], _Tap(inner, hook))


def _child(parent, name: str):
    return parent[int(name)] if name.isdigit() else getattr(parent, name)


def normalize_maps(maps: jax.Array | np.ndarray) -> np.ndarray:
    """Scales each map of (B, H, W) (or (B, H, W, C), channels summed in |.|) to [0, 1]."""
    maps = np.asarray(maps, np.float32)
    if maps.ndim == 4:
        maps = np.abs(maps).sum(-1)
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    return (maps - low) / np.maximum(high - low, 1e-12)


def save_heatmaps(
    path: str | os.PathLike,
    images: np.ndarray,
    maps: dict[str, np.ndarray],
    *,
    titles: list[str] | None = None,
) -> str:
    """Writes a PNG grid: one row per image, the image then each method's overlay.

    Args:
      path: output file (parent folders are created).
      images: (B, H, W) or (B, H, W, 1|3) in [0, 1].
      maps: method name -> (B, H, W) or (B, H, W, C) attributions (normalised per image).
      titles: optional row labels (e.g. "label 7, predicted 7").

    Returns:
      The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images, np.float32)
    if images.ndim == 4:
        images = images[..., 0] if images.shape[-1] == 1 else images
    rows, cols = len(images), 1 + len(maps)
    figure, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.8 * rows), squeeze=False)
    normalised = {name: normalize_maps(value) for name, value in maps.items()}
    for row in range(rows):
        axes[row, 0].imshow(images[row], cmap="gray")
        axes[row, 0].set_ylabel(titles[row] if titles else "", fontsize=7)
        for col, (name, value) in enumerate(normalised.items(), start=1):
            axes[row, col].imshow(images[row], cmap="gray")
            axes[row, col].imshow(value[row], cmap="jet", alpha=0.5)
            if row == 0:
                axes[row, col].set_title(name, fontsize=8)
        if row == 0:
            axes[row, 0].set_title("input", fontsize=8)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return os.fspath(path)
