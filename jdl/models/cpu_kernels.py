"""Convolution and pooling with hand-written gradients that stay fast on XLA:CPU.

On XLA:CPU the fast convolution path (a library kernel on NHWC/HWIO layouts)
is chosen by a pass that rewrites convolutions of the top-level computation
only. Autodiff of an NHWC convolution produces weight- and input-gradient
convolutions in other layouts; at the top level they are rewritten, but inside
a `lax.scan`/`while` body or a `lax.cond` branch they are not and run 10-40x
slower. The functions here express both gradients as plain NHWC/HWIO
convolutions (with optimisation barriers so XLA cannot fold the transposes
back), which are fast everywhere, and give 2x2 max pooling a gradient that
avoids `select_and_scatter`. Values and gradients equal XLA's own (tested),
up to exact ties inside a pooling window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
_barrier = lax.optimization_barrier


def _conv_valid(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=_NHWC)


@jax.custom_vjp
def conv2d_valid(x: jax.Array, w: jax.Array) -> jax.Array:
    """Stride-1 'VALID' 2D convolution. x (B, H, W, Cin), w (KH, KW, Cin, Cout)."""
    return _conv_valid(x, w)


def _conv_forward(x, w):
    return _conv_valid(x, w), (x, w)


def _conv_backward(residuals, dy):
    x, w = residuals
    kh, kw = w.shape[:2]
    # dx: full correlation of dy with the spatially flipped kernel, in/out swapped.
    dy_padded = jnp.pad(dy, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    dx = _conv_valid(dy_padded, _barrier(jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))))
    # dw: treat input channels as the batch and the batch as the contracted channel.
    dw = _conv_valid(
        _barrier(jnp.transpose(x, (3, 1, 2, 0))), _barrier(jnp.transpose(dy, (1, 2, 0, 3)))
    )  # (Cin, KH, KW, Cout)
    return dx, jnp.transpose(dw, (1, 2, 0, 3))


conv2d_valid.defvjp(_conv_forward, _conv_backward)


def conv2d_same(x: jax.Array, w: jax.Array) -> jax.Array:
    """Stride-1 'SAME' 2D convolution (odd kernels): pads, then `conv2d_valid`."""
    kh, kw = w.shape[:2]
    pad = ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0))
    return conv2d_valid(jnp.pad(x, pad), w)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 over (B, H, W, C); odd sizes are cropped (floor)."""
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _pool_forward(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _pool_backward(residuals, dy):
    x, y = residuals
    b, h, w, c = x.shape
    h2, w2 = h // 2 * 2, w // 2 * 2
    windows = x[:, :h2, :w2].reshape(b, h // 2, 2, w // 2, 2, c)
    is_max = windows == y[:, :, None, :, None, :]
    # Every maximal entry of a window receives the gradient. XLA gives it to one entry
    # only; the two differ on exact ties, which after a ReLU are zeros whose gradient
    # the ReLU discards anyway.
    grad = jnp.where(is_max, dy[:, :, None, :, None, :], 0.0).reshape(b, h2, w2, c)
    return (jnp.pad(grad, ((0, 0), (0, h - h2), (0, w - w2), (0, 0))),)


max_pool_2x2.defvjp(_pool_forward, _pool_backward)
