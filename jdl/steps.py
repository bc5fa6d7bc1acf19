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

import numbers
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdl import losses as losses_lib
from jdl import metrics as metrics_lib
from jdl import precision as precision_lib
from jdl.errors import UserError
from jdl.state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], Metrics]
AugmentFn = Callable[[jax.Array, Batch], Batch]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
EvalStep = Callable[[TrainState, Batch], Metrics]


class LossOutputError(UserError, TypeError, ValueError):
    """A loss function returned something other than a dict of per-example values.

    A TypeError for a wrong type (a scalar, a tuple) and a ValueError for a dict
    without "loss" or with an entry of the wrong shape, so either `except` catches it.
    """


def classification_loss(*, label_smoothing: float = 0.0) -> LossFn:
    """The standard classifier loss: softmax cross-entropy plus accuracy.

    Reads batch["x"] (model input) and batch["y"] (int32 labels, shape (B,)).
    The model must return logits of shape (B, num_classes). When the batch also holds
    "targets" (float (B, num_classes) distributions, e.g. from `jdl.data.mixup`), the
    loss is the soft cross-entropy against them (label smoothing is then not applied)
    and accuracy is still measured against "y".
    """

    def loss_fn(model: nnx.Module, batch: Batch) -> Metrics:
        logits = model(batch["x"])  # (B, C)
        if "targets" in batch:
            loss = losses_lib.soft_xent(logits=logits, targets=batch["targets"])
        else:
            loss = losses_lib.softmax_xent(
                logits=logits, labels=batch["y"], label_smoothing=label_smoothing
            )
        return {"loss": loss, "accuracy": metrics_lib.accuracy(logits=logits, labels=batch["y"])}

    return loss_fn


def batch_gradients(
    loss_fn: LossFn,
    state: TrainState,
    batch: Batch,
    key: jax.Array,
    *,
    model_state: nnx.State | None = None,
    precision: str | precision_lib.Precision = "fp32",
) -> tuple[Metrics, nnx.State, nnx.State]:
    """Loss, metrics and gradients of one (micro-)batch; pure and traceable.

    Merges the model from `state.params` and `model_state` (default `state.model_state`),
    puts it in train mode, reseeds every RNG stream from `key` (see
    `reseed_all_streams`) and differentiates the mean of `loss_fn`'s "loss" entry.
    Under a mixed `precision` the parameters and floating batch entries are cast to
    the compute dtype inside the differentiated function, so the gradients come back
    in the parameters' dtype.

    Returns:
      (metrics: the float32 batch mean of each of `loss_fn`'s entries, the model state
      after the forward pass in the dtypes of the one given, gradients shaped and typed
      like `state.params`).

    Raises:
      LossOutputError: `loss_fn` does not return a dict of per-example values with "loss".
    """
    policy = precision_lib.get_policy(precision)
    model_state = state.model_state if model_state is None else model_state

    def compute_loss(params):
        # The casts are inside the differentiated function: gradients come back fp32.
        model = state.replace(model_state=model_state).model(policy.cast_to_compute(params))
        policy.adapt(model)
        model.train()
        reseed_all_streams(model, key)
        per_example = loss_fn(model, policy.cast_to_compute(batch))
        _check_loss_output(per_example)
        means = {
            name: jnp.mean(jnp.asarray(value, jnp.float32)) for name, value in per_example.items()
        }
        _, _, new_model_state = nnx.split(model, nnx.Param, ...)
        return means["loss"], (means, precision_lib.cast_like(new_model_state, model_state))

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    (_, (metrics, new_model_state)), grads = grad_fn(state.params)
    return metrics, new_model_state, grads


def accumulated_gradients(
    loss_fn: LossFn,
    state: TrainState,
    batch: Batch,
    *,
    micro_batches: int = 1,
    precision: str | precision_lib.Precision = "fp32",
) -> tuple[Metrics, nnx.State, nnx.State]:
    """`batch_gradients` of a whole batch, run as `micro_batches` micro-batches.

    The RNG key is `state.step_key("model")`; micro-batch i uses `fold_in(key, i)`. With
    M = `micro_batches` > 1 the leaves of `batch` (B, ...) are split into M micro-batches
    of B / M examples that run one after another in a `jax.lax.scan`, threading the
    model state through them; the metrics and gradients are the means over the
    micro-batches. With M = 1 it is `batch_gradients` of the whole batch.

    Returns:
      (metrics, new model state, gradients) as `batch_gradients`.

    Raises:
      ValueError: the batch size is not a multiple of `micro_batches`.
    """
    key = state.step_key("model")
    if micro_batches == 1:
        return batch_gradients(loss_fn, state, batch, key, precision=precision)
    micro = _split_batch(batch, micro_batches)  # leaves (M, B / M, ...)

    def one_micro_batch(carry, inputs):
        metric_sums, grad_sums, model_state = carry
        index, micro_batch = inputs
        metrics, model_state, grads = batch_gradients(
            loss_fn,
            state,
            micro_batch,
            jax.random.fold_in(key, index),
            model_state=model_state,
            precision=precision,
        )
        metric_sums = jax.tree.map(jnp.add, metric_sums, metrics)
        grad_sums = jax.tree.map(jnp.add, grad_sums, grads)
        return (metric_sums, grad_sums, model_state), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(
        lambda b: batch_gradients(loss_fn, state, b, key, precision=precision), first
    )
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0], shapes[2]))
    (metric_sums, grad_sums, model_state), _ = jax.lax.scan(
        one_micro_batch,
        (*zeros, state.model_state),
        (jnp.arange(micro_batches), micro),
    )
    metrics, grads = jax.tree.map(lambda total: total / micro_batches, (metric_sums, grad_sums))
    return metrics, model_state, grads


def keep_if_finite(
    old: TrainState, new: TrainState, loss: jax.Array, grad_norm: jax.Array
) -> tuple[TrainState, jax.Array]:
    """`new`, or `old`'s weights when `loss` or `grad_norm` is not finite.

    On a non-finite step the params, optimizer state, model state and EMA are `old`'s;
    the step counter is `new`'s either way, so the next step draws fresh randomness.

    Returns:
      (the state, float32 1.0 if the update was skipped else 0.0).
    """
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    fields = ("params", "opt_state", "model_state") + (("ema",) if new.ema is not None else ())
    picked = jax.tree.map(
        lambda n, o: jnp.where(finite, n, o),
        tuple(getattr(new, name) for name in fields),
        tuple(getattr(old, name) for name in fields),
    )
    return new.replace(**dict(zip(fields, picked, strict=True))), 1.0 - finite.astype(jnp.float32)


def make_train_step(
    loss_fn: LossFn,
    *,
    lr_schedule: optax.Schedule | None = None,
    augment_fn: AugmentFn | None = None,
    skip_nonfinite: bool = False,
    norm_metrics: bool = True,
    precision: str | precision_lib.Precision = "fp32",
    micro_batches: int = 1,
) -> TrainStep:
    """Builds the pure training step.

    One step is: augment the batch (`augment_fn`), compute metrics, model state and
    gradients (`accumulated_gradients`, i.e. `batch_gradients` per micro-batch), apply
    them (`TrainState.apply_gradients`: optimizer update, step + 1, and the EMA of the
    parameters when the state keeps one), add the norm and lr metrics, and with
    `skip_nonfinite` undo a non-finite update (`keep_if_finite`).

    Args:
      loss_fn: see the module docstring.
      lr_schedule: logged as metric "lr" (the value used at this step).
      augment_fn: `(key, batch) -> batch`, applied on device before the forward pass.
      skip_nonfinite: when the loss or gradient norm is not finite, leave params,
        optimizer state, model state and EMA unchanged and count the step in metric
        "skipped_steps" instead of applying it.
      norm_metrics: report "grad_norm" and "param_norm". They cost two more passes over
        all parameters per step (together ~17% of a small MLP's step on CPU); turn off
        for the last bit of speed. Non-finite gradients are then caught through the loss.
      precision: "fp32", "bf16" or "auto" (see `jdl.precision`). With "bf16" the forward
        and backward passes run on bfloat16 copies of the parameters and floating batch
        entries, made inside the differentiated function, so the gradients, the
        parameters and the optimizer state stay float32; metrics are float32.
      micro_batches: M > 1 splits each batch into M equal micro-batches (the batch size
        must be a multiple of M) and runs them one after another in a `lax.scan`,
        averaging their gradients and metrics: the same update as the full batch (up to
        float rounding) with the activation memory of one micro-batch. Caveats: batch
        norm normalises each micro-batch with its own statistics and updates its running
        averages M times per step; dropout draws independent masks per micro-batch. On
        XLA:CPU a convolution inside the scan runs much slower than at the top level (see
        `jdl.loop.make_chunk_runner`). This accumulates within one step; to accumulate
        over several steps (one optimizer update every k batches) wrap the optimizer in
        `optax.MultiSteps` via `jdl.make_optimizer(..., accumulate_steps=k)` instead.

    Returns:
      `train_step(state, batch) -> (state, metrics)`, pure; metrics are scalars:
      the batch means of `loss_fn`'s entries plus "grad_norm" and "param_norm" (if
      `norm_metrics`), "lr" (if a schedule is given) and "skipped_steps" (if
      `skip_nonfinite`). A state created with `ema_decay` gets its EMA updated too.
      Not jitted here: the caller jits (or scans) it once, with donation.
      The function has attribute ``lr_schedule`` (`lr_schedule`, or None), so a
      caller can compare the run's length with the schedule's ``total_steps``.

    Raises:
      LossOutputError: when traced, if `loss_fn` returns anything but a dict with a
        "loss" entry of per-example (B,) or scalar values.
    """

    policy = precision_lib.get_policy(precision)
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        if augment_fn is not None:
            batch = augment_fn(state.step_key("augment"), batch)
        metrics, model_state, grads = accumulated_gradients(
            loss_fn, state, batch, micro_batches=micro_batches, precision=policy
        )
        new_state = state.apply_gradients(grads, model_state=model_state)
        if norm_metrics:
            metrics["grad_norm"] = optax.global_norm(grads)
            metrics["param_norm"] = optax.global_norm(new_state.params)
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        if skip_nonfinite:
            grad_norm = metrics.get("grad_norm", optax.global_norm(grads))
            new_state, metrics["skipped_steps"] = keep_if_finite(
                state, new_state, metrics["loss"], grad_norm
            )
        return new_state, metrics

    train_step.lr_schedule = lr_schedule
    return train_step


def make_eval_step(
    loss_fn: LossFn,
    *,
    precision: str | precision_lib.Precision = "fp32",
    use_ema: bool = False,
) -> Callable[[TrainState, Batch], Metrics]:
    """Builds the pure eval step: `(state, batch) -> per-example metrics` in eval mode.

    Returns per-example values (shape (B,)) so that the caller can mask padding
    and average exactly over a whole eval set; see `jdl.loop.evaluate`. With
    `precision="bf16"` the model runs on bfloat16 parameters and inputs (as in
    `make_train_step`); the returned values are float32. With `use_ema=True` the model
    runs on the state's EMA of the parameters (`TrainState.create(..., ema_decay=...)`)
    and the state's own other variables (batch-norm statistics).

    Raises:
      jdl.state.EmaError: when traced, if `use_ema` and the state keeps no EMA.
    """
    policy = precision_lib.get_policy(precision)

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        params = state.ema_params() if use_ema else state.params
        model = policy.adapt(state.model(policy.cast_to_compute(params)))
        model.eval()
        per_example = loss_fn(model, policy.cast_to_compute(batch))
        _check_loss_output(per_example)
        if policy.is_mixed:
            per_example = {name: jnp.asarray(v, jnp.float32) for name, v in per_example.items()}
        return dict(per_example)

    return eval_step


def reseed_all_streams(model: nnx.Module, key: jax.Array) -> None:
    """Gives every RNG stream of `model` (dropout, ...) a key derived from `key` and its name."""
    tags = sorted(
        {node.key.tag for _, node in nnx.graph.iter_graph(model) if isinstance(node, nnx.RngStream)}
    )
    if tags:
        nnx.reseed(model, **{tag: jax.random.fold_in(key, i) for i, tag in enumerate(tags)})


def _split_batch(batch: Batch, parts: int) -> Batch:
    """Reshapes every leaf (B, ...) to (parts, B / parts, ...)."""

    def split(x):
        if x.shape[0] % parts:
            raise ValueError(
                f"batch size {x.shape[0]} is not a multiple of micro_batches={parts}; "
                "pick a batch size divisible by it"
            )
        return x.reshape(parts, x.shape[0] // parts, *x.shape[1:])

    return jax.tree.map(split, batch)


def _check_loss_output(per_example: object) -> None:
    """Raises LossOutputError unless `per_example` is a dict of (B,) or () values with "loss"."""
    expected = (
        'a loss function returns a dict with a "loss" entry of per-example values, shape (B,) '
        "(or scalars ()), plus any metrics, e.g. {'loss': xent, 'accuracy': correct}"
    )
    if not isinstance(per_example, Mapping):
        raise LossOutputError(f"{expected}; got {_describe(per_example)}")
    if "loss" not in per_example:
        raise LossOutputError(f"{expected}; got a dict with entries {sorted(per_example)}")
    for name, value in per_example.items():
        is_array = hasattr(value, "shape") and hasattr(value, "dtype")
        if not (is_array or isinstance(value, numbers.Number)):
            raise LossOutputError(f"{expected}; entry {name!r} is {_describe(value)}")
        if jnp.ndim(value) > 1:
            raise LossOutputError(
                f"loss function entry {name!r} has shape {jnp.shape(value)}; "
                "entries must be per-example (B,) or scalars (): average the other axes"
            )


def _describe(value: object) -> str:
    """The type, and shape and dtype where there are some, of a loss function's output."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        # Not the type name: inside the traced step that is a tracer class.
        return f"an array of shape {tuple(shape)} and dtype {dtype}"
    return f"a {type(value).__name__}"
