"""MNIST-1D logistic regression: one dense layer from the 40 signal values to 10 classes.

Command:
    python -m experiments.mnist1d_logreg --workdir workdirs/mnist1d_logreg

Data: MNIST-1D generated offline by the `mnist1d` package with its default arguments
(4,000 train / 1,000 test); see `jdl.data.load_mnist1d`.
Model: softmax regression 40 -> 10 (an `MLP` without hidden layers); Adam 3e-3 with a
cosine schedule, batch 128, 100 epochs (3,100 steps).
Expected: test_accuracy about 0.33 (paper: 0.32). Measured on 2 shared CPU cores
(load 20), jax 0.10.2: seeds 0/1/2 gave 0.331 / 0.334 / 0.317 in 26-87 s each.
On the idle 2 cores (2026-11-22) seed 0 takes about 9 s.
Last line: FINAL {"test_accuracy": ..., "test_loss": ..., "steps": ..., "seconds": ...}
"""

from __future__ import annotations

from flax import nnx

import jdl
from experiments.common import default_workdir, run_classifier
from experiments.mnist1d_common import SEQUENCE_LENGTH, load_data, mnist1d_config
from jdl.cli import command


def get_config(arg: str | None = None):
    c = mnist1d_config()
    c.batch_size = 128
    c.duration = "100 epochs"
    c.learning_rate = 3e-3
    c.schedule = "cosine"
    c.weight_decay = 0.0
    c.steps_per_dispatch = 50
    c.unroll = 5
    return c


def build_model(config, dataset, rngs: nnx.Rngs):
    return jdl.models.MLP(SEQUENCE_LENGTH, (), dataset.num_classes, rngs=rngs)


@command
def main(argv=None):
    return run_classifier(
        argv,
        get_config=get_config,
        load_data=load_data,
        build_model=build_model,
        default_workdir=default_workdir("mnist1d_logreg"),
    )


if __name__ == "__main__":
    main()
