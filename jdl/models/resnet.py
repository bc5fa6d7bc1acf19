"""Residual networks (ResNet v1.5) for ImageNet-style and CIFAR-style inputs.

Two families share one `ResNet` module:

* ImageNet style (`stem="imagenet"`), as torchvision's `resnet18/34/50`: a 7x7 stride-2
  conv, batch norm, ReLU and a 3x3 stride-2 max pool, then four stages of widths
  64/128/256/512 (times the block's expansion), global average pooling and a dense
  head. Like torchvision ("v1.5"), a `Bottleneck` strides on its 3x3 conv, not its first
  1x1 conv, and a shape change goes through a projection shortcut (1x1 conv + BN).
* CIFAR style (`stem="cifar"`), as He et al. 2016, section 4.2 (ResNet-20/32/56): a 3x3
  conv with 16 channels, three stages of widths 16/32/64 with `n` basic blocks each and
  the parameter-free "option A" shortcut (strided subsampling, zero-padded channels).

Inputs are NHWC. Convs have no bias (a batch norm follows each); batch norm uses
PyTorch's defaults (momentum 0.1, i.e. Flax momentum 0.9, and eps 1e-5); convs are
initialised He-normal with fan-out and the head uniformly, both as torchvision does, so
weights copied from PyTorch reproduce its outputs. Train/eval mode is the NNX one:
`model.train()` normalises with batch statistics and updates the running averages,
`model.eval()` uses the running averages.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdl.models.initializers import uniform_init
from jdl.models.sizes import check_sizes

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
HE_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's momentum weighs the new batch statistic; Flax's weighs the running average.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
SHORTCUTS = ("projection", "zero_pad")


def conv(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs
) -> nnx.Conv:
    """A bias-free square conv padded by `kernel // 2` on every side, as in torchvision.

    Explicit symmetric padding (not "SAME") matters for stride 2 on even sizes: "SAME"
    pads only the bottom/right and would shift every window by one pixel.
    """
    pad = kernel // 2
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=HE_FAN_OUT,
        rngs=rngs,
    )


def batch_norm(channels: int, *, zero_scale: bool = False, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """Batch norm with PyTorch's momentum and eps; `zero_scale` starts its scale at 0."""
    return nnx.BatchNorm(
        channels,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
        rngs=rngs,
    )


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torchvision's stem pool: kernel 3, stride 2, padding 1 (padding never wins the max).

    `(B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), C)`.
    """
    return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def zero_pad_shortcut(x: jax.Array, stride: int, out_channels: int) -> jax.Array:
    """He et al.'s option A: subsample by `stride`, zero-pad channels evenly on both sides.

    `(B, H, W, C) -> (B, ceil(H / stride), ceil(W / stride), out_channels)`; no parameters.
    """
    x = x[:, ::stride, ::stride, :]
    extra = out_channels - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class Projection(nnx.Module):
    """Projection shortcut: 1x1 conv with stride, then batch norm.

    Call: `(B, H, W, in_channels) -> (B, H / stride, W / stride, out_channels)`.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = conv(in_channels, out_channels, 1, stride, rngs=rngs)
        self.bn = batch_norm(out_channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


def _check_shortcut(kind: str) -> None:
    if kind not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {kind!r}")


class _Block(nnx.Module):
    """Shortcut handling shared by the residual blocks."""

    expansion: int = 1

    def _init_shortcut(
        self, in_channels: int, out_channels: int, stride: int, kind: str, rngs: nnx.Rngs
    ) -> None:
        self.stride, self.out_channels = stride, out_channels
        # Identity when the shape is unchanged; otherwise project or zero-pad.
        needs_change = stride != 1 or in_channels != out_channels
        self.pad_shortcut = needs_change and kind == "zero_pad"
        self.projection = (
            Projection(in_channels, out_channels, stride, rngs=rngs)
            if needs_change and kind == "projection"
            else None
        )

    def _shortcut(self, x: jax.Array) -> jax.Array:
        if self.projection is not None:
            return self.projection(x)
        if self.pad_shortcut:
            return zero_pad_shortcut(x, self.stride, self.out_channels)
        return x


class BasicBlock(_Block):
    """Two 3x3 conv + BN layers with a residual connection (ResNet-18/34 and CIFAR nets).

    Args:
      in_channels: channels of the input.
      channels: channels of both convs and of the output (`expansion` is 1).
      stride: stride of the first conv (2 halves the spatial size).
      shortcut: "projection" (1x1 conv + BN) or "zero_pad" (parameter-free option A);
        used only when the shape changes, otherwise the shortcut is the identity.
      zero_init_residual: start the last BN scale at 0, so the block starts as identity.
      rngs: NNX random streams (`params`).

    Call: `(B, H, W, in_channels) -> (B, H / stride, W / stride, channels)`.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        *,
        shortcut: str = "projection",
        zero_init_residual: bool = False,
        rngs: nnx.Rngs,
    ):
        _check_shortcut(shortcut)
        self.conv1 = conv(in_channels, channels, 3, stride, rngs=rngs)
        self.bn1 = batch_norm(channels, rngs=rngs)
        self.conv2 = conv(channels, channels, 3, rngs=rngs)
        self.bn2 = batch_norm(channels, zero_scale=zero_init_residual, rngs=rngs)
        self._init_shortcut(in_channels, channels, stride, shortcut, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))  # (B, H / stride, W / stride, C)
        y = self.bn2(self.conv2(y))
        return jax.nn.relu(y + self._shortcut(x))


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4, each with BN (ResNet-50 and up).

    Args:
      in_channels: channels of the input.
      channels: width of the inner convs; the output has `4 * channels`.
      stride: stride of the 3x3 conv.
      shortcut: as in `BasicBlock`.
      zero_init_residual: as in `BasicBlock`.
      rngs: as in `BasicBlock`.

    Call: `(B, H, W, in_channels) -> (B, H / stride, W / stride, 4 * channels)`.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        *,
        shortcut: str = "projection",
        zero_init_residual: bool = False,
        rngs: nnx.Rngs,
    ):
        _check_shortcut(shortcut)
        out_channels = channels * self.expansion
        self.conv1 = conv(in_channels, channels, 1, rngs=rngs)
        self.bn1 = batch_norm(channels, rngs=rngs)
        self.conv2 = conv(channels, channels, 3, stride, rngs=rngs)
        self.bn2 = batch_norm(channels, rngs=rngs)
        self.conv3 = conv(channels, out_channels, 1, rngs=rngs)
        self.bn3 = batch_norm(out_channels, zero_scale=zero_init_residual, rngs=rngs)
        self._init_shortcut(in_channels, out_channels, stride, shortcut, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))  # (B, H, W, C)
        y = jax.nn.relu(self.bn2(self.conv2(y)))  # (B, H / stride, W / stride, C)
        y = self.bn3(self.conv3(y))  # (B, H / stride, W / stride, 4C)
        return jax.nn.relu(y + self._shortcut(x))


def make_stage(
    block: type[BasicBlock] | type[Bottleneck],
    in_channels: int,
    channels: int,
    num_blocks: int,
    stride: int,
    **block_kwargs: Any,
) -> nnx.List:
    """`num_blocks` blocks of width `channels`; only the first changes shape (by `stride`)."""
    out_channels = channels * block.expansion
    return nnx.List(
        [
            block(
                in_channels if j == 0 else out_channels,
                channels,
                stride if j == 0 else 1,
                **block_kwargs,
            )
            for j in range(num_blocks)
        ]
    )


@nnx.remat
def checkpointed_call(block: nnx.Module, x: jax.Array) -> jax.Array:
    """`block(x)`, with the activations inside the block recomputed in the backward pass.

    Only the block's input is kept for the backward pass, at the cost of running the
    block's forward pass twice.
    """
    return block(x)


class ResNet(nnx.Module):
    """A residual network: stem, stages of residual blocks, global average pool, dense head.

    Args:
      stage_sizes: number of blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18 or (3, 3, 3)
        for ResNet-20. Stage `i` has width `width * 2**i`; every stage after the first
        halves the spatial size in its first block.
      block: `BasicBlock` or `Bottleneck`.
      num_classes: outputs of the head.
      width: channels of the stem and the first stage; None means 64 for the ImageNet stem
        and 16 for the CIFAR stem.
      stage_widths: the block width of each stage (before the block's expansion); None
        means `width * 2**i` for stage `i`. Lets checkpoints with other widths load
        (e.g. Hugging Face's `hidden_sizes`).
      stem: "imagenet" (7x7/2 conv + BN + ReLU + 3x3/2 max pool, 4x downsampling) or
        "cifar" (3x3 conv + BN + ReLU, no downsampling).
      in_channels: channels of the input image.
      shortcut: "projection" or "zero_pad" for blocks that change shape; None means
        "projection" for the ImageNet stem and "zero_pad" (option A) for the CIFAR stem.
      zero_init_residual: start each block's last BN scale at 0 (torchvision's option).
      remat: recompute each block's activations in the backward pass (less memory, about
        one more forward pass of compute).
      rngs: NNX random streams (`params`).

    Call: `(B, H, W, in_channels)` float -> `(B, num_classes)` logits.
    """

    def __init__(
        self,
        stage_sizes: Sequence[int],
        block: type[BasicBlock] | type[Bottleneck],
        num_classes: int,
        *,
        width: int | None = None,
        stage_widths: Sequence[int] | None = None,
        stem: str = "imagenet",
        in_channels: int = 3,
        shortcut: str | None = None,
        zero_init_residual: bool = False,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            "ResNet",
            stage_sizes=stage_sizes,
            num_classes=num_classes,
            width=width,
            stage_widths=stage_widths,
            in_channels=in_channels,
        )
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if shortcut not in (None, *SHORTCUTS):
            raise ValueError(f"shortcut must be None or one of {SHORTCUTS}, got {shortcut!r}")
        imagenet = stem == "imagenet"
        if width is None:
            width = 64 if imagenet else 16
        if shortcut is None:
            shortcut = "projection" if imagenet else "zero_pad"
        self.stem_pool = imagenet
        self.remat = remat
        stem_kernel, stem_stride = (7, 2) if imagenet else (3, 1)
        self.stem_conv = conv(in_channels, width, stem_kernel, stem_stride, rngs=rngs)
        self.stem_bn = batch_norm(width, rngs=rngs)
        if stage_widths is None:
            stage_widths = [width * 2**i for i in range(len(stage_sizes))]
        if len(stage_widths) != len(stage_sizes):
            raise ValueError(
                f"stage_widths {tuple(stage_widths)} must have one entry per stage of "
                f"stage_sizes {tuple(stage_sizes)}"
            )
        stages, channels = [], width
        for i, num_blocks in enumerate(stage_sizes):
            stride = 1 if i == 0 else 2
            stage = make_stage(
                block,
                channels,
                stage_widths[i],
                num_blocks,
                stride,
                shortcut=shortcut,
                zero_init_residual=zero_init_residual,
                rngs=rngs,
            )
            stages.append(stage)
            channels = stage_widths[i] * block.expansion
        self.stages = nnx.List(stages)
        bound = 1.0 / math.sqrt(channels)
        self.head = nnx.Linear(
            channels,
            num_classes,
            kernel_init=uniform_init(bound),
            bias_init=uniform_init(bound),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem_bn(self.stem_conv(x)))  # (B, H', W', width)
        if self.stem_pool:
            x = max_pool_3x3_s2(x)  # (B, H / 4, W / 4, width)
        for stage in self.stages:
            for block in stage:
                x = checkpointed_call(block, x) if self.remat else block(x)
        x = jnp.mean(x, axis=(1, 2))  # (B, C_last)
        return self.head(x)  # (B, num_classes)


resnet18 = functools.partial(ResNet, (2, 2, 2, 2), BasicBlock)
resnet34 = functools.partial(ResNet, (3, 4, 6, 3), BasicBlock)
resnet50 = functools.partial(ResNet, (3, 4, 6, 3), Bottleneck)
resnet20 = functools.partial(ResNet, (3, 3, 3), BasicBlock, stem="cifar")
resnet32 = functools.partial(ResNet, (5, 5, 5), BasicBlock, stem="cifar")
resnet56 = functools.partial(ResNet, (9, 9, 9), BasicBlock, stem="cifar")
