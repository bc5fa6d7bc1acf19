"""Gradual magnitude pruning (Zhu and Gupta, 2017) as an optax wrapper.

`magnitude_prune(inner, schedule)` wraps any optax transformation. Every `frequency`
steps between the schedule's begin and end it recomputes, for each prunable tensor on its
own, a binary mask that keeps the largest-magnitude weights so that exactly
`round(sparsity(step) * size)` entries are zero; between mask updates, and for the rest of
training, it rewrites the inner updates so that pruned weights land on exactly 0.0.
The masks live in the optimizer state, so they are checkpointed and restored with it.

    tx = magnitude_prune(
        optax.adam(1e-3),
        polynomial_sparsity(0.9, begin_step=200, end_step=1200, frequency=50),
    )
    state = jdl.TrainState.create(model, tx)    # then jdl.fit as usual
    sparsity_report(state.params)                # {"total": 0.9, "hidden/0/kernel": 0.9, ...}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdl.checkpoint import path_name
from jdl.optim import default_decay_mask

MaskFn = Callable[[optax.Params], Any]
SparsitySchedule = Callable[[jax.Array], jax.Array]


class PruneState(NamedTuple):
    """State of `magnitude_prune`.

    Attributes:
      count: int32 scalar, number of updates applied so far.
      masks: pytree shaped like the params: a bool array of the leaf's shape for pruned
        leaves (True = kept), a bool scalar True for leaves that are never pruned.
      inner_state: the wrapped transformation's state.
    """

    count: jax.Array
    masks: Any
    inner_state: optax.OptState


def polynomial_sparsity(
    final_sparsity: float,
    *,
    begin_step: int,
    end_step: int,
    initial_sparsity: float = 0.0,
    power: float = 3.0,
    frequency: int = 100,
) -> SparsitySchedule:
    """Zhu and Gupta's schedule: `s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power`.

    Sparsity rises fast at first, while the network can still recover, and flattens as it
    approaches `final_sparsity` at `end_step`; it is 0 before `begin_step` (no pruning).

    Args:
      final_sparsity: target fraction of zeros in [0, 1).
      begin_step: first step at which masks are recomputed, 0 <= begin_step <= end_step.
      end_step: last step at which masks are recomputed.
      initial_sparsity: sparsity at `begin_step`, in [0, final_sparsity].
      power: exponent (3 in the paper).
      frequency: masks are recomputed at steps `begin_step + i * frequency` (<= end_step);
        stored on the schedule as `schedule.pruning_steps` for `magnitude_prune`.

    Returns:
      `schedule(step) -> float32 sparsity`, traceable, with attribute `pruning_steps`
      (a function `step -> bool array`, True on mask-update steps).

    Raises:
      ValueError: on values outside the ranges above.
    """
    if not 0.0 <= final_sparsity < 1.0:
        raise ValueError(f"final_sparsity must be in [0, 1), got {final_sparsity}")
    if not 0.0 <= initial_sparsity <= final_sparsity:
        raise ValueError(
            f"initial_sparsity must be in [0, final_sparsity={final_sparsity}], "
            f"got {initial_sparsity}"
        )
    if not 0 <= begin_step <= end_step:
        raise ValueError(f"need 0 <= begin_step <= end_step, got {begin_step} and {end_step}")
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}")
    span = end_step - begin_step

    def schedule(step):
        # begin_step == end_step: one pruning step straight to the final sparsity
        progress = jnp.clip((step - begin_step) / span, 0.0, 1.0) if span else 1.0
        value = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power
        return jnp.where(step < begin_step, 0.0, value).astype(jnp.float32)

    def pruning_steps(step):
        in_window = (step >= begin_step) & (step <= end_step)
        return in_window & ((step - begin_step) % frequency == 0)

    schedule.pruning_steps = pruning_steps
    return schedule


def magnitude_prune(
    inner: optax.GradientTransformation,
    sparsity_schedule: SparsitySchedule,
    *,
    mask_fn: MaskFn = default_decay_mask,
) -> optax.GradientTransformation:
    """Wraps `inner` so that the parameters chosen by `mask_fn` are pruned by magnitude.

    At update number t (0-based) where `sparsity_schedule.pruning_steps(t)` is True (every
    step, if the schedule has no such attribute), each chosen tensor gets a new mask that
    zeroes its `round(sparsity_schedule(t) * size)` smallest-magnitude entries of the
    weights this update would produce (ties: lower flat index first). Pruned entries never
    come back: they are 0 and so are pruned again first. Every update then sets pruned
    weights to exactly 0.0 (`update = -param` there), whatever `inner` proposes.

    Args:
      inner: the optimizer doing the actual updates (its state is kept unchanged in shape).
      sparsity_schedule: `step -> sparsity` (e.g. `polynomial_sparsity(...)`).
      mask_fn: `params -> pytree of Python bools`, True for tensors to prune. Default:
        every leaf with ndim >= 2 (kernels, embeddings), not biases or norm scales.

    Returns:
      An `optax.GradientTransformation` whose state is a `PruneState`. Its `update`
      needs `params`.
    """
    pruning_steps = getattr(sparsity_schedule, "pruning_steps", lambda step: True)

    def init_fn(params):
        chosen = mask_fn(params)
        masks = jax.tree.map(
            lambda p, prune: jnp.ones(jnp.shape(p) if prune else (), jnp.bool_), params, chosen
        )
        return PruneState(jnp.zeros((), jnp.int32), masks, inner.init(params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("magnitude_prune needs params: call tx.update(grads, state, params)")
        updates, inner_state = inner.update(updates, state.inner_state, params)

        def recompute_masks():
            sparsity = sparsity_schedule(state.count)
            return jax.tree.map(
                lambda mask, p, u: (
                    _prune_smallest(jnp.where(mask, p + u, 0), sparsity) if jnp.ndim(mask) else mask
                ),
                state.masks,
                params,
                updates,
            )

        masks = jax.lax.cond(pruning_steps(state.count), recompute_masks, lambda: state.masks)
        # p + (-p) is exactly 0.0 in IEEE arithmetic: pruned weights stay exactly zero.
        updates = jax.tree.map(lambda u, p, mask: jnp.where(mask, u, -p), updates, params, masks)
        return updates, PruneState(state.count + 1, masks, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def _prune_smallest(weights: jax.Array, sparsity: jax.Array) -> jax.Array:
    """Bool mask of `weights`' shape with the `round(sparsity * size)` smallest |w| False."""
    flat = jnp.abs(weights).ravel()
    num_pruned = jnp.round(sparsity * flat.size).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    rank = jnp.zeros(flat.size, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (rank >= num_pruned).reshape(weights.shape)


def sparsity_report(params: optax.Params, *, mask_fn: MaskFn = default_decay_mask) -> dict:
    """Measured fraction of exact zeros per chosen tensor and over all of them ("total").

    Args:
      params: a pytree of arrays (e.g. `state.params`).
      mask_fn: which tensors count (the same choice as given to `magnitude_prune`).

    Returns:
      {"total": float, "<path>": float, ...}, paths joined with "/".
    """
    chosen = jax.tree.leaves(mask_fn(params))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    report, zeros, size = {}, 0, 0
    for (path, leaf), prune in zip(leaves, chosen, strict=True):
        if not prune:
            continue
        array = np.asarray(leaf)
        n_zero = int(np.sum(array == 0))
        report[path_name(path)] = n_zero / array.size
        zeros, size = zeros + n_zero, size + array.size
    return {"total": zeros / max(size, 1), **report}
