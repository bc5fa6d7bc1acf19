"""MNIST-1D MLP: two hidden ReLU layers on the 40 signal values.

Command:
    python -m experiments.mnist1d_mlp --workdir workdirs/mnist1d_mlp

Data: MNIST-1D generated offline by the `mnist1d` package with its default arguments
(4,000 train / 1,000 test); see `jdl.data.load_mnist1d`.
Model: 40-512-512-10 MLP, ReLU, dropout 0.5 after each hidden layer (without it the
network overfits the 4,000 examples: 40-100-100-10 reached 0.60); Adam 1e-3 with a
cosine schedule, batch 128, 100 epochs (3,100 steps).
Expected: test_accuracy about 0.71 (paper: 0.68). Measured on 2 shared CPU
cores (load 18-22), jax 0.10.2: seeds 0/1/2 gave 0.719 / 0.710 / 0.709 in 133-176 s each.
On the idle 2 cores (2026-11-22) seed 0 takes about 23 s.
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
    c.duration = "100 epochs"
    c.learning_rate = 1e-3
    c.schedule = "cosine"
    c.hidden_sizes = (512, 512)
    c.dropout = 0.5
    c.roll_max_shift = 0
    c.steps_per_dispatch = 50
    c.unroll = 5
    return c


def build_model(config, dataset, rngs: nnx.Rngs):
    mlp = jdl.models.MLP(
        SEQUENCE_LENGTH,
        config.hidden_sizes,
        dataset.num_classes,
        dropout=config.dropout,
        rngs=rngs,
    )
    return with_roll(config, mlp, rngs)


def check_extra(config) -> None:
    """The model's sizes must be positive; one clear `ConfigError`."""
    check_sizes(config, "hidden_sizes")


@command
def main(argv=None):
    return run_classifier(
        argv,
        get_config=get_config,
        load_data=load_data,
        build_model=build_model,
        check_extra=check_extra,
        default_workdir=default_workdir("mnist1d_mlp"),
    )


if __name__ == "__main__":
    main()
