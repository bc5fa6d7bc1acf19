"""Mixed precision: compute in bfloat16, keep fp32 master weights and optimizer state.

A `Precision` policy says in which dtype the forward and backward passes run.
The train step keeps the parameters and the optimizer state in float32 and
casts the parameters and the floating inputs to the compute dtype *inside*
the differentiated loss, so the cast's transpose brings the gradients back in
float32 and the optimizer update is exact fp32 arithmetic. Losses reduce in
at least float32 (`jdl.losses` upcasts), and the batch-norm statistics and
other model state keep their stored dtype.

    step = jdl.make_train_step(loss_fn, precision="bf16")   # or "fp32", or "auto"

The policy itself casts floating leaves only:

>>> import numpy as np
>>> policy = get_policy("bf16")
>>> batch = policy.cast_to_compute({"x": np.ones(2, np.float32), "y": np.zeros(2, np.int32)})
>>> {name: str(value.dtype) for name, value in batch.items()}
{'x': 'bfloat16', 'y': 'int32'}

"auto" picks bf16 on TPU and GPU and fp32 on CPU, where bfloat16 matmuls are
emulated and slower than fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "PRECISIONS",
    "Precision",
    "cast_like",
    "get_policy",
]

PRECISIONS = ("fp32", "bf16", "auto")


@dataclass(frozen=True)
class Precision:
    """A mixed-precision policy.

    Attributes:
      name: "fp32" or "bf16".
      compute_dtype: dtype of the parameters and inputs seen by the forward pass.
    """

    name: str
    compute_dtype: Any

    @property
    def is_mixed(self) -> bool:
        """True when the compute dtype differs from float32 (casts are needed)."""
        return self.compute_dtype != jnp.float32

    def cast_to_compute(self, tree: Any) -> Any:
        """Casts every floating array leaf of `tree` to the compute dtype; others untouched."""
        if not self.is_mixed:
            return tree
        return jax.tree.map(lambda x: _cast_floating(x, self.compute_dtype), tree)

    def adapt(self, model: nnx.Module) -> nnx.Module:
        """Makes the layers of `model` that fixed a float32 compute dtype use this policy's.

        flax's `nnx.Embed` built without a `dtype` stores its parameter dtype (float32) as
        its compute dtype, so bfloat16 parameters would be looked up, promoted back to
        float32, and every layer after the embedding would run in float32. Under a mixed
        policy, each embedding whose compute dtype is its parameter dtype computes in the
        policy's dtype instead, as `nnx.Linear` (dtype None) does. Changes `model` in
        place (the steps call it on the model they just merged) and returns it.
        """
        if not self.is_mixed:
            return model
        for _, module in nnx.iter_modules(model):
            if isinstance(module, nnx.Embed) and module.dtype == module.param_dtype:
                module.dtype = self.compute_dtype
        return model


def get_policy(precision: str | Precision | None = "fp32") -> Precision:
    """The policy for "fp32", "bf16" or "auto" (None means "fp32").

    Raises:
      ValueError: an unknown name.
    """
    if isinstance(precision, Precision):
        return precision
    name = "fp32" if precision is None else precision
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if name == "auto":
        name = "fp32" if jax.default_backend() == "cpu" else "bf16"
    return Precision(name, jnp.bfloat16 if name == "bf16" else jnp.float32)


def cast_like(tree: Any, reference: Any) -> Any:
    """Casts each array leaf of `tree` to the dtype of the matching leaf of `reference`.

    Keeps a state's dtypes fixed across steps (e.g. batch-norm statistics updated from
    bf16 activations stay float32), which also keeps a scanned carry's types stable.
    """
    return jax.tree.map(_cast_to_match, tree, reference)


def _cast_to_match(x: Any, reference: Any) -> Any:
    dtype = jnp.result_type(reference)
    if x.dtype == dtype or not jnp.issubdtype(dtype, jnp.floating):
        return x  # e.g. RNG keys and counters: never cast
    return x.astype(dtype)


def _cast_floating(x: Any, dtype: Any) -> Any:
    if isinstance(x, jax.Array | jax.ShapeDtypeStruct) or hasattr(x, "dtype"):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x).astype(dtype)
    return x
