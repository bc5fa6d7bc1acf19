"""Convolutional networks with pooling (1D and 2D)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdl.models import cpu_kernels
from jdl.models.mlp import activation_fn
from jdl.models.sizes import ModelSizeError, check_sizes


class Conv2D(nnx.Module):
    """Stride-1 'SAME' 2D convolution whose gradients stay fast on XLA:CPU.

    Same parameters and initialisation as `nnx.Conv` (kernel (KH, KW, Cin, Cout),
    bias (Cout,)); computed with `jdl.models.cpu_kernels.conv2d_same`.
    Call: `(B, H, W, Cin)` -> `(B, H, W, Cout)`.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, rngs):
        reference = nnx.Conv(
            in_features, out_features, (kernel_size, kernel_size), padding="SAME", rngs=rngs
        )
        self.kernel = reference.kernel
        self.bias = reference.bias

    def __call__(self, x: jax.Array) -> jax.Array:
        return cpu_kernels.conv2d_same(x, self.kernel[...]) + self.bias[...]


def pool(x: jax.Array, *, kind: str, window: int) -> jax.Array:
    """Non-overlapping max or average pooling over the spatial axes of (B, *spatial, C).

    Spatial sizes that are not a multiple of `window` are cropped (floor), as in
    PyTorch's default. Written as reshape + reduce: its gradient is a cheap
    broadcast, faster on CPU than `reduce_window`'s select-and-scatter.
    """
    spatial = x.shape[1:-1]
    cropped = tuple(size - size % window for size in spatial)
    x = x[(slice(None),) + tuple(slice(0, s) for s in cropped)]
    shape = [x.shape[0]]
    for size in cropped:
        shape += [size // window, window]
    x = x.reshape(*shape, x.shape[-1])
    window_axes = tuple(2 + 2 * i for i in range(len(spatial)))
    if kind == "max":
        return jnp.max(x, axis=window_axes)
    if kind == "avg":
        return jnp.mean(x, axis=window_axes)
    raise ValueError(f"pool kind must be 'max' or 'avg', got {kind!r}")


class CNN(nnx.Module):
    """Conv -> activation -> pool blocks, then dense layers.

    Args:
      in_channels: channels of the input (1 for MNIST).
      num_classes: outputs of the last layer.
      conv_channels: output channels of each conv block, e.g. (32, 64).
      kernel_size: square (or length, in 1D) kernel of every conv.
      dense_sizes: hidden dense layers after flattening, e.g. (128,).
      input_shape: spatial shape of one input, e.g. (28, 28) or (40,) for 1D; fixes the
        flattened size of the first dense layer.
      pool_kind: "max" or "avg"; pool_window: its size (and stride).
      activation: see `jdl.models.mlp.ACTIVATIONS`.
      dropout: rate before each dense layer (0 disables).
      cpu_kernels: 2D only: compute convolutions and 2x2 max pooling with the gradients
        of `jdl.models.cpu_kernels`. On XLA:CPU they keep training steps fast inside a
        rolled `lax.scan` (`fit(..., unroll=1)`), where XLA's own convolution gradients
        run 10-40x slower; in straight-line code both are equally fast.
      rngs: NNX random streams.

    Call: `(B, *input_shape, in_channels)` -> `(B, num_classes)` logits.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        input_shape: Sequence[int],
        conv_channels: Sequence[int] = (32, 64),
        kernel_size: int = 3,
        dense_sizes: Sequence[int] = (128,),
        pool_kind: str = "max",
        pool_window: int = 2,
        activation: str = "relu",
        dropout: float = 0.0,
        cpu_kernels: bool = False,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            "CNN",
            in_channels=in_channels,
            num_classes=num_classes,
            input_shape=input_shape,
            conv_channels=conv_channels,
            kernel_size=kernel_size,
            dense_sizes=dense_sizes,
            pool_window=pool_window,
        )
        ndim = len(input_shape)
        if cpu_kernels and ndim != 2:
            raise ValueError("cpu_kernels applies to 2D inputs only")
        self.fast_pool = cpu_kernels and pool_kind == "max" and pool_window == 2
        self.activation = activation_fn(activation)
        self.pool_kind, self.pool_window = pool_kind, pool_window
        channels = [in_channels, *conv_channels]

        def make_conv(a, b):
            if cpu_kernels:
                return Conv2D(a, b, kernel_size, rngs=rngs)
            return nnx.Conv(a, b, kernel_size=(kernel_size,) * ndim, padding="SAME", rngs=rngs)

        self.convs = nnx.List(
            [make_conv(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True)]
        )
        spatial = list(input_shape)
        for _ in conv_channels:
            spatial = [size // pool_window for size in spatial]
        if not all(spatial):
            raise ModelSizeError(
                f"CNN: input_shape {tuple(input_shape)} pooled by {pool_window} after each of "
                f"{len(conv_channels)} conv blocks leaves {tuple(spatial)}; use fewer conv "
                "blocks, a smaller pool_window or larger inputs"
            )
        flat = channels[-1] * math.prod(spatial)
        sizes = [flat, *dense_sizes]
        self.dense = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:  # (B, *S, C) -> (B, *S / window, C')
            x = self.activation(conv(x))
            if self.fast_pool:
                x = cpu_kernels.max_pool_2x2(x)
            else:
                x = pool(x, kind=self.pool_kind, window=self.pool_window)
        x = x.reshape(x.shape[0], -1)  # (B, flat)
        for layer in self.dense:
            if self.dropout is not None:
                x = self.dropout(x)
            x = self.activation(layer(x))
        if self.dropout is not None:
            x = self.dropout(x)
        return self.head(x)  # (B, num_classes)
