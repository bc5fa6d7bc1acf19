"""`TrainState`: everything a training step reads and writes, as one pytree.

A Flax NNX model is split once, before the loop, into a static graph definition
and array states. The step function merges them back inside the traced
function, so the hot path sees only pure pytrees (no per-step `nnx.jit`
overhead) and the whole state can be donated, sharded and checkpointed.

Optionally the state also keeps an exponential moving average (EMA) of the
parameters, updated by `TrainState.apply_gradients` after every optimizer update
and used for evaluation on request (`eval_model(ema=True)`,
`jdl.make_eval_step(loss_fn, use_ema=True)`):

    state = TrainState.create(model, tx, ema_decay=0.999)   # warm-up on by default

After the update that makes `step` equal to t (t = 1, 2, ...), with parameters p_t,

    d_t   = min(decay, (1 + t) / (10 + t))   # ema_warmup=True (default)
    d_t   = decay                            # ema_warmup=False
    ema_t = d_t * ema_{t-1} + (1 - d_t) * p_t,    ema_0 = the initial parameters

The warm-up is the one of TensorFlow's `ExponentialMovingAverage(num_updates=...)`: early
on the average follows the parameters closely (d_1 = 2/11) instead of remembering the
random initialisation for ~1/(1 - decay) steps. The average is kept in the parameters'
dtype (float32 master weights under bf16 compute).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdl.errors import UserError


class EmaError(UserError, ValueError):
    """A bad EMA setting, or EMA weights asked of a state that keeps none."""


@dataclasses.dataclass(frozen=True)
class TrainState:
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
      ema: None (no EMA, the default: the state's leaves and checkpoints are exactly
        those of a state without this field), or an `nnx.State` shaped like `params`
        holding their exponential moving average (see the module docstring). Saved and
        restored with the rest of the state.
      ema_decay: the EMA's decay (static, not a leaf); None when there is no EMA.
      ema_warmup: whether the effective decay is min(ema_decay, (1 + t) / (10 + t))
        (static, not a leaf).

    A pytree whose children are `step`, `params`, `model_state`, `opt_state`, `rng` and,
    only when it is not None, `ema` (so Orbax records no entry for a missing EMA and
    checkpoints without one keep their layout); everything else is static.
    """

    step: jax.Array
    params: nnx.State
    model_state: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    ema: nnx.State | None = None
    ema_decay: float | None = None
    ema_warmup: bool = True

    def replace(self, **changes: Any) -> TrainState:
        """A copy with the given fields replaced (the state itself is immutable)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def create(
        cls,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        *,
        seed: int = 0,
        ema_decay: float | None = None,
        ema_warmup: bool = True,
    ) -> TrainState:
        """Splits `model` and initialises the optimizer state (and the EMA, if asked).

        Args:
          model: an initialised NNX module. It is not modified; the state holds copies.
          tx: the optax transformation that updates the `nnx.Param` variables.
          seed: seed of the run's base key (data order, dropout, augmentation).
          ema_decay: None (default) keeps no EMA. A number in [0, 1) keeps an
            exponential moving average of the parameters with this decay, starting
            from the initial parameters (see the module docstring for the formula).
          ema_warmup: use the effective decay min(ema_decay, (1 + t) / (10 + t)) at
            step t; False uses `ema_decay` from the first step.

        Raises:
          EmaError: `ema_decay` is not a number in [0, 1).
        """
        _check_ema_decay(ema_decay)
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
            ema=None if ema_decay is None else jax.tree.map(jnp.array, params),
            ema_decay=None if ema_decay is None else float(ema_decay),
            ema_warmup=bool(ema_warmup),
        )

    def apply_gradients(
        self, grads: nnx.State, *, model_state: nnx.State | None = None
    ) -> TrainState:
        """The state after one optimizer update with `grads` (pure; traceable).

        As flax's `TrainState.apply_gradients`: runs `tx.update`, applies the updates to
        `params` and increments `step`; also replaces `model_state` when one is given
        (e.g. the batch statistics from the forward pass) and, when the state keeps an
        EMA, updates it with the new parameters (see the module docstring).

        Args:
          grads: gradients shaped like `params` (same dtypes).
          model_state: the new non-parameter model state, or None to keep the current one.
        """
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        updated = self.replace(
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
            model_state=self.model_state if model_state is None else model_state,
        )
        return updated.finish_step()

    def finish_step(self) -> TrainState:
        """`step` advanced by one and, when the state keeps an EMA, the EMA moved towards
        the current parameters (pure; traceable).

        The end of `apply_gradients`, for steps that update the parameters in several
        parts (e.g. a GAN's two networks, `jdl.models.gan`) and then close the step once.
        """
        step = self.step + 1
        new = self.replace(step=step)
        if self.ema is None:
            return new
        decay = self.ema_decay_at(step)
        ema = jax.tree.map(lambda average, p: _ema_update(average, p, decay), self.ema, self.params)
        return new.replace(ema=ema)

    def ema_decay_at(self, step: jax.Array | int) -> jax.Array:
        """The effective EMA decay (float32) of the update that makes the step `step`.

        min(ema_decay, (1 + step) / (10 + step)) with warm-up, else `ema_decay`.

        Raises:
          EmaError: the state keeps no EMA.
        """
        if self.ema_decay is None:
            raise EmaError(_NO_EMA)
        decay = jnp.float32(self.ema_decay)
        if not self.ema_warmup:
            return decay
        t = jnp.asarray(step, jnp.float32)
        return jnp.minimum(decay, (1.0 + t) / (10.0 + t))

    def ema_params(self) -> nnx.State:
        """The EMA of the parameters (shaped like `params`).

        Raises:
          EmaError: the state keeps no EMA.
        """
        if self.ema is None:
            raise EmaError(_NO_EMA)
        return self.ema

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

    def eval_model(self, *, ema: bool = False) -> nnx.Module:
        """A fresh NNX module with this state's weights, in eval mode.

        Dropout is off and batch norm uses its running averages, so the output depends
        only on the input. Like `model`, it holds copies: changing it (or switching it
        back with ``.train()``) does not change the state.

        Args:
          ema: use the EMA of the parameters instead of the parameters (the other model
            variables, e.g. batch-norm statistics, are the state's own).

        Raises:
          EmaError: `ema=True` on a state that keeps no EMA.

        Example:
          >>> import optax
          >>> from flax import nnx
          >>> net = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Dropout(0.5))
          >>> state = TrainState.create(net, optax.sgd(0.1))
          >>> state.model().layers[1].deterministic, state.eval_model().layers[1].deterministic
          (False, True)
        """
        model = self.model(self.ema_params() if ema else None)
        model.eval()
        return model

    def step_key(self, name: str | int = 0) -> jax.Array:
        """The key for this step's randomness of kind `name` (stable across resumes)."""
        salt = name if isinstance(name, int) else _stable_hash(name)
        return jax.random.fold_in(jax.random.fold_in(self.rng, self.step), salt)


_LEAF_FIELDS = ("step", "params", "model_state", "opt_state", "rng")


def _children(state: TrainState) -> tuple[str, ...]:
    return _LEAF_FIELDS + (("ema",) if state.ema is not None else ())


def _static(state: TrainState, names: tuple[str, ...]) -> tuple:
    return (names, state.graphdef, state.tx, state.ema_decay, state.ema_warmup)


def _flatten_with_keys(state: TrainState):
    names = _children(state)
    children = [(jax.tree_util.GetAttrKey(name), getattr(state, name)) for name in names]
    return children, _static(state, names)


def _flatten(state: TrainState):
    names = _children(state)
    return [getattr(state, name) for name in names], _static(state, names)


def _unflatten(static: tuple, children) -> TrainState:
    names, graphdef, tx, ema_decay, ema_warmup = static
    return TrainState(
        **dict(zip(names, children, strict=True)),
        graphdef=graphdef,
        tx=tx,
        ema_decay=ema_decay,
        ema_warmup=ema_warmup,
    )


# By hand rather than as a flax struct: a struct's None field still becomes an entry of
# Orbax's tree metadata, which would change every checkpoint written without an EMA.
jax.tree_util.register_pytree_with_keys(TrainState, _flatten_with_keys, _unflatten, _flatten)


_NO_EMA = (
    "this state keeps no EMA of its parameters; create it with "
    "TrainState.create(model, tx, ema_decay=0.999) to keep one"
)


def _check_ema_decay(decay: object) -> None:
    if decay is None:
        return
    number = isinstance(decay, numbers.Real) and not isinstance(decay, bool)
    if not number or not 0.0 <= float(decay) < 1.0:
        raise EmaError(
            f"ema_decay must be a number in [0, 1) (e.g. 0.999) or None for no EMA, got {decay!r}"
        )


def _ema_update(average: jax.Array, value: jax.Array, decay: jax.Array) -> jax.Array:
    # In the average's dtype: the decay is float32 and must not promote bf16 params.
    decay = decay.astype(average.dtype)
    return decay * average + (1 - decay) * value


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
