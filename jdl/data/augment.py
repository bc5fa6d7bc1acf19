"""On-device image augmentations for NHWC batches, safe to call inside `jax.jit`.

Every random augmentation has the form `fn(key, images, ...) -> images`: `key`
is one PRNG key for the whole batch, from which each example gets its own draw.
`images` is a float array of shape (N, H, W, C); the result has the same shape
and dtype. Each function is jitted, so an eager call compiles once per input
shape, and inlines into an enclosing `jax.jit`; size arguments (`max_shift`,
`padding`, `pad_mode`) are static.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.jit
def translate(images: Array, shifts: Array) -> Array:
    """Shifts each image by whole pixels, filling the uncovered border with zeros.

    Output pixel (i, j) of example n is input pixel (i - dy, j - dx), or 0 where
    that lies outside the image: positive dy moves content down, positive dx right.

    Args:
      images: (N, H, W, C).
      shifts: integer (N, 2) of (dy, dx) per example.

    Returns:
      (N, H, W, C), same dtype as `images`.

    Raises:
      ValueError: `images` is not 4-D or `shifts` is not an integer (N, 2) array.
    """
    _check_nhwc(images)
    shifts = jnp.asarray(shifts)
    if shifts.shape != (images.shape[0], 2) or not jnp.issubdtype(shifts.dtype, jnp.integer):
        raise ValueError(
            f"shifts must be integer (N, 2) = ({images.shape[0]}, 2), "
            f"got {shifts.dtype} {shifts.shape}"
        )
    return _shift(images, shifts, *images.shape[1:3])


@functools.partial(jax.jit, static_argnames="max_shift")
def random_translate(key: Array, images: Array, *, max_shift: int) -> Array:
    """Shifts each image by its own integer (dy, dx), each uniform in [-max_shift, max_shift].

    Uncovered pixels become zero; see `translate` for the direction convention.

    Args:
      key: PRNG key; the draws for the whole batch come from it.
      images: (N, H, W, C).
      max_shift: static int >= 0; 0 returns `images` unchanged.

    Returns:
      (N, H, W, C), same dtype as `images`.

    Raises:
      ValueError: `images` is not 4-D or `max_shift` is negative.
    """
    _check_nhwc(images)
    _check_non_negative("max_shift", max_shift)
    if max_shift == 0:
        return images
    height, width = images.shape[1:3]
    shifts = _uniform_ints(key, (images.shape[0], 2), -max_shift, max_shift)
    return _shift(images, shifts, min(max_shift, height), min(max_shift, width))


@functools.partial(jax.jit, static_argnames=("padding", "pad_mode"))
def random_crop(key: Array, images: Array, *, padding: int, pad_mode: str = "constant") -> Array:
    """Pads each image by `padding` pixels per side, then crops a random H x W window.

    This is the standard CIFAR recipe (padding=4 for 32x32 images). With the
    default zero padding it has the same distribution as `random_translate` with
    `max_shift=padding`; `pad_mode="reflect"` or `"edge"` fills the border from
    the image instead.

    Args:
      key: PRNG key; the draws for the whole batch come from it.
      images: (N, H, W, C).
      padding: static int >= 0; 0 returns `images` unchanged.
      pad_mode: a `jnp.pad` mode: "constant" (zeros), "reflect", "edge", ...

    Returns:
      (N, H, W, C), same dtype as `images`.

    Raises:
      ValueError: `images` is not 4-D or `padding` is negative.
    """
    _check_nhwc(images)
    _check_non_negative("padding", padding)
    if padding == 0:
        return images
    height, width = images.shape[1:3]
    offsets = _uniform_ints(key, (images.shape[0], 2), 0, 2 * padding)
    padded = _pad_spatial(images, padding, padding, pad_mode)
    return _windows(padded, offsets[:, 0], offsets[:, 1], height, width)


@jax.jit
def random_flip_left_right(key: Array, images: Array) -> Array:
    """Mirrors each image horizontally with probability 1/2, independently per example.

    Args:
      key: PRNG key; the draws for the whole batch come from it.
      images: (N, H, W, C).

    Returns:
      (N, H, W, C), same dtype as `images`. Applying it twice with the same key
      restores the input.

    Raises:
      ValueError: `images` is not 4-D.
    """
    _check_nhwc(images)
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


@functools.partial(jax.jit, static_argnames=("size",))
def cutout(key: Array, images: Array, *, size: int) -> Array:
    """Zeroes one random `size` x `size` square per image (DeVries and Taylor, 2017).

    The square's centre is uniform over the image, so near a border only part of the
    square falls inside it, as in the paper.

    Args:
      key: PRNG key; the draws for the whole batch come from it.
      images: (N, H, W, C).
      size: static int >= 0, the side of the square; 0 returns `images` unchanged.

    Returns:
      (N, H, W, C), same dtype as `images`.

    Raises:
      ValueError: `images` is not 4-D or `size` is negative.
    """
    _check_nhwc(images)
    _check_non_negative("size", size)
    if size == 0:
        return images
    height, width = images.shape[1:3]
    centre_y = _uniform_ints(jax.random.fold_in(key, 0), (images.shape[0],), 0, height - 1)
    centre_x = _uniform_ints(jax.random.fold_in(key, 1), (images.shape[0],), 0, width - 1)
    top, left = centre_y - size // 2, centre_x - size // 2  # (N,), may be negative
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)  # (N, H)
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)  # (N, W)
    hole = inside_rows[:, :, None] & inside_cols[:, None, :]  # (N, H, W)
    return jnp.where(hole[..., None], jnp.zeros((), images.dtype), images)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def mixup(
    key: Array, images: Array, labels: Array, *, num_classes: int, alpha: float
) -> tuple[Array, Array]:
    """Mixes each example with another of the batch (Zhang et al., 2018).

    With `lam ~ Beta(alpha, alpha)` drawn per example and a random pairing `j`,
    the result is `lam * x + (1 - lam) * x[j]` with target
    `lam * onehot(y) + (1 - lam) * onehot(y[j])`. Train on the targets with a soft
    cross-entropy: `jdl.classification_loss` does so when the batch holds "targets".

    Args:
      key: PRNG key; the draws for the whole batch come from it.
      images: (N, ...) float inputs (any shape after the batch axis).
      labels: (N,) int class labels in [0, num_classes).
      num_classes: static, C.
      alpha: > 0, the Beta distribution's parameter (0.2 to 0.4 is usual).

    Returns:
      (mixed images of the same shape and dtype, float32 (N, C) targets summing to 1).
    """
    pair_key, lam_key = jax.random.split(key)
    partner = jax.random.permutation(pair_key, images.shape[0])
    lam = jax.random.beta(lam_key, alpha, alpha, (images.shape[0],))  # (N,)
    lam_x = lam.reshape((-1,) + (1,) * (images.ndim - 1)).astype(images.dtype)
    mixed = lam_x * images + (1 - lam_x) * images[partner]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    targets = lam[:, None] * onehot + (1 - lam[:, None]) * onehot[partner]
    return mixed, targets


def _uniform_ints(key: Array, shape: tuple[int, ...], low: int, high: int) -> Array:
    """int32 draws uniform on [low, high] (inclusive) from one 32-bit draw each.

    The modulo bias is below (high - low + 1) / 2**32, far too small to matter for
    pixel offsets, and the program is about half the size of `jax.random.randint`'s,
    which compiles noticeably faster on CPU.
    """
    span = high - low + 1
    return (jax.random.bits(key, shape, jnp.uint32) % jnp.uint32(span)).astype(jnp.int32) + low


def _shift(images: Array, shifts: Array, bound_h: int, bound_w: int) -> Array:
    """`translate` for shifts known to need at most (bound_h, bound_w) of zero padding."""
    height, width = images.shape[1:3]
    # A shift of the full image size already blanks it, so larger ones can be
    # clipped to the static bound without changing the result.
    dy = jnp.clip(shifts[:, 0], -bound_h, bound_h)
    dx = jnp.clip(shifts[:, 1], -bound_w, bound_w)
    padded = _pad_spatial(images, bound_h, bound_w, "constant")
    return _windows(padded, bound_h - dy, bound_w - dx, height, width)


def _windows(padded: Array, tops: Array, lefts: Array, height: int, width: int) -> Array:
    """Cuts an (height, width) window at (tops[n], lefts[n]) out of each padded image."""

    def one(image: Array, top: Array, left: Array) -> Array:
        return jax.lax.dynamic_slice(image, (top, left, 0), (height, width, image.shape[-1]))

    return jax.vmap(one)(padded, tops, lefts)


def _pad_spatial(images: Array, pad_h: int, pad_w: int, mode: str) -> Array:
    return jnp.pad(images, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)), mode=mode)


def _check_nhwc(images: Array) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (N, H, W, C), got shape {images.shape}")


def _check_non_negative(name: str, value: int) -> None:
    try:
        valid = operator.index(value) >= 0
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"{name} must be a static int >= 0, got {value!r}")
