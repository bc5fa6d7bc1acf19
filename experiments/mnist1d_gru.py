"""MNIST-1D GRU: a recurrent network reads the signal one value at a time.

Command:
    python -m experiments.mnist1d_gru --workdir workdirs/mnist1d_gru

Data: MNIST-1D generated offline by the `mnist1d` package with its default arguments
(4,000 train / 1,000 test); see `jdl.data.load_mnist1d`.
Model: `jdl.models.SequenceClassifier`: a bidirectional GRU with 64 units per
direction reads the 40 values one at a time; a dense head reads the final states of
both directions. Adam 3e-3 with a one-cycle schedule, global-norm clipping at 1,
batch 128, 60 epochs (1,860 steps). (A roll of up to 5 steps, --config.roll_max_shift=5,
gave 0.958 against 0.969 without, seed 0.)
Expected: test_accuracy about 0.96 (paper: 0.91). Measured on 2 shared CPU cores
(load 9-14), jax 0.10.2: seeds 0/1/2 gave 0.969 / 0.956 / 0.958 in 263-297 s each,
compilation included.
On the idle 2 cores (2026-11-22) seed 0 takes about 71 s.
Last line: FINAL {"test_accuracy": ..., "test_loss": ..., "steps": ..., "seconds": ...}
"""

from __future__ import annotations

from flax import nnx

import jdl
from experiments.common import check_sizes, default_workdir, run_classifier
from experiments.mnist1d_common import load_data, mnist1d_config, with_roll
from jdl.cli import command


def get_config(arg: str | None = None):
    c = mnist1d_config()
    c.batch_size = 128
    c.duration = "60 epochs"
    c.learning_rate = 3e-3
    c.schedule = "one_cycle"
    c.hidden_size = 64
    c.num_layers = 1
    c.bidirectional = True
    c.clip_norm = 1.0
    c.roll_max_shift = 0
    c.log_every = 200
    c.steps_per_dispatch = 10
    c.unroll = 1  # no convolutions: a rolled scan of steps compiles fastest
    return c


def build_model(config, dataset, rngs: nnx.Rngs):
    gru = jdl.models.SequenceClassifier(
        "gru",
        1,
        config.hidden_size,
        dataset.num_classes,
        num_layers=config.num_layers,
        bidirectional=config.bidirectional,
        rngs=rngs,
    )
    return with_roll(config, gru, rngs)


def check_extra(config) -> None:
    """The model's sizes must be positive; one clear `ConfigError`."""
    check_sizes(config, "hidden_size", "num_layers")


@command
def main(argv=None):
    return run_classifier(
        argv,
        get_config=get_config,
        load_data=load_data,
        build_model=build_model,
        check_extra=check_extra,
        default_workdir=default_workdir("mnist1d_gru"),
    )


if __name__ == "__main__":
    main()
