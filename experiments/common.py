"""What every classification experiment shares: config fields, checks, and the run itself.

An experiment module supplies `get_config()` (built on `base_config`), a data
loader and a model builder; `run_classifier` does the rest: read the command
line, check the config before anything compiles, record the run, train with
`jdl.fit`, evaluate on the test split and print the `FINAL {json}` line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
from flax import nnx

import jdl
from jdl.config import ConfigError
from jdl.data import Dataset


def base_config() -> ml_collections.ConfigDict:
    """Config fields shared by the classification experiments, with safe defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 128
    c.duration = "10 epochs"  # steps, epochs or examples, e.g. "2000 steps"
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.schedule = "constant"
    c.warmup_steps = 0
    c.weight_decay = 0.0
    c.clip_norm = 0.0  # 0 disables global-norm clipping
    c.label_smoothing = 0.0
    c.augment_max_shift = 0  # random translation in pixels, 0 disables
    c.validation_fraction = 0.0  # >0 holds out part of train for eval during training
    c.eval_every = 0  # steps; 0 evaluates only at the end
    c.log_every = 100
    c.checkpoint_every = 0  # steps; 0 saves only at the end
    c.max_to_keep = 2
    c.early_stopping_patience = 0
    c.steps_per_dispatch = 10
    c.unroll = 0  # 0: write each chunk out in full (best for convolutions on CPU)
    c.skip_nonfinite = False
    c.progress = True
    c.compilation_cache = True
    return c


def check_config(config: ml_collections.ConfigDict) -> None:
    """Rejects impossible values with one clear message, before anything compiles."""
    rules = [
        ("batch_size", config.batch_size >= 1, "must be >= 1"),
        ("learning_rate", config.learning_rate > 0, "must be > 0"),
        ("warmup_steps", config.warmup_steps >= 0, "must be >= 0"),
        ("weight_decay", config.weight_decay >= 0, "must be >= 0"),
        ("clip_norm", config.clip_norm >= 0, "must be >= 0 (0 disables)"),
        ("label_smoothing", 0 <= config.label_smoothing < 1, "must be in [0, 1)"),
        ("augment_max_shift", config.augment_max_shift >= 0, "must be >= 0"),
        ("validation_fraction", 0 <= config.validation_fraction < 1, "must be in [0, 1)"),
        ("eval_every", config.eval_every >= 0, "must be >= 0"),
        ("log_every", config.log_every >= 0, "must be >= 0"),
        ("checkpoint_every", config.checkpoint_every >= 0, "must be >= 0"),
        ("max_to_keep", config.max_to_keep >= 1, "must be >= 1"),
        ("early_stopping_patience", config.early_stopping_patience >= 0, "must be >= 0"),
        ("steps_per_dispatch", config.steps_per_dispatch >= 1, "must be >= 1"),
        ("unroll", config.unroll >= 0, "must be >= 0 (0: fully unrolled)"),
    ]
    for key, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"config.{key}={config[key]!r} {requirement}")
    if config.early_stopping_patience and not (config.eval_every and config.validation_fraction):
        raise ConfigError(
            "config.early_stopping_patience needs config.eval_every > 0 and "
            "config.validation_fraction > 0 (early stopping must not look at the test split)"
        )


def run_classifier(
    argv: Sequence[str],
    *,
    get_config: Callable[..., ml_collections.ConfigDict],
    load_data: Callable[[ml_collections.ConfigDict], Dataset],
    build_model: Callable[[ml_collections.ConfigDict, Dataset, nnx.Rngs], nnx.Module],
    default_workdir: str,
) -> dict:
    """Runs one classification experiment from the command line; returns the final metrics.

    Prints `FINAL {json}` as the last line of output.
    """
    try:
        config, workdir = jdl.parse_command_line(argv, get_config)
        check_config(config)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    workdir = workdir or default_workdir
    started = time.perf_counter()
    if config.compilation_cache:
        jdl.enable_compilation_cache()
    if jax.process_index() == 0:
        jdl.write_run_record(workdir, config, argv)

    dataset = load_data(config)
    train_split, eval_split = dataset["train"], dataset["test"]
    if config.validation_fraction > 0:
        train_split, eval_split = jdl.data.stratified_split(
            train_split, fraction=config.validation_fraction, seed=config.seed
        )
    train_data = jdl.InMemoryData(train_split, batch_size=config.batch_size, seed=config.seed)
    try:
        num_steps = jdl.parse_duration(
            config.duration,
            steps_per_epoch=train_data.steps_per_epoch,
            batch_size=config.batch_size,
        )
    except ConfigError as error:
        sys.exit(f"error: config.duration: {error}")

    model = build_model(config, dataset, nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    tx, schedule = jdl.make_optimizer(
        config.optimizer,
        learning_rate=config.learning_rate,
        total_steps=num_steps,
        schedule=config.schedule,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm or None,
    )
    state = jdl.TrainState.create(model, tx, seed=config.seed)
    loss_fn = jdl.classification_loss(label_smoothing=config.label_smoothing)
    augment = translate_augmentation(config.augment_max_shift)
    print(
        f"{dataset.name}: train {train_data.num_examples}, eval {len(eval_split['y'])}, "
        f"test {dataset.num_examples('test')} examples; {num_steps} steps of batch "
        f"{config.batch_size}; {jdl.count_params(state.params):,} parameters; "
        f"devices: {jax.devices()}",
        flush=True,
    )
    result = jdl.fit(
        state,
        train_step=jdl.make_train_step(
            loss_fn,
            lr_schedule=schedule,
            augment_fn=augment,
            skip_nonfinite=config.skip_nonfinite,
        ),
        train_data=train_data,
        num_steps=num_steps,
        eval_step=jdl.make_eval_step(loss_fn),
        eval_data=eval_split,
        eval_every=config.eval_every,
        log_every=config.log_every,
        workdir=workdir,
        checkpoint_every=config.checkpoint_every,
        max_to_keep=config.max_to_keep,
        best_metric="accuracy" if config.validation_fraction > 0 else None,
        early_stopping_patience=config.early_stopping_patience,
        steps_per_dispatch=config.steps_per_dispatch,
        unroll=config.unroll or True,
        progress=config.progress,
    )
    test = jdl.make_evaluator(jdl.make_eval_step(loss_fn), 1000)(result.state, dataset["test"])
    final = {
        "test_accuracy": round(test["accuracy"], 4),
        "test_loss": round(test["loss"], 4),
        "train_loss": round(result.train_metrics.get("loss", float("nan")), 4),
        "steps": result.step,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "final.json"), "w") as f:
            json.dump(final, f)
    print("FINAL " + json.dumps(final), flush=True)
    return final


def translate_augmentation(max_shift: int):
    """An `augment_fn` shifting images by up to `max_shift` pixels, or None if 0."""
    if max_shift <= 0:
        return None

    def augment(key, batch):
        return {**batch, "x": jdl.data.random_translate(key, batch["x"], max_shift=max_shift)}

    return augment


def default_workdir(name: str) -> str:
    """workdirs/<name> under the current directory."""
    return os.path.join("workdirs", name)
