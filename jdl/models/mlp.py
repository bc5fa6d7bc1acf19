"""Multi-layer perceptrons."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdl.models.sizes import check_sizes

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,  # the tanh approximation (GPT-2's "gelu_new")
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),  # erf form (BERT, ViT)
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called `name`; ValueError lists the valid names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nnx.Module):
    """Dense layers with an activation between them; inputs are flattened per example.

    Args:
      in_features: size of one flattened input example.
      hidden_sizes: width of each hidden layer, e.g. (128,) or (512, 512).
      num_outputs: size of the output (number of classes for a classifier).
      activation: "relu", "gelu", "sigmoid", "tanh" or "silu".
      dropout: dropout rate after each hidden activation (0 disables).
      norm: None or "layer": LayerNorm before each hidden activation.
      rngs: NNX random streams; `params` for init, `dropout` if dropout > 0.

    Call: `(B, ...)` float -> `(B, num_outputs)` logits.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        num_outputs: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str | None = None,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            "MLP", in_features=in_features, hidden_sizes=hidden_sizes, num_outputs=num_outputs
        )
        if norm not in (None, "layer"):
            raise ValueError(f"norm must be None or 'layer', got {norm!r}")
        self.activation = activation_fn(activation)
        sizes = [in_features, *hidden_sizes]
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.norms = nnx.List(
            [nnx.LayerNorm(b, rngs=rngs) for b in hidden_sizes] if norm == "layer" else []
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.head = nnx.Linear(sizes[-1], num_outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)  # (B, in_features)
        for i, layer in enumerate(self.hidden):
            x = layer(x)
            if self.norms:
                x = self.norms[i](x)
            x = self.activation(x)
            if self.dropout is not None:
                x = self.dropout(x)
        return self.head(x)  # (B, num_outputs)
