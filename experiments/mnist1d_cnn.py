"""MNIST-1D CNN: 1D convolutions with max pooling, then a dense head.

Command:
    python -m experiments.mnist1d_cnn --workdir workdirs/mnist1d_cnn

Data: MNIST-1D generated offline by the `mnist1d` package with its default arguments
(4,000 train / 1,000 test); see `jdl.data.load_mnist1d`.
Model: `jdl.models.CNN` in 1D: three blocks of conv (kernel 5, 32/64/128 channels) -
ReLU - max pool 2 (40 -> 20 -> 10 -> 5 steps), dense 128, dense 10. Each training
signal is rolled circularly by up to 5 steps (`RandomRoll`; MNIST-1D's own generator
translates circularly). Adam 3e-3 with a one-cycle schedule, batch 128, 60 epochs
(1,860 steps); chunks of 4 steps written out in full (convolutions inside XLA:CPU
loops are slow, see BENCHMARKS.md).
Expected: test_accuracy about 0.97 (paper: 0.94; without the roll, seed 0 gave 0.946).
Measured on 2 shared CPU cores (load 14-24), jax 0.10.2: seeds 0/1/2 gave 0.974 / 0.974 /
0.970 in 163-271 s each, compilation included.
On the idle 2 cores (2026-11-22) seed 0 takes about 30 s.
Last line: FINAL {"test_accuracy": ..., "test_loss": ..., "steps": ..., "seconds": ...}
"""

from __future__ import annotations

from flax import nnx

import jdl
from experiments.common import check_sizes, default_workdir, run_classifier
from experiments.mnist1d_common import SEQUENCE_LENGTH, load_data, mnist1d_config, with_roll
from jdl.cli import command


def get_config(arg: str | None = None):
    c = mnist1d_config()
    c.batch_size = 128
    c.duration = "60 epochs"
    c.learning_rate = 3e-3
    c.schedule = "one_cycle"
    c.conv_channels = (32, 64, 128)
    c.kernel_size = 5
    c.dense_sizes = (128,)
    c.dropout = 0.0
    c.roll_max_shift = 5
    c.log_every = 200
    c.steps_per_dispatch = 4
    c.unroll = 0  # written out in full: convolutions inside XLA:CPU loops are slow
    return c


def build_model(config, dataset, rngs: nnx.Rngs):
    cnn = jdl.models.CNN(
        1,
        dataset.num_classes,
        input_shape=(SEQUENCE_LENGTH,),
        conv_channels=config.conv_channels,
        kernel_size=config.kernel_size,
        dense_sizes=config.dense_sizes,
        dropout=config.dropout,
        rngs=rngs,
    )
    return with_roll(config, cnn, rngs)


def check_extra(config) -> None:
    """The model's sizes must be positive; one clear `ConfigError`."""
    check_sizes(config, "conv_channels", "kernel_size", "dense_sizes")


@command
def main(argv=None):
    return run_classifier(
        argv,
        get_config=get_config,
        load_data=load_data,
        build_model=build_model,
        check_extra=check_extra,
        default_workdir=default_workdir("mnist1d_cnn"),
    )


if __name__ == "__main__":
    main()
