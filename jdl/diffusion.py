"""Denoising diffusion: noise schedules, the training loss, DDPM and DDIM samplers.

The forward process (Ho et al. 2020) noises data x_0 in T steps; with
alpha_bar_t = prod_{s <= t} (1 - beta_s) it has the closed form

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),   t = 0 .. T-1

(index t here is step t + 1 of the paper). `make_schedule` gives the betas and
alpha_bar of the "linear" schedule (betas evenly from 1e-4 to 0.02, Ho et al.) or the
"cosine" one (alpha_bar_t = f(t + 1) / f(0), f(u) = cos((u / T + s) / (1 + s) * pi / 2)^2,
each beta clipped at 0.999; Nichol & Dhariwal 2021).

A network predicts, from (x_t, t, label), either the noise epsilon ("epsilon") or the
velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 ("v"; Salimans & Ho 2022);
`to_x0_eps` turns either into the pair (x_0, eps).

Training meets `jdl.fit` through the pure `(state, batch) -> (state, metrics)` step of
`jdl.make_train_step` with the loss `diffusion_loss`: per image, t ~ U{0..T-1}, eps ~
N(0, I) and (for classifier-free guidance) the label replaced by the null label with
probability `label_dropout`, all drawn from the model's "noise" stream, which the step
reseeds from the run's key and step (`jdl.TrainState.step_key("model")`), so a run is a
function of its seed.

Sampling (`sample`) runs a jitted `lax.scan` over N timesteps evenly spaced in 0..T-1:
"ddpm" draws x_s from the posterior q(x_s | x_t, x_0) (ancestral sampling; with N = T
exactly the sampler of Ho et al.), "ddim" takes the DDIM step with noise level `eta`
(Song et al. 2021; eta = 0 deterministic, eta = 1 the ancestral variance). Classifier-
free guidance (Ho & Salimans 2022) combines the conditional and the unconditional
(null-label) outputs as  out = out_uncond + w (out_cond - out_uncond)  (`guided_output`):
w = 0 is the unconditional model, w = 1 the conditional one, w > 1 guides harder.
Sample with the EMA of the weights: `state.eval_model(ema=True)`.

Everything here works in the model's data space; the MNIST experiment maps pixels to
[-1, 1] first, and `sample` clips its x_0 predictions to `clip` (default [-1, 1]).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdl.errors import UserError

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "DiffusionError",
    "Schedule",
    "diffusion_loss",
    "eps_from_v",
    "guided_output",
    "make_schedule",
    "q_sample",
    "sample",
    "sampling_timesteps",
    "to_x0_eps",
    "v_from_eps",
    "x0_from_v",
]

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "v")
SAMPLERS = ("ddpm", "ddim")


class DiffusionError(UserError, ValueError):
    """A bad diffusion setting or input: schedule, sampler, prediction, labels, shapes."""


class Schedule(NamedTuple):
    """The noise schedule of T steps: float32 arrays `betas` and `alpha_bar`, shape (T,)."""

    betas: jax.Array
    alpha_bar: jax.Array

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def make_schedule(
    name: str,
    num_steps: int = 1000,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_offset: float = 0.008,
) -> Schedule:
    """The "linear" or "cosine" schedule of `num_steps` steps (see the module docstring).

    Computed in float64 on the host and returned as float32; alpha_bar is the cumulative
    product of (1 - betas) for both schedules.

    Raises:
      DiffusionError: an unknown name, or num_steps < 1.
    """
    if name not in SCHEDULES:
        raise DiffusionError(f"unknown noise schedule {name!r}; use one of {SCHEDULES}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise DiffusionError(f"a schedule needs num_steps >= 1, got {num_steps!r}")
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    else:
        u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
        f = np.cos((u + cosine_offset) / (1 + cosine_offset) * math.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    alpha_bar = np.cumprod(1.0 - betas)
    return Schedule(jnp.asarray(betas, jnp.float32), jnp.asarray(alpha_bar, jnp.float32))


def _per_image(values: jax.Array, like: jax.Array) -> jax.Array:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like` (B, ...)."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise; x0, noise (B, ...), t (B,)."""
    ab = _per_image(schedule.alpha_bar[t], x0)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def v_from_eps(x0: jax.Array, eps: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (alpha_bar broadcast per image)."""
    ab = _per_image(alpha_bar, x0)
    return jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0


def eps_from_v(x_t: jax.Array, v: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t."""
    ab = _per_image(alpha_bar, x_t)
    return jnp.sqrt(ab) * v + jnp.sqrt(1.0 - ab) * x_t


def x0_from_v(x_t: jax.Array, v: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
    ab = _per_image(alpha_bar, x_t)
    return jnp.sqrt(ab) * x_t - jnp.sqrt(1.0 - ab) * v


def to_x0_eps(
    prediction: str, x_t: jax.Array, output: jax.Array, alpha_bar: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(x_0, eps) implied by a network `output` of kind `prediction` at x_t.

    alpha_bar: (B,) the alpha_bar of each image's timestep.
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "v":
        return x0_from_v(x_t, output, alpha_bar), eps_from_v(x_t, output, alpha_bar)
    ab = _per_image(alpha_bar, x_t)
    return (x_t - jnp.sqrt(1.0 - ab) * output) / jnp.sqrt(ab), output


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DiffusionError(f"unknown {what} {value!r}; use one of {choices}")


def _check_image_shape(model: nnx.Module, shape: tuple[int, ...], what: str) -> None:
    expected = tuple(getattr(model, "image_shape", shape))
    if tuple(shape) != expected:
        raise DiffusionError(
            f"{what} has images of shape {tuple(shape)}, but the model takes {expected}; "
            "give it images of the model's shape or build the model for these"
        )


def _is_conditional(model: nnx.Module) -> bool:
    return getattr(model, "num_classes", None) is not None


def diffusion_loss(
    schedule: Schedule, *, prediction: str = "epsilon", label_dropout: float = 0.0
) -> Callable:
    """The DDPM training loss as a `jdl` loss function `(model, batch) -> per-image metrics`.

    Reads batch["x"] (B, H, W, C) (data space, e.g. [-1, 1]) and, for a conditional
    model, batch["y"] (B,) int labels. Per image it draws t ~ U{0..T-1} and eps ~ N(0, I)
    from the model's "noise" stream, replaces the label by the null label with
    probability `label_dropout`, and returns {"loss": mean over pixels of
    (model(x_t, t, y) - target)^2} with target eps ("epsilon") or v ("v").

    Raises:
      DiffusionError: an unknown prediction or a label_dropout outside [0, 1] (at once);
        when traced: images of another shape than the model's `image_shape`.
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    if not 0.0 <= label_dropout <= 1.0:
        raise DiffusionError(f"label_dropout must be in [0, 1], got {label_dropout!r}")

    def loss_fn(model: nnx.Module, batch) -> dict[str, jax.Array]:
        x0 = batch["x"]
        _check_image_shape(model, x0.shape[1:], "the batch")
        rows = x0.shape[0]
        t_key, noise_key, drop_key = jax.random.split(model.noise_stream(), 3)
        t = jax.random.randint(t_key, (rows,), 0, schedule.num_steps)
        eps = jax.random.normal(noise_key, x0.shape, x0.dtype)
        x_t = q_sample(schedule, x0, t, eps)
        y = None
        if _is_conditional(model):
            y = jnp.asarray(batch["y"], jnp.int32)
            drop = jax.random.bernoulli(drop_key, label_dropout, (rows,))
            y = jnp.where(drop, model.num_classes, y)
        out = model(x_t, t, y)
        target = eps if prediction == "epsilon" else v_from_eps(x0, eps, schedule.alpha_bar[t])
        axes = tuple(range(1, x0.ndim))
        return {"loss": jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=axes)}

    return loss_fn


def guided_output(
    model: nnx.Module,
    x_t: jax.Array,
    t: jax.Array,
    labels: jax.Array | None,
    guidance_scale: float | None,
) -> jax.Array:
    """The network output at (x_t, t), with classifier-free guidance when a scale is given.

    With `guidance_scale` w: out_uncond + w (out_cond - out_uncond), where out_uncond
    uses the null label; both halves run as one batch of 2B. Without (None): the model's
    output for `labels` (None: unconditional).
    """
    if guidance_scale is None:
        return model(x_t, t, labels)
    null = jnp.full_like(labels, model.num_classes)
    both = model(
        jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([labels, null])
    )
    cond, uncond = jnp.split(both, 2)
    return uncond + guidance_scale * (cond - uncond)


def sampling_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
    """`num_steps` distinct timesteps evenly spaced in 0..T-1, descending (T-1 first)."""
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_steps:
        raise DiffusionError(
            f"sampling needs 1 <= num_steps <= {num_train_steps} (the schedule's steps), "
            f"got {num_steps!r}"
        )
    return np.round(np.linspace(num_train_steps - 1, 0, num_steps)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class _SamplerConfig:
    sampler: str
    prediction: str
    eta: float
    guidance_scale: float | None
    clip: tuple[float, float] | None
    trajectory: bool


def sample(
    model: nnx.Module,
    schedule: Schedule,
    key: jax.Array,
    num: int,
    *,
    labels: jax.Array | np.ndarray | None = None,
    sampler: str = "ddim",
    num_steps: int = 50,
    eta: float = 0.0,
    guidance_scale: float | None = None,
    prediction: str = "epsilon",
    clip: tuple[float, float] | None = (-1.0, 1.0),
    trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Draws `num` images by reversing the diffusion in `num_steps` jitted scan steps.

    Starts from x ~ N(0, I) drawn with `key` and steps through `sampling_timesteps`.
    Each step predicts x_0 and eps (`to_x0_eps` of `guided_output`); x_0 is clipped to
    `clip` (None: not clipped) and eps recomputed from it. Then, to the next timestep s
    (alpha_bar_s = 1 after the last):
      * "ddpm": x_s ~ q(x_s | x_t, x_0), mean sqrt(ab_s) b x_0 / (1 - ab_t) +
        sqrt(a) (1 - ab_s) x_t / (1 - ab_t), variance b (1 - ab_s) / (1 - ab_t), with
        a = ab_t / ab_s, b = 1 - a;
      * "ddim": x_s = sqrt(ab_s) x_0 + sqrt(1 - ab_s - sigma^2) eps + sigma z, sigma =
        eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s).
    The same model, key and arguments give bitwise the same images (eta = 0 draws no
    noise after the start). Compiled once per model structure, shape and setting.

    Args:
      model: the network (e.g. `jdl.models.UNet`), in eval mode; it is not changed.
      schedule: the schedule it was trained with.
      key: PRNG key of the initial noise and the per-step noise.
      num: images to draw.
      labels: (num,) int classes for a conditional model, None for unconditional.
      sampler: "ddpm" or "ddim".
      num_steps: reverse steps N <= T.
      eta: DDIM's noise level (ignored by "ddpm").
      guidance_scale: classifier-free guidance weight w (`guided_output`); needs labels
        and a conditional model. None: no guidance.
      prediction: what the model predicts, "epsilon" or "v".
      clip: the range x_0 predictions are clipped to, or None.
      trajectory: also return x_t before every step and the final images.

    Returns:
      float32 images (num, *model.image_shape); with `trajectory`, also the states
      (N + 1, num, ...) from the initial noise to the images.

    Raises:
      DiffusionError: an unknown sampler or prediction, num_steps outside 1..T, a
        guidance scale or labels for an unconditional model, a guidance scale without
        labels, or labels that are not `num` ints in 0..num_classes-1.
    """
    _check_choice("sampler", sampler, SAMPLERS)
    _check_choice("prediction", prediction, PREDICTIONS)
    conditional = _is_conditional(model)
    if guidance_scale is not None and not conditional:
        raise DiffusionError(
            f"guidance_scale={guidance_scale} needs a class-conditional model, but this "
            "one has no num_classes; sample with guidance_scale=None or train with classes"
        )
    if labels is not None:
        if not conditional:
            raise DiffusionError(
                "labels given to an unconditional model; sample without labels or train a "
                "model with num_classes"
            )
        labels = np.asarray(labels)
        if (
            labels.shape != (num,)
            or not np.issubdtype(labels.dtype, np.integer)
            or labels.min() < 0
            or labels.max() >= model.num_classes
        ):
            raise DiffusionError(
                f"labels must be {num} ints in 0..{model.num_classes - 1}, got shape "
                f"{labels.shape} dtype {labels.dtype}"
            )
        labels = jnp.asarray(labels, jnp.int32)
    elif guidance_scale is not None:
        raise DiffusionError("guidance_scale needs labels: pass labels=(num,) class ints")
    timesteps = sampling_timesteps(schedule.num_steps, num_steps)
    config = _SamplerConfig(
        sampler,
        prediction,
        float(eta),
        None if guidance_scale is None else float(guidance_scale),
        None if clip is None else (float(clip[0]), float(clip[1])),
        bool(trajectory),
    )
    graphdef, state = nnx.split(model)
    shape = (num, *model.image_shape)
    images, states = _run_sampler(
        graphdef, config, shape, state, schedule.alpha_bar, jnp.asarray(timesteps), key, labels
    )
    return (images, states) if trajectory else images


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run_sampler(graphdef, config, shape, state, alpha_bar, timesteps, key, labels):
    model = nnx.merge(graphdef, state)
    init_key, step_key = jax.random.split(key)
    x = jax.random.normal(init_key, shape, jnp.float32)
    previous = jnp.concatenate([timesteps[1:], jnp.array([-1], jnp.int32)])

    def step(x, inputs):
        index, t, s = inputs
        ab_t = alpha_bar[t]
        ab_s = jnp.where(s >= 0, alpha_bar[jnp.maximum(s, 0)], 1.0)
        t_batch = jnp.full(shape[:1], t)
        out = guided_output(model, x, t_batch, labels, config.guidance_scale)
        x0, eps = to_x0_eps(config.prediction, x, out, jnp.full(shape[:1], ab_t))
        if config.clip is not None:
            x0 = jnp.clip(x0, *config.clip)
            eps = (x - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1.0 - ab_t)
        noise = jax.random.normal(jax.random.fold_in(step_key, index), shape, jnp.float32)
        a = ab_t / ab_s
        if config.sampler == "ddpm":
            mean = (jnp.sqrt(ab_s) * (1.0 - a) * x0 + jnp.sqrt(a) * (1.0 - ab_s) * x) / (1.0 - ab_t)
            sigma = jnp.sqrt((1.0 - a) * (1.0 - ab_s) / (1.0 - ab_t))
            new = mean + sigma * noise
        else:
            sigma = config.eta * jnp.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - a))
            direction = jnp.sqrt(jnp.maximum(1.0 - ab_s - sigma**2, 0.0)) * eps
            new = jnp.sqrt(ab_s) * x0 + direction
            if config.eta:  # eta = 0 adds nothing random: deterministic given the start
                new = new + sigma * noise
        return new, (x if config.trajectory else None)

    indices = jnp.arange(timesteps.shape[0])
    x, states = jax.lax.scan(step, x, (indices, timesteps, previous))
    if config.trajectory:
        states = jnp.concatenate([states, x[None]])
    return x, states
