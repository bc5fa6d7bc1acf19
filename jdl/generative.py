"""What every generative model of jdl is judged and shown by.

* Pictures: `image_grid` tiles images into one array, `write_png` writes it (the
  PNG encoder of `jdl.tensorboard`, so the same pixels go to TensorBoard), and
  `interpolate` gives the points between two latent codes.
* Classifier FID: the Frechet distance between Gaussians fitted to a trained
  classifier's penultimate features (the input of its `head` layer) of two image sets,
  as FID does with Inception features (Heusel et al. 2017). `classifier_fid` of real
  train vs real test images is the noise floor a model's samples are read against.
* Class statistics of samples through the same classifier: `class_accuracy` of
  conditional samples against the classes asked for, `class_coverage` (share of each
  predicted class) of unconditional ones.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from jdl.errors import UserError
from jdl.metrics import feature_statistics, frechet_distance
from jdl.tensorboard import encode_png, image_pixels

__all__ = [
    "GenerativeInputError",
    "class_accuracy",
    "class_coverage",
    "classifier_fid",
    "head_features",
    "image_grid",
    "interpolate",
    "write_png",
]


class GenerativeInputError(UserError, ValueError):
    """Images or classifier outputs that do not fit together (shapes, counts, classes)."""


def image_grid(images: ArrayLike, *, cols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles `images` (N, H, W, C) row by row into one float32 image (R*(H+pad)+pad, ...).

    Args:
      images: N >= 1 images, floats in [0, 1] (values are not changed).
      cols: images per row; default ceil(sqrt(N)). Missing cells of the last row stay
        white, like the padding between images.
      pad: white pixels around and between images.

    Returns:
      float32 (rows * (H + pad) + pad, cols * (W + pad) + pad, C).

    Raises:
      GenerativeInputError: not a non-empty (N, H, W, C) array, or cols < 1.
    """
    array = np.asarray(images, np.float32)
    if array.ndim != 4 or array.shape[0] == 0:
        raise GenerativeInputError(
            f"image_grid needs images of shape (N, H, W, C) with N >= 1, got {array.shape}"
        )
    num, height, width, channels = array.shape
    cols = cols or math.ceil(math.sqrt(num))
    if cols < 1:
        raise GenerativeInputError(f"image_grid: cols must be >= 1, got {cols}")
    rows = math.ceil(num / cols)
    grid = np.ones((rows * (height + pad) + pad, cols * (width + pad) + pad, channels), np.float32)
    for index, image in enumerate(array):
        top = pad + (index // cols) * (height + pad)
        left = pad + (index % cols) * (width + pad)
        grid[top : top + height, left : left + width] = image
    return grid


def write_png(path: str | os.PathLike[str], image: ArrayLike) -> str:
    """Writes one image as a PNG file (atomically: a reader never sees half a file).

    `image` is (H, W) or (H, W, C), C in 1..4, read as `jdl.tensorboard.image_pixels`
    reads it: floats in [0, 1] (clipped), uint8 as is. Returns the path written.

    Raises:
      jdl.tensorboard.TensorBoardValueError: another shape, dtype or non-finite values.
    """
    path = os.fspath(path)
    data = encode_png(image_pixels(image))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)
    return path


def interpolate(start: ArrayLike, end: ArrayLike, steps: int) -> jax.Array:
    """`steps` >= 2 points on the straight line from `start` to `end` (both included).

    start, end: arrays of one shape S; returns (steps, *S).
    """
    if steps < 2:
        raise ValueError(f"interpolate needs steps >= 2 (both ends), got {steps}")
    start, end = jnp.asarray(start), jnp.asarray(end)
    t = jnp.linspace(0.0, 1.0, steps).reshape((steps,) + (1,) * start.ndim)
    return (1.0 - t) * start + t * end


class _Identity(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def head_features(model: nnx.Module, images: ArrayLike, *, batch_size: int = 500) -> np.ndarray:
    """The classifier's penultimate features: the input of its `head` layer, per image.

    The model (e.g. `jdl.models.CNN`, whose last layer is `head`) runs in eval mode on a
    copy whose `head` is the identity; the model itself is not changed.

    Args:
      model: an NNX classifier with a `head` submodule applied last.
      images: (N, ...) inputs the classifier takes, N >= 1.
      batch_size: images per compiled call (the last batch is padded).

    Returns:
      float32 (N, D) on the host.

    Raises:
      GenerativeInputError: the model has no `head`, or the images do not fit it (e.g.
        another image shape than it was trained on).
    """
    if not isinstance(getattr(model, "head", None), nnx.Module):
        raise GenerativeInputError(
            f"{type(model).__name__} has no `head` layer to take the features before; "
            "use a classifier whose last layer is `head` (e.g. jdl.models.CNN)"
        )
    images = np.asarray(images, np.float32)
    if images.ndim < 2 or images.shape[0] == 0:
        raise GenerativeInputError(f"head_features needs (N, ...) images, got {images.shape}")
    graphdef, state = nnx.split(model)

    def features(state, x):
        copy = nnx.merge(graphdef, state)
        copy.eval()
        copy.head = _Identity()
        return copy(x)

    size = min(batch_size, len(images))
    try:
        jax.eval_shape(
            features, state, jax.ShapeDtypeStruct((size, *images.shape[1:]), images.dtype)
        )
    except (TypeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GenerativeInputError(
            f"images of shape {images.shape[1:]} do not fit the classifier "
            f"{type(model).__name__} ({first}); give it images of the shape it was "
            "trained on"
        ) from None
    compiled = jax.jit(features)
    out = []
    for begin in range(0, len(images), size):
        batch = images[begin : begin + size]
        rows = len(batch)
        if rows < size:  # one compiled shape: pad with the last image, drop its outputs
            batch = np.concatenate([batch, np.repeat(batch[-1:], size - rows, axis=0)])
        out.append(np.asarray(compiled(state, batch))[:rows])
    return np.concatenate(out).reshape(len(images), -1)


def classifier_fid(
    model: nnx.Module, images: ArrayLike, reference: ArrayLike, *, batch_size: int = 500
) -> float:
    """The Frechet distance between `head_features` Gaussians of `images` and `reference`.

    Like FID, it is biased upward for small sets: compare distances only between sets of
    the same sizes (e.g. N samples vs the test set, and N train images vs the test set as
    the noise floor).

    Raises:
      GenerativeInputError: the two sets have different image shapes, or do not fit the
        classifier (see `head_features`), or a set has fewer than 2 images.
    """
    images, reference = np.asarray(images), np.asarray(reference)
    if images.shape[1:] != reference.shape[1:]:
        raise GenerativeInputError(
            f"generated images of shape {images.shape[1:]} cannot be compared with real "
            f"images of shape {reference.shape[1:]}; generate images of the real data's shape"
        )
    if min(len(images), len(reference)) < 2:
        raise GenerativeInputError(
            f"classifier_fid needs at least 2 images per set, got {len(images)} and "
            f"{len(reference)}"
        )
    stats = [
        feature_statistics(head_features(model, x, batch_size=batch_size))
        for x in (images, reference)
    ]
    return frechet_distance(*stats[0], *stats[1])


def class_accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Share of conditional samples the classifier puts in the class they were asked for.

    logits: (N, K) classifier outputs on the samples; labels: (N,) int classes requested.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or not len(labels):
        raise GenerativeInputError(
            f"class_accuracy needs logits (N, K) and labels (N,), N >= 1; got "
            f"{logits.shape} and {labels.shape}"
        )
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def class_coverage(logits: ArrayLike, num_classes: int | None = None) -> np.ndarray:
    """The share of samples the classifier assigns to each class: float64 (K,), sums to 1.

    A model that covers the data's classes evenly gives about 1/K each (0.1 for digits);
    a collapsed one puts most of its mass on few classes.

    logits: (N, K) classifier outputs on the samples; num_classes: K (default the
    logits' last axis).
    """
    logits = np.asarray(logits)
    if logits.ndim != 2 or not len(logits):
        raise GenerativeInputError(
            f"class_coverage needs logits (N, K), N >= 1; got {logits.shape}"
        )
    num_classes = num_classes or logits.shape[-1]
    counts = np.bincount(np.argmax(logits, axis=-1), minlength=num_classes)
    return counts / counts.sum()
