"""`TrainState`: everything a training step reads and writes, as one pytree.

A Flax NNX model is split once, before the loop, into a static graph definition
and array states. The step function merges them back inside the traced
function, so the hot path sees only pure pytrees (no per-step `nnx.jit`
overhead) and the whole state can be donated, sharded and checkpointed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


class TrainState(struct.PyTreeNode):
    """The training state of one run.

    Attributes:
      step: int32 scalar, number of optimizer steps taken so far.
      params: `nnx.State` of the model's `nnx.Param` variables (what the optimizer updates).
      model_state: `nnx.State` of every other model variable: batch-norm statistics,
        dropout RNG streams, counters. Updated by the forward pass, not by gradients.
      opt_state: the optax state for `params`.
      rng: uint32[2] base key of the run. Per-step randomness is `fold_in(rng, step)`,
        so a resumed run draws exactly the numbers an uninterrupted one would.
      graphdef: static NNX graph definition (not a leaf).
      tx: the optax transformation (static, not a leaf).
    """

    step: jax.Array
    params: nnx.State
    model_state: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(
        cls, model: nnx.Module, tx: optax.GradientTransformation, *, seed: int = 0
    ) -> TrainState:
        """Splits `model` and initialises the optimizer state.

        Args:
          model: an initialised NNX module. It is not modified; the state holds copies.
          tx: the optax transformation that updates the `nnx.Param` variables.
          seed: seed of the run's base key (data order, dropout, augmentation).
        """
        graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
        params = jax.tree.map(jnp.array, params)  # own copies: donation must not eat the model
        model_state = jax.tree.map(jnp.array, model_state)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(seed),
            graphdef=graphdef,
            tx=tx,
        )

    def model(self, params: nnx.State | None = None) -> nnx.Module:
        """A fresh NNX module holding (copies of) this state's arrays, in training mode.

        Training mode, as the state was split from the model during training: dropout
        is on and batch norm normalises with the batch's statistics. For inference use
        `eval_model` (or `jdl.inference.predict`), or call ``.eval()`` on the result.
        Safe inside traced functions: the module's variables belong to the current trace.
        """
        return nnx.merge(
            self.graphdef, self.params if params is None else params, self.model_state, copy=True
        )

    def eval_model(self) -> nnx.Module:
        """A fresh NNX module with this state's weights, in eval mode.

        Dropout is off and batch norm uses its running averages, so the output depends
        only on the input. Like `model`, it holds copies: changing it (or switching it
        back with ``.train()``) does not change the state.

        Example:
          >>> import optax
          >>> from flax import nnx
          >>> net = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Dropout(0.5))
          >>> state = TrainState.create(net, optax.sgd(0.1))
          >>> state.model().layers[1].deterministic, state.eval_model().layers[1].deterministic
          (False, True)
        """
        model = self.model()
        model.eval()
        return model

    def step_key(self, name: str | int = 0) -> jax.Array:
        """The key for this step's randomness of kind `name` (stable across resumes)."""
        salt = name if isinstance(name, int) else _stable_hash(name)
        return jax.random.fold_in(jax.random.fold_in(self.rng, self.step), salt)


def split_model(model: nnx.Module) -> tuple[nnx.State, nnx.State]:
    """Splits a module into (params, model_state) in the layout `TrainState` uses."""
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    return params, model_state


def count_params(tree: Any) -> int:
    """Total number of scalar entries in a pytree of arrays (e.g. `state.params`).

    Example:
      >>> import jax.numpy as jnp
      >>> count_params({"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)})
      16
    """
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _stable_hash(name: str) -> int:
    # Python's hash() is salted per process; randomness must not be.
    value = 0
    for char in name.encode():
        value = (value * 131 + char) % (2**31 - 1)
    return value
