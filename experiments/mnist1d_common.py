"""What the MNIST-1D experiments share: config fields, data loading and a 1D augmentation.

Not an experiment itself; see `mnist1d_logreg`, `mnist1d_mlp`, `mnist1d_cnn`,
`mnist1d_gru` and `mnist1d_resnet`. MNIST-1D signals are `(B, 40, 1)` sequences, so
the image translation of `experiments.common` (config.augment_max_shift) does not
apply; these experiments shift signals with `RandomRoll`, a layer in front of the
model that is active in train mode only (config.roll_max_shift).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import jdl
from experiments.common import base_config
from jdl.config import ConfigError

SEQUENCE_LENGTH = 40  # MNIST-1D signals: (B, 40, 1)


def mnist1d_config() -> ml_collections.ConfigDict:
    """`base_config()` plus the MNIST-1D fields (`data_dir`, `roll_max_shift`)."""
    c = base_config()
    c.data_dir = ""  # empty: $JDL_DATA_DIR/mnist1d or ~/.cache/jdl/mnist1d (a cache only)
    c.roll_max_shift = 0  # circular shift of each training signal by up to this many steps
    return c


def load_data(config: ml_collections.ConfigDict) -> jdl.data.Dataset:
    """MNIST-1D with the package's default arguments, after checking the 1D-only keys.

    Raises `ConfigError` for config values that cannot work on 1D signals.
    """
    if config.augment_max_shift:
        raise ConfigError(
            f"config.augment_max_shift={config.augment_max_shift!r} translates 2D "
            "images; MNIST-1D signals are shifted with config.roll_max_shift"
        )
    if not 0 <= config.roll_max_shift < SEQUENCE_LENGTH:
        raise ConfigError(
            f"config.roll_max_shift={config.roll_max_shift!r} must be in [0, {SEQUENCE_LENGTH})"
        )
    return jdl.data.load_mnist1d(data_dir=config.data_dir or None)


class RandomRoll(nnx.Module):
    """Train-mode augmentation: rolls each signal circularly by its own random shift.

    MNIST-1D places each digit at a random circular offset when it is generated, so a
    circular shift gives new signals from (nearly) the same distribution. Each example's
    shift is uniform on [-max_shift, max_shift]. Like `nnx.Dropout`, it acts only when
    `deterministic` is False (`model.train()`) and is the identity in `model.eval()`.

    Args:
      max_shift: largest shift in steps; 0 makes the layer the identity.
      rngs: NNX random streams; the draws come from the `dropout` stream, which jdl's
        train step reseeds at every step.

    Call: `(B, T, C)` -> `(B, T, C)`.
    """

    def __init__(self, max_shift: int, *, rngs: nnx.Rngs, deterministic: bool = False):
        self.max_shift = max_shift
        self.deterministic = deterministic
        self.rngs = rngs.dropout.fork()

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.max_shift == 0:
            return x
        batch, length = x.shape[:2]
        shifts = jax.random.randint(
            self.rngs(), (batch, 1), -self.max_shift, self.max_shift + 1
        )  # (B, 1)
        source = (jnp.arange(length)[None, :] - shifts) % length  # (B, T): output t reads t - s
        return jnp.take_along_axis(x, source[..., None], axis=1)


class Augmented(nnx.Module):
    """`model(augmentation(x))`: the augmentation is part of the model, active in train mode.

    Call: whatever `model` takes -> whatever it returns.
    """

    def __init__(self, augmentation: nnx.Module, model: nnx.Module):
        self.augmentation = augmentation
        self.model = model

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.model(self.augmentation(x))


def with_roll(config: ml_collections.ConfigDict, model: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
    """`model` behind a `RandomRoll` of up to `config.roll_max_shift` steps (if > 0)."""
    if config.roll_max_shift == 0:
        return model
    return Augmented(RandomRoll(config.roll_max_shift, rngs=rngs), model)
