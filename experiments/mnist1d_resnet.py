"""MNIST-1D ResNet: a small 1D residual network with circular-shift augmentation.

Command:
    python -m experiments.mnist1d_resnet --workdir workdirs/mnist1d_resnet

Data: MNIST-1D generated offline by the `mnist1d` package with its default arguments
(4,000 train / 1,000 test); see `jdl.data.load_mnist1d`.
Model: `ResNet1D` (defined here, from jdl's ResNet pieces): a conv stem (kernel 5, 32
channels, batch norm, ReLU), three residual blocks of two kernel-5 convs with batch norm
(32, 64 and 128 channels; the last two halve the length, with 1x1 projection
shortcuts), global average pooling over time and a dense head; 177k parameters. Each
training signal is rolled circularly by up to 5 steps (`RandomRoll`). AdamW 3e-3,
weight decay 1e-4, one-cycle schedule, batch 128, 20 epochs (620 steps); chunks of 4
steps written out in full.
Expected: test_accuracy >= 0.96, the paper's human row (40 epochs, seed 0: 0.990).
Measured on 2 shared CPU cores (load 12-22), jax 0.10.2: seeds 0/1/2 gave 0.991 / 0.993 /
0.987 in 215-334 s each, compilation included (a quiet machine takes a fraction of that).
On the idle 2 cores (2026-11-22) seed 0 takes about 37 s.
Last line: FINAL {"test_accuracy": ..., "test_loss": ..., "steps": ..., "seconds": ...}
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.common import check_sizes, default_workdir, run_classifier
from experiments.mnist1d_common import load_data, mnist1d_config, with_roll
from jdl.cli import command
from jdl.models.resnet import HE_FAN_OUT, batch_norm


def get_config(arg: str | None = None):
    c = mnist1d_config()
    c.batch_size = 128
    c.duration = "20 epochs"
    c.learning_rate = 3e-3
    c.schedule = "one_cycle"
    c.optimizer = "adamw"
    c.weight_decay = 1e-4
    c.width = 32
    c.stage_sizes = (1, 1, 1)
    c.kernel_size = 5
    c.roll_max_shift = 5
    c.log_every = 200
    c.steps_per_dispatch = 4
    c.unroll = 0  # written out in full: convolutions inside XLA:CPU loops are slow
    return c


def conv1d(in_channels: int, out_channels: int, kernel: int, stride: int = 1, *, rngs):
    """A bias-free 1D conv padded by `kernel // 2` on both sides (a batch norm follows)."""
    pad = kernel // 2
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel,),
        strides=stride,
        padding=((pad, pad),),
        use_bias=False,
        kernel_init=HE_FAN_OUT,
        rngs=rngs,
    )


class Block1D(nnx.Module):
    """Two conv + batch-norm layers with a residual connection, as `BasicBlock` in 1D.

    The shortcut is the identity, or a strided 1x1 conv + batch norm when the shape changes.
    Call: `(B, T, in_channels)` -> `(B, ceil(T / stride), channels)`.
    """

    def __init__(self, in_channels: int, channels: int, kernel: int, stride: int, *, rngs):
        self.conv1 = conv1d(in_channels, channels, kernel, stride, rngs=rngs)
        self.bn1 = batch_norm(channels, rngs=rngs)
        self.conv2 = conv1d(channels, channels, kernel, rngs=rngs)
        self.bn2 = batch_norm(channels, rngs=rngs)
        needs_projection = stride != 1 or in_channels != channels
        self.projection = (
            nnx.Sequential(
                conv1d(in_channels, channels, 1, stride, rngs=rngs),
                batch_norm(channels, rngs=rngs),
            )
            if needs_projection
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))  # (B, T / stride, C)
        y = self.bn2(self.conv2(y))
        shortcut = x if self.projection is None else self.projection(x)
        return jax.nn.relu(y + shortcut)


class ResNet1D(nnx.Module):
    """Stem conv, stages of `Block1D` (each stage after the first halves T, doubles width),
    global average pooling over time, dense head.

    Call: `(B, T, in_channels)` -> `(B, num_classes)` logits.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width: int,
        stage_sizes: Sequence[int],
        kernel_size: int,
        rngs: nnx.Rngs,
    ):
        self.stem = conv1d(in_channels, width, kernel_size, rngs=rngs)
        self.stem_bn = batch_norm(width, rngs=rngs)
        blocks, channels = [], width
        for i, num_blocks in enumerate(stage_sizes):
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(Block1D(channels, width * 2**i, kernel_size, stride, rngs=rngs))
                channels = width * 2**i
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(channels, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem_bn(self.stem(x)))  # (B, T, width)
        for block in self.blocks:
            x = block(x)  # (B, T', C')
        return self.head(jnp.mean(x, axis=1))  # (B, num_classes)


def build_model(config, dataset, rngs: nnx.Rngs):
    resnet = ResNet1D(
        1,
        dataset.num_classes,
        width=config.width,
        stage_sizes=config.stage_sizes,
        kernel_size=config.kernel_size,
        rngs=rngs,
    )
    return with_roll(config, resnet, rngs)


def check_extra(config) -> None:
    """The model's sizes must be positive; one clear `ConfigError`."""
    check_sizes(config, "width", "stage_sizes", "kernel_size")


@command
def main(argv=None):
    return run_classifier(
        argv,
        get_config=get_config,
        load_data=load_data,
        build_model=build_model,
        check_extra=check_extra,
        default_workdir=default_workdir("mnist1d_resnet"),
    )


if __name__ == "__main__":
    main()
