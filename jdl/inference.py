"""Running a model on new inputs: `predict`.

`predict` runs a model in eval mode (dropout off, batch norm on its running
averages) over inputs of any length, in jitted batches of one fixed size: the
last batch is padded by repeating its last example and the padding's outputs
are dropped, so one compiled program serves every batch and every input length.
The program is cached on the model's graph (its structure and modes, not its
weights), the batch size, the precision and the shapes of one example, so calling
`predict` again, with new weights of the same model or more inputs, compiles
nothing.

`predict` never changes the model it is given: it runs an eval-mode copy.

Example:
  >>> import numpy as np
  >>> from flax import nnx
  >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Dropout(0.5))
  >>> logits = predict(model, np.ones((5, 3), np.float32), batch_size=4)
  >>> logits.shape, type(logits).__name__
  ((5, 2), 'ndarray')
  >>> model.layers[1].deterministic  # the caller's model is still in training mode
  False
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdl import precision as precision_lib
from jdl.errors import UserError
from jdl.state import TrainState

__all__ = ["PredictInputError", "predict"]


class PredictInputError(UserError, ValueError):
    """Inputs `predict` cannot batch: empty, without a batch axis, or of unequal lengths."""


def predict(
    model_or_state: nnx.Module | TrainState,
    x: Any,
    *,
    batch_size: int = 256,
    precision: str | precision_lib.Precision | None = None,
) -> Any:
    """Runs a model in eval mode on `x`, batch by batch, and returns its outputs on the host.

    Args:
      model_or_state: an NNX module (not changed: `predict` runs an eval-mode copy)
        or a `TrainState` (its weights, e.g. ``result.state`` after `jdl.fit`).
      x: the model's input: an array (N, ...) or a pytree (e.g. a dict) of arrays
        sharing the leading example axis N >= 1. The model is called as
        ``model(batch)``, where `batch` has the structure of `x` and B examples.
      batch_size: B, examples per call, >= 1. Every call has exactly B examples (the
        last one padded), so there is one compile per model graph, B and example
        shape, whatever N is; a larger B uses more memory and fewer calls.
      precision: None or "fp32", "bf16" or "auto" (see `jdl.precision`): the dtype
        of the forward pass. Floating outputs come back in float32 under "bf16".

    Returns:
      The model's output for all N examples in input order, with the model's output
      structure: a NumPy array (N, ...) for a model that returns one array, or the same
      pytree of NumPy arrays. Every output leaf must have the leading batch axis.

    Raises:
      PredictInputError: (a ValueError) `x` is empty, has a leaf without a leading
        axis, or leaves of different lengths; or the model's output has a leaf
        without the batch axis.
      TypeError: `model_or_state` is neither an NNX module nor a `TrainState`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise PredictInputError(f"batch_size must be >= 1, got {batch_size}")
    graphdef, params, rest = nnx.split(_eval_copy(model_or_state), nnx.Param, ...)
    policy = precision_lib.get_policy(precision)
    inputs, num_examples = _host_inputs(x)
    outputs, pending = [], None
    for start in range(0, num_examples, batch_size):
        count = min(batch_size, num_examples - start)
        rows = functools.partial(_padded_rows, start=start, count=count, batch_size=batch_size)
        batch = jax.tree.map(rows, inputs)
        result = _forward(graphdef, policy, params, rest, batch)  # dispatched, not waited for
        if pending is not None:
            # Reading the previous batch back while this one computes keeps one batch in
            # flight and only one batch of outputs on the device.
            outputs.append(_to_host(*pending, batch_size))
        pending = (result, count)
    outputs.append(_to_host(*pending, batch_size))
    return jax.tree.map(lambda *parts: np.concatenate(parts, axis=0), *outputs)


def _eval_copy(model_or_state: nnx.Module | TrainState) -> nnx.Module:
    """An eval-mode module with the weights of `model_or_state`, sharing nothing mutable."""
    if isinstance(model_or_state, TrainState):
        return model_or_state.eval_model()
    if isinstance(model_or_state, nnx.Module):
        # New module and variable objects: .eval() must not reach the caller's model.
        model = nnx.merge(*nnx.split(model_or_state), copy=True)
        model.eval()
        return model
    raise TypeError(
        "predict takes an NNX module or a jdl.TrainState (e.g. result.state after fit), "
        f"got {type(model_or_state).__name__}"
    )


def _host_inputs(x: Any) -> tuple[Any, int]:
    """`x` with NumPy leaves, and its number of examples N, after checking that N >= 1."""
    inputs = jax.tree.map(np.asarray, x)
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise PredictInputError("predict got no input arrays; pass an array (N, ...) or a dict")
    flat = jax.tree_util.tree_flatten_with_path(inputs)[0]
    if any(leaf.ndim == 0 for _, leaf in flat):
        names = [jax.tree_util.keystr(path) or "x" for path, leaf in flat if leaf.ndim == 0]
        raise PredictInputError(
            f"predict needs a leading example axis on every input; {', '.join(names)} is a "
            "scalar. For one example pass x[None]"
        )
    sizes = {jax.tree_util.keystr(path) or "x": len(leaf) for path, leaf in flat}
    if len(set(sizes.values())) != 1:
        raise PredictInputError(f"predict inputs disagree on the number of examples: {sizes}")
    num_examples = len(leaves[0])
    if num_examples == 0:
        raise PredictInputError(
            "predict got 0 examples (inputs of shape "
            f"{[tuple(leaf.shape) for leaf in leaves]}); pass at least one"
        )
    return inputs, num_examples


def _padded_rows(array: np.ndarray, start: int, count: int, batch_size: int) -> np.ndarray:
    """Rows [start, start + count) of `array`, padded to `batch_size` rows by repeating the last.

    Repeating a real example (not zeros) keeps the padding a valid input for any model
    (token ids in range, no division by a zero norm); its outputs are dropped.
    """
    rows = array[start : start + count]
    if count == batch_size:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], batch_size - count, axis=0)])


def _to_host(result: Any, count: int, batch_size: int) -> Any:
    """The first `count` rows of every output leaf, as NumPy arrays."""
    leaves = jax.tree.leaves(result)
    if any(jnp.ndim(leaf) == 0 or leaf.shape[0] != batch_size for leaf in leaves):
        shapes = jax.tree.map(lambda leaf: tuple(jnp.shape(leaf)), result)
        raise PredictInputError(
            f"predict needs model outputs with a leading batch axis of {batch_size} (the "
            f"batch size); the model returned shapes {shapes}"
        )
    return jax.tree.map(lambda leaf: np.asarray(leaf[:count]), jax.device_get(result))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(
    graphdef: nnx.GraphDef,
    policy: precision_lib.Precision,
    params: nnx.State,
    rest: nnx.State,
    batch: Any,
) -> Any:
    """The eval-mode forward pass of one batch. Compiled once per (graph, policy, shapes).

    As in `jdl.steps.make_eval_step`, only the parameters and the inputs are cast to the
    compute dtype; batch-norm statistics and other model state keep their dtype.
    """
    model = policy.adapt(nnx.merge(graphdef, policy.cast_to_compute(params), rest))
    outputs = model(policy.cast_to_compute(batch))
    if not policy.is_mixed:
        return outputs
    return jax.tree.map(
        lambda y: y.astype(jnp.float32) if jnp.issubdtype(y.dtype, jnp.floating) else y, outputs
    )
