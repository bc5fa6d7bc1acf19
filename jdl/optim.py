"""Optimizers and learning-rate schedules for jdl, composed from optax.

Two factories cover what a training config names:

- `make_schedule` turns a schedule name plus numbers into an `optax.Schedule`.
- `make_optimizer` turns an optimizer name plus hyperparameters into an
  `optax.GradientTransformation` and returns it together with its schedule, so a
  training loop can log ``lr = schedule(step)`` without storing the learning rate
  in the optimizer state.

Every optimizer is an `optax.chain` of small transforms, in this order::

    clip_by_global_norm(clip_norm)        # only when clip_norm is set
    <direction>                           # e.g. trace, scale_by_adam, scale_by_rms
    add_decayed_weights(wd, decay_mask)   # only when weight_decay > 0
    scale_by_learning_rate(schedule)

so one update is ``-lr * (direction + weight_decay * param)``: weight decay is
decoupled from the gradient statistics for every optimizer, as in AdamW ("lamb"
adds optax's layer-wise trust ratio before the learning rate).

Hyperparameters keep the names and meaning of ``torch.optim`` where the math
allows, and the directions reproduce ``torch.optim`` exactly (same eps placement,
same initial accumulators). Where jdl and ``torch.optim`` differ, the difference
is in `make_optimizer`'s docstring.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jdl.errors import UserError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimizerConfigError",
    "ScaleByAdagradState",
    "default_decay_mask",
    "make_optimizer",
    "make_schedule",
    "scale_by_adagrad",
]

SCHEDULES = ("constant", "step", "cosine", "warmup_cosine", "one_cycle", "linear")
# The schedules whose shape is defined by their end: without a horizon they cannot be built.
_NEEDS_HORIZON = ("cosine", "warmup_cosine", "one_cycle", "linear")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "lamb")

# optax.cosine_onecycle_schedule defaults, kept so "one_cycle" matches it exactly.
_ONE_CYCLE_PCT_START = 0.3
_ONE_CYCLE_DIV_FACTOR = 25.0
_ONE_CYCLE_FINAL_DIV_FACTOR = 1e4

DecayMask = Callable[[optax.Params], Any] | Any | None


class OptimizerConfigError(UserError, ValueError):
    """An optimizer or schedule name or value that cannot make a sensible optimizer."""


# ----------------------------------------------------------------------------- schedules


def make_schedule(
    name: str,
    *,
    learning_rate: float,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    decay_factor: float = 0.1,
    step_boundaries: Sequence[float] = (),
    end_factor: float = 0.0,
) -> optax.Schedule:
    """Builds a learning-rate schedule mapping the update count (from 0) to a rate.

    Every schedule starts with a linear warmup from 0 to `learning_rate` over
    `warmup_steps` updates when `warmup_steps > 0` (step ``k < warmup_steps`` gets
    ``learning_rate * k / warmup_steps``); the named shape follows:

    - "constant": `learning_rate`.
    - "step": `learning_rate` times `decay_factor` once per boundary reached, as
      ``torch.optim.lr_scheduler.MultiStepLR``: at step ``s`` the rate is
      ``learning_rate * decay_factor ** (number of boundaries <= s)``. Boundaries
      are absolute steps: a float in (0, 1) is a fraction of `total_steps`
      (rounded to the nearest step), an int >= 1 is a step.
    - "cosine": cosine decay from `learning_rate` to ``learning_rate * end_factor``,
      reached at `total_steps` and held after (``CosineAnnealingLR`` shape).
    - "warmup_cosine": the same as "cosine"; the name reads better in configs that
      set `warmup_steps`.
    - "one_cycle": ``optax.cosine_onecycle_schedule(total_steps, learning_rate)``:
      cosine rise from ``learning_rate / 25`` to `learning_rate` at step
      ``int(0.3 * total_steps)``, then cosine fall to ``learning_rate / 25 / 1e4``
      at `total_steps`. A positive `warmup_steps` moves the peak to that step
      (the rise is cosine, not linear). `end_factor` and `decay_factor` are unused.
    - "linear": linear decay from `learning_rate` to ``learning_rate * end_factor``
      at `total_steps`, held after.

    The decaying shapes ("cosine", "warmup_cosine", "one_cycle", "linear", and
    "step" with fractional boundaries) are defined by their end, so they need
    `total_steps`: without it they raise instead of guessing a horizon (a horizon
    of one step would train at rate 0 from the second step on).

    Args:
      name: one of `SCHEDULES`.
      learning_rate: peak rate, finite; > 0, or 0 for "constant" (a frozen run).
      total_steps: number of optimizer updates the schedule spans, > 0: the run's
        number of updates. Required by the decaying shapes; optional for
        "constant" and for "step" with integer boundaries.
      warmup_steps: length of the warmup, in [0, total_steps].
      decay_factor: "step" multiplier per boundary, >= 0.
      step_boundaries: "step" boundaries, strictly increasing, each after the
        warmup and at most `total_steps`.
      end_factor: final rate as a fraction of `learning_rate` ("cosine",
        "warmup_cosine", "linear"), >= 0.

    Returns:
      A jit-safe function from step count (int or traced int) to learning rate,
      with attribute ``total_steps``: the horizon the schedule was built for (an
      int), or None where it has none ("constant", and "step" built without
      `total_steps`). A run longer than the horizon trains at the final rate.

    Raises:
      OptimizerConfigError: (a ValueError) an unknown `name` (the message lists
        the valid names), a decaying shape without `total_steps`, or an invalid
        value (the message names the argument).

    Example:
      >>> schedule = make_schedule("linear", learning_rate=0.1, total_steps=100)
      >>> schedule.total_steps, round(float(schedule(50)), 3)
      (100, 0.05)
      >>> make_schedule("constant", learning_rate=0.1).total_steps is None
      True
    """
    _check_choice("schedule", name, SCHEDULES)
    _check_horizon(name, total_steps, step_boundaries)
    _check_learning_rate(name, learning_rate, step_boundaries)
    _check_schedule_values(total_steps, warmup_steps, decay_factor, end_factor)
    if name == "one_cycle":
        return _with_horizon(_one_cycle(learning_rate, total_steps, warmup_steps), total_steps)
    if name == "step":
        boundaries = _resolve_boundaries(step_boundaries, total_steps, warmup_steps)
        body = _step_body(learning_rate, boundaries, decay_factor, warmup_steps)
    elif name == "constant":
        body = optax.constant_schedule(learning_rate)
    else:
        shape = "linear" if name == "linear" else "cosine"
        body = _decay_body(shape, learning_rate, end_factor, total_steps - warmup_steps)
    horizon = None if name == "constant" else total_steps
    return _with_horizon(_with_warmup(body, learning_rate, warmup_steps), horizon)


def _with_horizon(schedule: optax.Schedule, total_steps: int | None) -> optax.Schedule:
    """A new function equal to `schedule`, carrying its horizon as ``total_steps``."""

    # A fresh function: setting the attribute on `schedule` itself could change a
    # function the caller (or optax) shares.
    def schedule_with_horizon(count):
        return schedule(count)

    schedule_with_horizon.total_steps = None if total_steps is None else int(total_steps)
    return schedule_with_horizon


def _has_fractional_boundary(step_boundaries: Sequence[float]) -> bool:
    return any(
        isinstance(b, numbers.Real) and not isinstance(b, numbers.Integral) and 0 < b < 1
        for b in step_boundaries
    )


def _check_horizon(name: str, total_steps: int | None, step_boundaries: Sequence[float]) -> None:
    """Raises when a schedule defined by its end is built without `total_steps`."""
    if total_steps is not None:
        return
    if name in _NEEDS_HORIZON:
        raise OptimizerConfigError(
            f"schedule {name!r} decays over the run and needs its length: pass "
            "total_steps=<number of optimizer updates> (e.g. the num_steps given to fit)"
        )
    if name == "step" and _has_fractional_boundary(step_boundaries):
        raise OptimizerConfigError(
            f"step_boundaries {tuple(step_boundaries)} hold fractions of the run: pass "
            "total_steps=<number of optimizer updates>, or give the boundaries as steps"
        )


def _check_learning_rate(name: str, learning_rate: float, step_boundaries: Sequence[float]) -> None:
    """Raises for a rate that is not a finite number, negative, or 0 where it would decay."""
    try:
        value = float(learning_rate)
    except (TypeError, ValueError):
        raise OptimizerConfigError(
            f"learning_rate must be a number or an optax schedule, got {learning_rate!r}"
        ) from None
    if not math.isfinite(value):
        raise OptimizerConfigError(f"learning_rate must be finite, got {learning_rate}")
    if value < 0:
        raise OptimizerConfigError(f"learning_rate must be >= 0, got {learning_rate}")
    decays = name != "constant" and not (name == "step" and not step_boundaries)
    if decays and value == 0:
        raise OptimizerConfigError(
            f"learning_rate is 0, so schedule {name!r} has nothing to decay; pass a rate > 0 "
            "(or schedule='constant' for a run that keeps the parameters fixed)"
        )


def _check_schedule_values(
    total_steps: int | None,
    warmup_steps: int,
    decay_factor: float,
    end_factor: float,
) -> None:
    """Raises OptimizerConfigError naming the first out-of-range schedule argument."""
    if total_steps is not None and (
        not isinstance(total_steps, numbers.Integral) or total_steps <= 0
    ):
        raise OptimizerConfigError(f"total_steps must be an int > 0, got {total_steps!r}")
    if warmup_steps < 0:
        raise OptimizerConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps is not None and warmup_steps > total_steps:
        raise OptimizerConfigError(
            f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})"
        )
    if decay_factor < 0:
        raise OptimizerConfigError(f"decay_factor must be >= 0, got {decay_factor}")
    if end_factor < 0:
        raise OptimizerConfigError(f"end_factor must be >= 0, got {end_factor}")


def _with_warmup(body: optax.Schedule, learning_rate: float, warmup_steps: int) -> optax.Schedule:
    """Prepends a linear 0 -> learning_rate ramp; `body` then sees steps since the warmup."""
    if warmup_steps == 0:
        return body
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, body], [warmup_steps])


def _decay_body(shape: str, learning_rate: float, end_factor: float, steps: int) -> optax.Schedule:
    """Cosine or linear decay from learning_rate to learning_rate * end_factor over `steps`."""
    end_value = learning_rate * end_factor
    if steps == 0:
        # The warmup used the whole budget; only the end value is left.
        return optax.constant_schedule(end_value)
    if shape == "linear":
        return optax.linear_schedule(learning_rate, end_value, steps)
    return optax.cosine_decay_schedule(learning_rate, steps, alpha=end_factor)


def _step_body(
    learning_rate: float, boundaries: list[int], decay_factor: float, warmup_steps: int
) -> optax.Schedule:
    """Piecewise-constant decay at absolute `boundaries`, for use after the warmup."""
    # The warmup hands its body steps counted from its end; shift the boundaries so
    # that they stay absolute, as written in the config.
    return optax.piecewise_constant_schedule(
        learning_rate, {b - warmup_steps: decay_factor for b in boundaries}
    )


def _resolve_boundaries(
    step_boundaries: Sequence[float], total_steps: int | None, warmup_steps: int
) -> list[int]:
    """Converts fractions of total_steps and step counts to absolute steps, validated."""
    steps = [_boundary_to_step(b, total_steps) for b in step_boundaries]
    if any(later <= earlier for earlier, later in zip(steps, steps[1:], strict=False)):
        raise OptimizerConfigError(
            f"step_boundaries must be strictly increasing steps, got {steps}"
        )
    if steps and steps[0] <= warmup_steps:
        raise OptimizerConfigError(
            f"step_boundaries must come after the warmup ({warmup_steps} steps), got {steps}"
        )
    if steps and total_steps is not None and steps[-1] > total_steps:
        raise OptimizerConfigError(
            f"step_boundaries must be at most total_steps ({total_steps}), got {steps}"
        )
    return steps


def _boundary_to_step(boundary: float, total_steps: int | None) -> int:
    """A float in (0, 1) is a fraction of total_steps; an int >= 1 is a step."""
    if isinstance(boundary, numbers.Integral) and not isinstance(boundary, bool):
        if boundary >= 1:
            return int(boundary)
    elif isinstance(boundary, numbers.Real) and 0 < boundary < 1:
        # round, not int: 0.29 * 100 is 28.999... in floating point.
        return round(boundary * total_steps)
    raise OptimizerConfigError(
        f"step_boundaries entries must be a float in (0, 1) (fraction of total_steps) "
        f"or an int >= 1 (step), got {boundary!r}"
    )


def _one_cycle(learning_rate: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """optax.cosine_onecycle_schedule, with the peak at `warmup_steps` when that is set."""
    if warmup_steps >= total_steps:
        raise OptimizerConfigError(
            f"one_cycle needs warmup_steps ({warmup_steps}) < total_steps ({total_steps})"
        )
    peak_step = warmup_steps or int(_ONE_CYCLE_PCT_START * total_steps)
    # Same construction as optax.cosine_onecycle_schedule, but with an integer peak
    # step: warmup_steps / total_steps * total_steps can round below warmup_steps.
    div = _ONE_CYCLE_DIV_FACTOR
    return optax.piecewise_interpolate_schedule(
        "cosine",
        learning_rate / div,
        {peak_step: div, total_steps: 1.0 / (div * _ONE_CYCLE_FINAL_DIV_FACTOR)},
    )


# ----------------------------------------------------------------------------- weight decay


def default_decay_mask(params: optax.Params) -> Any:
    """Marks which parameters weight decay applies to.

    Kernels and embeddings (ndim >= 2) are decayed; biases and normalisation
    scales/offsets (ndim < 2) are not: decay regularises weight matrices, while on
    offsets and gains it only pulls them towards zero, which tends to hurt.

    Args:
      params: any pytree of arrays, e.g. a dict or a Flax NNX ``nnx.State`` of params.

    Returns:
      A pytree of the same structure with a Python bool at each leaf.
    """
    return jax.tree.map(lambda leaf: jnp.ndim(leaf) >= 2, params)


class ScaleByAdagradState(NamedTuple):
    """State of `scale_by_adagrad`: the running sum of squared gradients."""

    sum_of_squares: optax.Updates


def scale_by_adagrad(
    initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> optax.GradientTransformation:
    """Adagrad scaling as in ``torch.optim.Adagrad``: ``g / (sqrt(sum g^2) + eps)``.

    ``optax.scale_by_rss`` puts eps inside the square root and starts the sum at
    0.1; this transform follows torch instead (eps outside, sum from
    `initial_accumulator_value`), so jdl's Adagrad reproduces torch's updates.

    Args:
      initial_accumulator_value: starting value of the sum of squares, >= 0.
      eps: added to the root of the sum, >= 0.

    Returns:
      An `optax.GradientTransformation` whose state is a `ScaleByAdagradState`.
    """

    def init_fn(params: optax.Params) -> ScaleByAdagradState:
        return ScaleByAdagradState(optax.tree.full_like(params, initial_accumulator_value))

    def update_fn(
        updates: optax.Updates, state: ScaleByAdagradState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdagradState]:
        del params
        sums = jax.tree.map(lambda g, s: s + jnp.square(g), updates, state.sum_of_squares)
        scaled = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, sums)
        return scaled, ScaleByAdagradState(sums)

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- optimizers


def make_optimizer(
    name: str,
    *,
    learning_rate: float | optax.Schedule,
    total_steps: int | None = None,
    schedule: str = "constant",
    warmup_steps: int = 0,
    momentum: float = 0.9,
    nesterov: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    alpha: float = 0.99,
    weight_decay: float = 0.0,
    decay_mask: DecayMask = default_decay_mask,
    clip_norm: float | None = None,
    accumulate_steps: int = 1,
    **schedule_kwargs: Any,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds a named optimizer and its learning-rate schedule.

    Optimizers (``torch.optim`` counterpart in brackets):

    - "sgd": plain gradient descent [``SGD``].
    - "momentum": heavy-ball momentum, Nesterov when `nesterov` is set
      [``SGD(momentum=m, nesterov=...)``, dampening 0].
    - "nesterov": Nesterov momentum [``SGD(momentum=m, nesterov=True)``].
    - "adam" [``Adam``], "adamw" [``AdamW``], with ``betas=(b1, b2)``.
    - "rmsprop" [``RMSprop(alpha=alpha, eps=eps)``], no momentum, not centered.
    - "adagrad" [``Adagrad(eps=eps)``], accumulator starting at 0.
    - "lamb": ``optax.lamb`` (no torch counterpart).

    The update is ``-lr * (direction + weight_decay * param)`` on the leaves that
    `decay_mask` selects, with gradients first clipped to global norm `clip_norm`
    when set. With ``accumulate_steps = k > 1`` the returned transformation is
    ``optax.MultiSteps``: calls 1..k-1 of each group return zero updates and only
    accumulate the gradients; call k applies one update built from their mean
    (clipping applies to that mean). The schedule is indexed by applied updates,
    so `total_steps` counts updates, not gradient calls.

    Differences from ``torch.optim``:

    - Weight decay is decoupled for every optimizer (added after the direction,
      scaled by lr). torch's SGD, Adam, RMSprop and Adagrad instead add
      ``weight_decay * param`` to the gradient before momentum or the moment
      estimates. The two agree for "sgd" and for "adamw"; for the others they
      differ, and "adam" with ``weight_decay > 0`` is the same as "adamw".
    - `decay_mask` (default `default_decay_mask`) leaves biases and norm
      parameters undecayed; torch decays every parameter of a group. Pass
      ``decay_mask=None`` to decay all leaves.
    - Defaults: torch's AdamW uses ``weight_decay=1e-2`` and Adagrad ``eps=1e-10``;
      here `weight_decay` defaults to 0 and `eps` to 1e-8 for every optimizer.
    - Adagrad's ``lr_decay`` is not offered: use a schedule.
    - Clipping scales by exactly ``clip_norm / norm``; ``clip_grad_norm_`` uses
      ``clip_norm / (norm + 1e-6)``.

    The learning rate is not stored in the optimizer state (no
    ``optax.inject_hyperparams``, which would add work to every step); log it
    with ``schedule(step)``.

    Args:
      name: one of `OPTIMIZERS`.
      learning_rate: a finite float, built into a schedule with `make_schedule`,
        or an optax schedule used as is.
      total_steps: updates the schedule spans (see `make_schedule`): the run's
        number of optimizer updates. Required by every schedule but "constant"
        (and "step" with integer boundaries); with a ready schedule it only sets
        the returned schedule's ``total_steps``.
      schedule: schedule name (see `make_schedule`); must stay "constant" when
        `learning_rate` is already a schedule.
      warmup_steps: linear warmup length (see `make_schedule`).
      momentum: momentum factor for "momentum" and "nesterov", >= 0.
      nesterov: use Nesterov momentum with "momentum"; only for those two names.
      b1: first-moment decay for "adam", "adamw", "lamb", in [0, 1).
      b2: second-moment decay for "adam", "adamw", "lamb", in [0, 1).
      eps: denominator term for "adam", "adamw", "rmsprop", "adagrad", "lamb", >= 0.
      alpha: "rmsprop" squared-gradient smoothing (torch's name), in [0, 1).
      weight_decay: decoupled decay coefficient, >= 0; allowed with every optimizer.
      decay_mask: pytree of bools, or function from params to one, selecting the
        leaves to decay; None decays all.
      clip_norm: global gradient norm bound, > 0, or None for no clipping.
      accumulate_steps: gradient calls per update, int >= 1.
      **schedule_kwargs: `decay_factor`, `step_boundaries`, `end_factor` for
        `make_schedule`.

    Returns:
      ``(tx, schedule)``: the gradient transformation and the learning-rate
      schedule it uses. ``schedule.total_steps`` is its horizon (see
      `make_schedule`); for a ready schedule, `total_steps` if given, else the
      schedule's own ``total_steps`` attribute, else None.

    Raises:
      OptimizerConfigError: (a ValueError) unknown `name` or `schedule` (the
        message suggests the closest valid name and lists them all), a decaying
        schedule without `total_steps`, or an invalid value (the message names
        the argument).
      TypeError: an unknown keyword in `schedule_kwargs`.

    Example:
      >>> tx, schedule = make_optimizer(
      ...     "sgd", learning_rate=0.1, schedule="cosine", total_steps=100
      ... )
      >>> tuple(round(float(schedule(step)), 3) for step in (0, 50, 100))
      (0.1, 0.05, 0.0)
    """
    _check_choice("optimizer", name, OPTIMIZERS)
    _check_optimizer_values(name, momentum, nesterov, b1, b2, eps, alpha, weight_decay)
    _check_wrapper_values(clip_norm, accumulate_steps)
    lr_schedule = _resolve_schedule(
        learning_rate, schedule, total_steps, warmup_steps, schedule_kwargs
    )
    if name == "adamw":
        core = optax.adamw(lr_schedule, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
    elif name == "lamb":
        core = optax.lamb(lr_schedule, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
    else:
        direction = _direction(name, momentum, nesterov, b1, b2, eps, alpha)
        decay = _decoupled_decay(weight_decay, decay_mask)
        core = optax.chain(*direction, *decay, optax.scale_by_learning_rate(lr_schedule))
    return _wrap(core, clip_norm, accumulate_steps), lr_schedule


def _direction(
    name: str, momentum: float, nesterov: bool, b1: float, b2: float, eps: float, alpha: float
) -> list[optax.GradientTransformation]:
    """The transforms turning a gradient into the optimizer's step direction."""
    if name == "sgd":
        return []
    if name in ("momentum", "nesterov"):
        # trace keeps buf = momentum * buf + g (torch, dampening 0) and, for Nesterov,
        # returns g + momentum * buf as torch does.
        return [optax.trace(decay=momentum, nesterov=nesterov or name == "nesterov")]
    if name == "adam":
        return [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if name == "rmsprop":
        # optax defaults to sqrt(v + eps); torch divides by sqrt(v) + eps.
        return [optax.scale_by_rms(decay=alpha, eps=eps, initial_scale=0.0, eps_in_sqrt=False)]
    return [scale_by_adagrad(initial_accumulator_value=0.0, eps=eps)]


def _decoupled_decay(
    weight_decay: float, decay_mask: DecayMask
) -> list[optax.GradientTransformation]:
    """add_decayed_weights when decay is on; nothing otherwise, to keep the state lean."""
    if weight_decay == 0:
        return []
    return [optax.add_decayed_weights(weight_decay, mask=decay_mask)]


def _wrap(
    core: optax.GradientTransformation, clip_norm: float | None, accumulate_steps: int
) -> optax.GradientTransformation:
    """Adds clipping in front of `core` and gradient accumulation around it."""
    tx = core if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), core)
    if accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(accumulate_steps)).gradient_transformation()
    return tx


def _resolve_schedule(
    learning_rate: float | optax.Schedule,
    schedule: str,
    total_steps: int | None,
    warmup_steps: int,
    schedule_kwargs: dict[str, Any],
) -> optax.Schedule:
    """Uses a schedule as given, or builds one from a float learning rate."""
    if not callable(learning_rate):
        return make_schedule(
            schedule,
            learning_rate=learning_rate,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            **schedule_kwargs,
        )
    # Schedule options next to a ready schedule would be silently ignored.
    if schedule != "constant" or warmup_steps or schedule_kwargs:
        raise OptimizerConfigError(
            "learning_rate is already a schedule; leave schedule='constant', "
            f"warmup_steps=0 and no schedule options (got schedule={schedule!r}, "
            f"warmup_steps={warmup_steps}, options={sorted(schedule_kwargs)})"
        )
    _check_schedule_values(total_steps, 0, 0.0, 0.0)
    if total_steps is None and hasattr(learning_rate, "total_steps"):
        return learning_rate  # already carries its horizon (e.g. from make_schedule)
    return _with_horizon(learning_rate, total_steps)


def _check_optimizer_values(
    name: str,
    momentum: float,
    nesterov: bool,
    b1: float,
    b2: float,
    eps: float,
    alpha: float,
    weight_decay: float,
) -> None:
    """Raises OptimizerConfigError naming the first out-of-range optimizer hyperparameter."""
    for arg, value in (("b1", b1), ("b2", b2), ("alpha", alpha)):
        if not 0 <= value < 1:
            raise OptimizerConfigError(f"{arg} must be in [0, 1), got {value}")
    for arg, value in (("momentum", momentum), ("eps", eps), ("weight_decay", weight_decay)):
        if value < 0:
            raise OptimizerConfigError(f"{arg} must be >= 0, got {value}")
    if nesterov and name not in ("momentum", "nesterov"):
        raise OptimizerConfigError(
            f"nesterov=True applies to 'momentum' or 'nesterov', not {name!r}"
        )
    if (nesterov or name == "nesterov") and momentum == 0:
        raise OptimizerConfigError("Nesterov momentum needs momentum > 0, got momentum=0")


def _check_wrapper_values(clip_norm: float | None, accumulate_steps: int) -> None:
    """Raises OptimizerConfigError for a non-positive clip_norm or accumulate_steps."""
    if clip_norm is not None and not clip_norm > 0:
        raise OptimizerConfigError(f"clip_norm must be > 0 or None, got {clip_norm}")
    if not isinstance(accumulate_steps, numbers.Integral) or accumulate_steps < 1:
        raise OptimizerConfigError(
            f"accumulate_steps must be an int >= 1, got {accumulate_steps!r}"
        )


def _check_choice(kind: str, name: str, valid: Sequence[str]) -> None:
    """Raises for a name outside `valid`: the closest valid name, then all of them."""
    if name in valid:
        return
    # Lower case first: "SGD" or "AdamW" is the commonest slip.
    close = difflib.get_close_matches(str(name).lower(), valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise OptimizerConfigError(f"unknown {kind} {name!r}; {hint}valid names: {', '.join(valid)}")
