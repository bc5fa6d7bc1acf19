"""Character-level GPT: a small decoder-only transformer predicting the next character.

Command:
    python -m experiments.charlm_transformer --workdir workdirs/charlm_transformer
    python -m experiments.charlm_transformer --config.text_path=tinyshakespeare.txt \
        --workdir workdirs/charlm_transformer_shakespeare

Data: any UTF-8 file (`--config.text_path`), by default the Python standard library's
own source (first 2M characters, sorted paths: offline and deterministic). First 90% for
training (random windows of `seq_len` characters), last 10% for validation (every
character scored once, with the context of its window).
Model: GPT with learned positions, 4 pre-LN blocks of width 128 (4 heads, MLP 512), tied
embeddings, context 64 (810k parameters on 65 characters); AdamW 3e-3, weight decay 0.1,
50 warmup steps and cosine decay to 0, global-norm clipping 1.0; 1,100 steps of 128
windows x 64 characters (about 9M characters, 9 passes over tinyshakespeare).
Measured on tinyshakespeare.txt (1.1 MB, 90/10 split) with these defaults, 2 CPU cores
(Intel Xeon 2.5 GHz, nothing else running), jax 0.10.2: val_loss 1.587 nats/char (train
1.38) in 13.4 min wall, compile and sampling included (target: <= 1.60 in 15 min); see
BENCHMARKS.md.
Last lines: a sample (temperature 0.8, top-k 10, KV-cache decoding), then
FINAL {"val_loss": ..., ...} with the validation loss in nats per character.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

import jdl
from experiments.charlm_common import lm_config, run_language_model
from experiments.common import check_sizes, default_workdir
from jdl.cli import command
from jdl.config import ConfigError

CONFIG_CHOICES = {"positions": jdl.models.transformer.POSITIONS}  # listed by --help, checked


def get_config(arg: str | None = None):
    c = lm_config()
    c.batch_size = 128
    c.duration = "1100 steps"
    c.eval_every = 550
    c.weight_decay = 0.1
    c.optimizer = "adamw"
    c.embed_dim = 128
    c.num_heads = 4
    c.num_layers = 4
    c.positions = "learned"
    c.dropout = 0.0
    return c


def build_model(config, vocab_size: int, rngs: nnx.Rngs):
    return jdl.models.GPT(
        vocab_size,
        config.seq_len,
        config.embed_dim,
        config.num_heads,
        config.num_layers,
        positions=config.positions,
        dropout=config.dropout,
        rngs=rngs,
    )


def sample(model, key, prompt_ids: np.ndarray, num_tokens: int, temperature, top_k):
    """`num_tokens` ids after `prompt_ids` (P,), with a KV cache.

    Samples longer than the context (`model.max_len`) slide: each round keeps the last
    half context of text as the prompt of the next, so at most three shapes compile.
    """
    half = max(1, model.max_len // 2)
    ids = np.asarray(prompt_ids, np.int32)
    out = []
    for round_key in jax.random.split(key, -(-num_tokens // half) + 1):
        remaining = num_tokens - len(out)
        if remaining <= 0:
            break
        context = np.concatenate([ids, np.asarray(out, np.int32)])[-half:]
        count = min(remaining, model.max_len - len(context))
        tokens = jdl.models.generate(
            model, round_key, context[None], count, temperature=temperature, top_k=top_k
        )
        out += np.asarray(tokens[0, len(context) :]).tolist()
    return np.asarray(out, np.int32)


def check_extra(config) -> None:
    """The model's sizes must be positive; one clear `ConfigError`."""
    check_sizes(config, "embed_dim", "num_heads", "num_layers")
    if config.embed_dim % config.num_heads:
        raise ConfigError(
            f"config.embed_dim={config.embed_dim} must be a multiple of "
            f"config.num_heads={config.num_heads}"
        )


@command
def main(argv=None):
    return run_language_model(
        argv,
        check_extra=check_extra,
        get_config=get_config,
        build_model=build_model,
        sample=sample,
        default_workdir=default_workdir("charlm_transformer"),
    )


if __name__ == "__main__":
    main()
