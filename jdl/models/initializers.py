"""Parameter initializers the reference implementations use and Flax does not ship."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def uniform_init(bound: float) -> nnx.Initializer:
    """Initializer drawing uniformly from [-bound, bound].

    With `bound = 1 / sqrt(fan_in)` it is PyTorch's default for `nn.Linear` and for the
    weights of `nn.LSTM` / `nn.GRU` (there `fan_in` is the hidden size).
    """

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
