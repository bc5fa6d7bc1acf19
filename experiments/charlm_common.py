"""What the character language-model experiments share: config, data, loss, run, sampling.

An experiment module supplies `get_config()` (built on `lm_config`), a model builder
and a sampler; `run_language_model` does the rest: read the command line, check the
config and the sampling prompt before anything compiles, load and split the text,
train with `jdl.fit` on random windows, score the validation text, print a sample and
the `FINAL {json}` line.

Corpus: `text_path` (any UTF-8 file) or, when empty, the Python standard library's own
source (`jdl.data.load_stdlib_source`), available offline everywhere. The first 90% is
the training text and the last 10% the validation text (`validation_fraction`).
Losses are in nats per character.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import jdl
from experiments.common import (
    PROCESS_FIELDS,
    base_config,
    check_config,
    config_num_steps,
    finite_round,
    fit_with_config,
    has_checkpoint,
    initial_state,
    make_config_optimizer,
    model_rngs,
    report_final,
    start_run,
    workdir_lock,
)
from jdl import jsonio
from jdl.config import ConfigError
from jdl.data import text as text_data

# A model builder: (config, vocab_size, rngs) -> model mapping (B, T) int ids to (B, T, V).
BuildModel = Callable[[ml_collections.ConfigDict, int, nnx.Rngs], nnx.Module]
# A sampler: (model, key, prompt_ids (P,), num_tokens, temperature, top_k) -> ids (N,).
Sample = Callable[[nnx.Module, jax.Array, np.ndarray, int, float, int], jax.Array]


def lm_config() -> ml_collections.ConfigDict:
    """Config fields of the language-model experiments (the classification fields too)."""
    c = base_config()
    c.text_path = ""  # UTF-8 text file; empty: the Python standard library's source
    c.max_chars = 2_000_000  # the first max_chars characters of the corpus; 0: all
    c.validation_fraction = 0.1  # the last 10% of the text, contiguous
    c.seq_len = 64  # characters per training window
    c.eval_batch_size = 64  # validation windows per eval batch
    c.unroll = 1  # a rolled scan of the steps: no convolutions here, faster compiles
    c.learning_rate = 3e-3
    c.schedule = "cosine"  # to 0 at the last step
    c.warmup_steps = 50
    c.clip_norm = 1.0
    c.log_every = 50
    c.eval_every = 500
    c.sample_prompt = "\n"
    c.sample_chars = 500
    c.sample_temperature = 0.8
    c.sample_top_k = 10  # 0: sample from all characters
    return c


def check_lm_config(config: ml_collections.ConfigDict) -> None:
    """`check_config` plus the language-model fields; one clear `ConfigError`."""
    check_config(config)
    rules = [
        ("validation_fraction", 0 < config.validation_fraction < 1, "must be in (0, 1)"),
        ("augment_max_shift", config.augment_max_shift == 0, "shifts images; must be 0"),
        ("max_chars", config.max_chars >= 0, "must be >= 0 (0: the whole corpus)"),
        ("seq_len", config.seq_len >= 2, "must be >= 2"),
        ("eval_batch_size", config.eval_batch_size >= 1, "must be >= 1"),
        ("sample_chars", config.sample_chars >= 0, "must be >= 0"),
        ("sample_temperature", config.sample_temperature >= 0, "must be >= 0 (0: greedy)"),
        ("sample_top_k", config.sample_top_k >= 0, "must be >= 0 (0: all characters)"),
        ("sample_prompt", len(config.sample_prompt) >= 1, "must have at least one character"),
    ]
    for key, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"config.{key}={config[key]!r} {requirement}")
    if config.text_path and not os.path.isfile(config.text_path):
        raise ConfigError(f"config.text_path={config.text_path!r}: no such file")


def load_corpus(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(text, a one-line description of where it came from)."""
    if config.text_path:
        text = text_data.load_text(config.text_path, config.max_chars)
        return text, config.text_path
    text = text_data.load_stdlib_source(config.max_chars)
    return text, f"Python {sys.version.split()[0]} standard library source"


def lm_loss(*, label_smoothing: float = 0.0) -> jdl.steps.LossFn:
    """Next-character cross-entropy (nats), per window.

    Reads batch["x"] and batch["y"], int (B, T); the model maps (B, T) ids to (B, T, V)
    logits. Per window, "loss" is the mean over its T positions, or
    `sum_t weight * xent` when the batch has "weight" (B, T) (see
    `jdl.data.text.eval_windows`); "accuracy" (next character guessed right) likewise.
    """

    def loss_fn(model: nnx.Module, batch: jdl.steps.Batch) -> jdl.steps.Metrics:
        logits = model(batch["x"])  # (B, T, V)
        xent = jdl.losses.softmax_xent(
            logits=logits, labels=batch["y"], label_smoothing=label_smoothing
        )  # (B, T)
        correct = (jnp.argmax(logits, axis=-1) == batch["y"]).astype(jnp.float32)
        weight = batch.get("weight")
        if weight is None:
            return {"loss": jnp.mean(xent, axis=-1), "accuracy": jnp.mean(correct, axis=-1)}
        # where(): padding may hold any label; a 0 weight must not meet a NaN.
        return {
            "loss": jnp.sum(jnp.where(weight > 0, weight * xent, 0.0), axis=-1),
            "accuracy": jnp.sum(weight * correct, axis=-1),
        }

    return loss_fn


def run_language_model(
    argv: Sequence[str],
    *,
    get_config: Callable[..., ml_collections.ConfigDict],
    build_model: BuildModel,
    sample: Sample,
    default_workdir: str,
    check_extra: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> dict:
    """Runs one language-model experiment from the command line; returns the final metrics.

    `check_extra(config)` checks the model's own fields after `check_lm_config`.
    Prints a generated sample and then `FINAL {json}` as the last line of output.

    Raises:
      jdl.UserError: a bad config, prompt or workdir (before anything compiles), a
        checkpoint of another model or vocabulary; the workdir is left as it was.
    """
    checks = (check_lm_config,) if check_extra is None else (check_lm_config, check_extra)
    run = start_run(
        argv,
        get_config,
        default_workdir,
        *checks,
        unsupported=PROCESS_FIELDS,
        reason="the language models train in one process",
    )
    config, workdir = run.config, run.workdir
    text, source = load_corpus(config)
    vocab = text_data.CharVocab.from_text(text)
    prompt_ids = vocab.encode(config.sample_prompt)  # fails now, not after training
    train_ids, val_ids = text_data.split_text(vocab.encode(text), config.validation_fraction)
    train_data = text_data.RandomWindows(
        train_ids, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed
    )
    num_steps = config_num_steps(config, train_data)
    tx, schedule = make_config_optimizer(config, num_steps)
    with workdir_lock(workdir):
        if jax.process_index() == 0:
            record_vocab(workdir, vocab)
        model = build_model(config, vocab.size, model_rngs(config))
        state = jdl.TrainState.create(model, tx, seed=config.seed)
        state = initial_state(state, config.init_from, workdir)
        val_windows = text_data.eval_windows(val_ids, config.seq_len)
        print(
            f"{source}: {len(text):,} characters, vocabulary {vocab.size}; train "
            f"{len(train_ids):,}, validation {len(val_ids):,} characters; {num_steps} steps of "
            f"{config.batch_size} x {config.seq_len} characters; "
            f"{jdl.count_params(state.params):,} parameters; devices: {jax.devices()}",
            flush=True,
        )
        result = fit_with_config(
            config,
            state,
            loss_fn=lm_loss(label_smoothing=config.label_smoothing),
            schedule=schedule,
            train_data=train_data,
            num_steps=num_steps,
            workdir=workdir,
            run=run,
            eval_data=val_windows,
            eval_batch_size=config.eval_batch_size,
            best_metric="loss",
            best_mode="min",
        )
    validation = result.eval_history[-1]  # fit evaluates at the last step
    train_seconds = time.perf_counter() - run.started
    sample_text = generate_text(config, vocab, result.state, sample, prompt_ids)
    print(
        f"SAMPLE (temperature {config.sample_temperature}, top-k {config.sample_top_k or 'all'}"
        f", prompt {config.sample_prompt!r}):\n{sample_text}",
        flush=True,
    )
    final = {
        "val_loss": round(validation["loss"], 4),  # nats per character
        "val_accuracy": round(validation["accuracy"], 4),
        "train_loss": finite_round(result.train_metrics.get("loss")),
        "steps": result.step,
        "seconds": round(train_seconds, 1),  # load, compile, train, evaluate; not sampling
        "vocab_size": vocab.size,
        "params": jdl.count_params(result.state.params),
    }
    return report_final(final, workdir, finished=result.was_finished, extra={"sample": sample_text})


def record_vocab(workdir: str, vocab: text_data.CharVocab) -> None:
    """Writes `workdir/vocab.json`, or checks it when the workdir's checkpoints will resume.

    Raises:
      ConfigError: the workdir's checkpoints were trained on another vocabulary (a changed
        `text_path` or `max_chars`); the file is left as it was.
    """
    path = os.path.join(workdir, "vocab.json")
    wanted = json.loads(json.dumps(vocab.to_json()))
    if has_checkpoint(workdir) and os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        if recorded != wanted:
            raise ConfigError(
                f"the checkpoints in {workdir} were trained on another vocabulary "
                f"(vocab.json differs from the {vocab.size} characters of this text): "
                "config.text_path or config.max_chars changed; use the same text or a new "
                "--workdir"
            )
        return
    os.makedirs(workdir, exist_ok=True)
    jsonio.write_json(path, wanted)


def generate_text(
    config: ml_collections.ConfigDict,
    vocab: text_data.CharVocab,
    state: jdl.TrainState,
    sample: Sample,
    prompt_ids: np.ndarray,
) -> str:
    """The prompt and `config.sample_chars` sampled characters, as text."""
    if config.sample_chars == 0:
        return config.sample_prompt
    model = state.model()
    model.eval()
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5A3E)
    ids = sample(
        model,
        key,
        prompt_ids,
        config.sample_chars,
        config.sample_temperature,
        config.sample_top_k or None,
    )
    return config.sample_prompt + vocab.decode(np.asarray(ids))
