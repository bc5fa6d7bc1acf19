"""Pure train and eval steps: `(state, batch) -> (state, metrics)`.

A *loss function* is the one piece of task code a user writes:

    loss_fn(model: nnx.Module, batch: dict) -> dict[str, jax.Array]

It runs the model on the batch and returns per-example values, shape (B,),
under stable names. The entry "loss" is what training minimises (its mean);
every other entry is a metric (e.g. "accuracy"). A 0-d value is allowed for
terms that have no per-example form (e.g. a regulariser).

The model arrives in train mode inside the train step (dropout on, batch norm
updating its statistics) and in eval mode inside the eval step; its RNG streams
are reseeded from `fold_in(state.rng, state.step)` so randomness depends only
on the seed and the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdl import losses as losses_lib
from jdl import metrics as metrics_lib
from jdl.state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], Metrics]
AugmentFn = Callable[[jax.Array, Batch], Batch]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
EvalStep = Callable[[TrainState, Batch], Metrics]


def classification_loss(*, label_smoothing: float = 0.0) -> LossFn:
    """The standard classifier loss: softmax cross-entropy plus accuracy.

    Reads batch["x"] (model input) and batch["y"] (int32 labels, shape (B,)).
    The model must return logits of shape (B, num_classes).
    """

    def loss_fn(model: nnx.Module, batch: Batch) -> Metrics:
        logits = model(batch["x"])  # (B, C)
        return {
            "loss": losses_lib.softmax_xent(
                logits=logits, labels=batch["y"], label_smoothing=label_smoothing
            ),
            "accuracy": metrics_lib.accuracy(logits=logits, labels=batch["y"]),
        }

    return loss_fn


def make_train_step(
    loss_fn: LossFn,
    *,
    lr_schedule: optax.Schedule | None = None,
    augment_fn: AugmentFn | None = None,
    skip_nonfinite: bool = False,
    norm_metrics: bool = True,
) -> TrainStep:
    """Builds the pure training step.

    Args:
      loss_fn: see the module docstring.
      lr_schedule: logged as metric "lr" (the value used at this step).
      augment_fn: `(key, batch) -> batch`, applied on device before the forward pass.
      skip_nonfinite: when the loss or gradient norm is not finite, leave params,
        optimizer state and model state unchanged and count the step in metric
        "skipped_steps" instead of applying it.
      norm_metrics: report "grad_norm" and "param_norm". They cost two more passes over
        all parameters per step (together ~17% of a small MLP's step on CPU); turn off
        for the last bit of speed. Non-finite gradients are then caught through the loss.

    Returns:
      `train_step(state, batch) -> (state, metrics)`, pure; metrics are scalars:
      the batch means of `loss_fn`'s entries plus "grad_norm" and "param_norm" (if
      `norm_metrics`), "lr" (if a schedule is given) and "skipped_steps" (if
      `skip_nonfinite`).
      Not jitted here: the caller jits (or scans) it once, with donation.
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        if augment_fn is not None:
            batch = augment_fn(state.step_key("augment"), batch)

        def compute_loss(params):
            model = state.model(params)
            model.train()
            reseed_all_streams(model, state.step_key("model"))
            per_example = loss_fn(model, batch)
            _check_loss_output(per_example)
            means = {name: jnp.mean(value) for name, value in per_example.items()}
            _, _, model_state = nnx.split(model, nnx.Param, ...)
            return means["loss"], (means, model_state)

        grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
        (_, (metrics, model_state)), grads = grad_fn(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if norm_metrics:
            metrics["grad_norm"] = optax.global_norm(grads)
            metrics["param_norm"] = optax.global_norm(params)
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        new = (params, opt_state, model_state)
        if skip_nonfinite:
            grad_norm = metrics.get("grad_norm", optax.global_norm(grads))
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            old = (state.params, state.opt_state, state.model_state)
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            metrics["skipped_steps"] = 1.0 - finite.astype(jnp.float32)
        params, opt_state, model_state = new
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
        )
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: LossFn) -> Callable[[TrainState, Batch], Metrics]:
    """Builds the pure eval step: `(state, batch) -> per-example metrics` in eval mode.

    Returns per-example values (shape (B,)) so that the caller can mask padding
    and average exactly over a whole eval set; see `jdl.loop.evaluate`.
    """

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        model = state.model()
        model.eval()
        per_example = loss_fn(model, batch)
        _check_loss_output(per_example)
        return dict(per_example)

    return eval_step


def reseed_all_streams(model: nnx.Module, key: jax.Array) -> None:
    """Gives every RNG stream of `model` (dropout, ...) a key derived from `key` and its name."""
    tags = sorted(
        {node.key.tag for _, node in nnx.graph.iter_graph(model) if isinstance(node, nnx.RngStream)}
    )
    if tags:
        nnx.reseed(model, **{tag: jax.random.fold_in(key, i) for i, tag in enumerate(tags)})


def _check_loss_output(per_example: Mapping[str, jax.Array]) -> None:
    if "loss" not in per_example:
        raise ValueError(
            f"the loss function must return a dict with a 'loss' entry; got {sorted(per_example)}"
        )
    for name, value in per_example.items():
        if jnp.ndim(value) > 1:
            raise ValueError(
                f"loss function entry {name!r} has shape {jnp.shape(value)}; "
                "entries must be per-example (B,) or scalars ()"
            )
