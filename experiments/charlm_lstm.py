"""Character-level LSTM language model: embedding -> LSTM -> next-character logits.

Command:
    python -m experiments.charlm_lstm --workdir workdirs/charlm_lstm
    python -m experiments.charlm_lstm --config.text_path=tinyshakespeare.txt \
        --workdir workdirs/charlm_lstm_shakespeare

Data: any UTF-8 file (`--config.text_path`), by default the Python standard library's
own source (first 2M characters, sorted paths: offline and deterministic). First 90% for
training (random windows of `seq_len` characters), last 10% for validation (every
character scored once). The model reads each window from a zero state.
Model: embedding 64 -> 1-layer LSTM 256 -> linear (350k parameters on 65 characters);
Adam 3e-3 with 50 warmup steps and cosine decay to 0, global-norm clipping 1.0;
2,000 steps of 64 windows x 64 characters (about 8.2M characters, ~8 epochs of Shakespeare).
Measured on tinyshakespeare.txt (1.1 MB, 90/10 split), 2 CPU cores shared with a running
test suite, jax 0.10.2: val_loss 1.599 nats/char (train 1.42) in 7.9 min wall (498 s CPU);
target <= 1.75 in <= 15 min. See BENCHMARKS.md.
Last lines: a sample (temperature 0.8, top-k 10), then FINAL {"val_loss": ..., ...}
with the validation loss in nats per character.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

import jdl
from experiments.charlm_common import lm_config, run_language_model
from experiments.common import check_sizes, default_workdir
from jdl.cli import command

CONFIG_CHOICES = {"cell_type": jdl.models.rnn.CELL_TYPES}  # listed by --help, checked


def get_config(arg: str | None = None):
    c = lm_config()
    c.batch_size = 64
    c.duration = "2000 steps"
    c.eval_every = 500
    c.embed_dim = 64
    c.hidden_size = 256
    c.num_layers = 1
    c.cell_type = "lstm"
    c.dropout = 0.0
    return c


def build_model(config, vocab_size: int, rngs: nnx.Rngs):
    return jdl.models.CharLM(
        vocab_size,
        config.embed_dim,
        config.hidden_size,
        config.num_layers,
        cell_type=config.cell_type,
        dropout=config.dropout,
        rngs=rngs,
    )


def sample(model, key, prompt_ids: np.ndarray, num_tokens: int, temperature, top_k):
    """`num_tokens` ids after `prompt_ids` (P,), carrying the LSTM state; one compile."""
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, key, prompt_ids, temperature, num_tokens, top_k)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _generate(graphdef, state, key, prompt_ids, temperature, num_tokens, top_k):
    model = nnx.merge(graphdef, state)
    return model.generate(key, prompt_ids, num_tokens, temperature, top_k)


def check_extra(config) -> None:
    """The model's sizes must be positive; one clear `ConfigError`."""
    check_sizes(config, "embed_dim", "hidden_size", "num_layers")


@command
def main(argv=None):
    return run_language_model(
        argv,
        check_extra=check_extra,
        get_config=get_config,
        build_model=build_model,
        sample=sample,
        default_workdir=default_workdir("charlm_lstm"),
    )


if __name__ == "__main__":
    main()
