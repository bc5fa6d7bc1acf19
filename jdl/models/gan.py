"""A DCGAN-style generative adversarial network (Goodfellow et al. 2014; Radford et al. 2016).

Two networks in one `GAN` module: a `Generator` G that maps a latent z ~ N(0, I) (and,
in the class-conditional option, a label) to an image in [-1, 1], and a `Discriminator`
D that maps an image (and label) to one logit, "real" when large. With the
class-conditional option G concatenates a label embedding to z and D adds a projection
term <embed(y), features(x)> to its logit (Miyato & Koyama 2018).

Training: both networks and both optimizers live in ONE `jdl.TrainState`, so `jdl.fit`
trains, fuses, checkpoints and resumes a GAN exactly as any other model:

    model = GAN(num_classes=10, rngs=nnx.Rngs(params=0))
    tx = gan_optimizer(generator=optax.adam(2e-4, b1=0.5), discriminator=optax.adam(2e-4, b1=0.5))
    state = jdl.TrainState.create(model, tx, seed=0)
    result = jdl.fit(state, train_step=make_gan_train_step(r1_gamma=1.0), train_data=..., ...)

`gan_optimizer` is `optax.multi_transform` keyed by the first name of each parameter's
path ("generator" or "discriminator"): one optimizer state per network inside the one
`opt_state`. The train step (`make_gan_train_step`) is sequential: a discriminator
update, then a generator update against the updated discriminator. Each update goes
through `apply_to_network`, which moves one network's parameters and its optimizer
state only: the other network's parameters, Adam moments and step count stay bitwise
as they were. That is the pattern for any step that trains several models: one module
that holds them, one multi_transform optimizer keyed by the module's attribute names,
and one `apply_to_network` per model and update.

Losses (per example, logits r = D(x) on real images, f = D(G(z)) on generated ones):
  * `discriminator_loss`: softplus(-r) + softplus(f) = -log sigmoid(r) - log(1 - sigmoid(f)).
  * `generator_loss` (non-saturating): softplus(-f) = -log sigmoid(f).
  * `r1_penalty` (Mescheder et al. 2018): (gamma / 2) ||grad_x D(x)||^2 on real images,
    added to the discriminator's loss when `r1_gamma` > 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdl import steps as steps_lib
from jdl.errors import UserError
from jdl.models.cnn import Conv2D, pool
from jdl.models.sizes import ModelSizeError, check_sizes
from jdl.models.vae import _upsample as upsample
from jdl.state import TrainState

__all__ = [
    "NETWORKS",
    "Discriminator",
    "GAN",
    "GANInputError",
    "Generator",
    "apply_to_network",
    "discriminator_loss",
    "discriminator_update",
    "gan_optimizer",
    "generator_loss",
    "generator_update",
    "make_gan_train_step",
    "r1_penalty",
]

NETWORKS = ("generator", "discriminator")


class GANInputError(UserError, ValueError):
    """Inputs that do not fit a GAN: labels for an unconditional one, a wrong image shape."""


def _check_labels(owner: str, num_classes: int | None, y: jax.Array | None, rows: int) -> None:
    if num_classes is None and y is not None:
        raise GANInputError(
            f"{owner}: labels given to an unconditional GAN; build it with num_classes=K "
            "or call it without labels"
        )
    if num_classes is not None and y is None:
        raise GANInputError(
            f"{owner}: this GAN is class-conditional (num_classes={num_classes}); pass "
            "labels y of shape (B,)"
        )
    if y is not None and tuple(y.shape) != (rows,):
        raise GANInputError(f"{owner}: labels must have shape ({rows},), got {tuple(y.shape)}")


class Generator(nnx.Module):
    """z (+ label) -> dense -> (H/f, W/f, C) -> [conv3x3 + relu, 2x upsampling] per stage
    -> conv3x3 -> tanh: images in [-1, 1].

    f = 2 ** len(channels); the stages run through `channels` in reverse (widest first).
    Every conv is stride 1 (`jdl.models.Conv2D`, fast gradients on XLA:CPU) and the 2x
    nearest-neighbour upsampling is a broadcast; convolving before each upsampling costs
    a quarter of the FLOPs of upsample-then-conv (as `jdl.models.VAE`'s decoder).

    Call: `(z (B, latent_dim), y (B,) int labels or None)` -> `(B, H, W, C)` in [-1, 1].
    """

    def __init__(
        self,
        *,
        image_shape: Sequence[int],
        latent_dim: int,
        channels: Sequence[int],
        num_classes: int | None,
        label_dim: int,
        rngs: nnx.Rngs,
    ):
        height, width, colors = image_shape
        factor = 2 ** len(channels)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.feature_shape = (height // factor, width // factor, channels[-1])
        self.label_embed = (
            nnx.Embed(num_classes, label_dim, rngs=rngs) if num_classes is not None else None
        )
        inputs = latent_dim + (label_dim if num_classes is not None else 0)
        self.dense = nnx.Linear(inputs, math.prod(self.feature_shape), rngs=rngs)
        outs = list(reversed(channels))
        self.convs = nnx.List(
            [Conv2D(a, b, 3, rngs=rngs) for a, b in zip([outs[0], *outs[:-1]], outs, strict=True)]
        )
        self.output = Conv2D(outs[-1], colors, 3, rngs=rngs)

    def __call__(self, z: jax.Array, y: jax.Array | None = None) -> jax.Array:
        _check_labels("Generator", self.num_classes, y, z.shape[0])
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise GANInputError(
                f"Generator: latents must have shape (B, {self.latent_dim}), got {tuple(z.shape)}"
            )
        if self.label_embed is not None:
            z = jnp.concatenate([z, self.label_embed(y)], axis=-1)  # (B, L + E)
        h = jax.nn.relu(self.dense(z)).reshape(-1, *self.feature_shape)  # (B, h, w, C)
        for conv in self.convs:  # (B, h, w, C) -> (B, 2h, 2w, C')
            h = upsample(jax.nn.relu(conv(h)))
        return jnp.tanh(self.output(h))  # (B, H, W, C)


class Discriminator(nnx.Module):
    """Image (+ label) -> one logit per image; no batch norm (its batch statistics would
    couple real and generated examples, and R1 needs per-example gradients).

    Per stage: conv3x3 + leaky ReLU + 2x2 average pooling (stride-1 convs and reshape
    pooling: faster on XLA:CPU than strided convs, with the same halving), then flatten,
    dense `hidden_size` + leaky ReLU (the features phi(x)), and the logit
    w . phi(x) + b [+ <embed(y), phi(x)> with labels: the projection discriminator].

    Call: `(x (B, H, W, C), y (B,) int labels or None)` -> `(B,)` logits.
    """

    def __init__(
        self,
        *,
        image_shape: Sequence[int],
        channels: Sequence[int],
        hidden_size: int,
        num_classes: int | None,
        negative_slope: float,
        rngs: nnx.Rngs,
    ):
        height, width, colors = image_shape
        factor = 2 ** len(channels)
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.negative_slope = negative_slope
        ins = [colors, *channels[:-1]]
        self.convs = nnx.List(
            [Conv2D(a, b, 3, rngs=rngs) for a, b in zip(ins, channels, strict=True)]
        )
        flat = (height // factor) * (width // factor) * channels[-1]
        self.dense = nnx.Linear(flat, hidden_size, rngs=rngs)
        self.logit = nnx.Linear(hidden_size, 1, rngs=rngs)
        self.projection = (
            nnx.Embed(num_classes, hidden_size, rngs=rngs) if num_classes is not None else None
        )

    def features(self, x: jax.Array) -> jax.Array:
        """phi(x): `(B, H, W, C)` -> `(B, hidden_size)`."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise GANInputError(
                f"Discriminator: images must have shape (B, *{self.image_shape}), got "
                f"{tuple(x.shape)}; give it images of the GAN's image_shape"
            )
        h = x
        for conv in self.convs:  # (B, H, W, C) -> (B, H / 2, W / 2, C')
            h = pool(jax.nn.leaky_relu(conv(h), self.negative_slope), kind="avg", window=2)
        return jax.nn.leaky_relu(self.dense(h.reshape(h.shape[0], -1)), self.negative_slope)

    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        _check_labels("Discriminator", self.num_classes, y, x.shape[0])
        phi = self.features(x)  # (B, D)
        logit = self.logit(phi)[:, 0]  # (B,)
        if self.projection is not None:
            logit = logit + jnp.sum(self.projection(y) * phi, axis=-1)
        return logit


class GAN(nnx.Module):
    """A generator and a discriminator for images of `image_shape`, trained together.

    Args:
      image_shape: (H, W, C) of one image; H and W must be multiples of 2 ** len(channels).
      latent_dim: size of z ~ N(0, I).
      channels: the discriminator's conv stages from the image side, e.g. (32, 64); the
        generator runs them in reverse (64 at the smallest map, 32 before the output).
      hidden_size: the discriminator's feature width (and projection size).
      num_classes: None for an unconditional GAN; K for labels 0..K-1 (class-conditional
        G and projection D).
      label_dim: size of the generator's label embedding (conditional only).
      negative_slope: the discriminator's leaky ReLU slope.
      rngs: NNX random streams; parameters draw from `params` (or `default`).

    Attributes `generator` and `discriminator`: their names are the keys of
    `gan_optimizer`'s two optimizers. Call: `(z (B, latent_dim), y)` -> generated
    images `(B, H, W, C)` in [-1, 1] (the generator).

    Raises:
      ModelSizeError: a size < 1, or an image whose H or W does not halve len(channels) times.
    """

    def __init__(
        self,
        *,
        image_shape: Sequence[int] = (28, 28, 1),
        latent_dim: int = 64,
        channels: Sequence[int] = (32, 64),
        hidden_size: int = 128,
        num_classes: int | None = None,
        label_dim: int = 16,
        negative_slope: float = 0.2,
        rngs: nnx.Rngs,
    ):
        image_shape, channels = tuple(image_shape), tuple(channels)
        check_sizes(
            "GAN",
            image_shape=image_shape,
            latent_dim=latent_dim,
            channels=channels,
            hidden_size=hidden_size,
            num_classes=num_classes,
            label_dim=label_dim,
        )
        if len(image_shape) != 3 or not channels:
            raise ModelSizeError(
                f"GAN: image_shape must be (H, W, C) and channels non-empty, got {image_shape} "
                f"and {channels}"
            )
        factor = 2 ** len(channels)
        if image_shape[0] % factor or image_shape[1] % factor:
            raise ModelSizeError(
                f"GAN: image_shape {image_shape} must have H and W divisible by {factor} "
                "(2 ** len(channels), one halving per conv stage); use fewer channels stages"
            )
        self.image_shape = image_shape
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.generator = Generator(
            image_shape=image_shape,
            latent_dim=latent_dim,
            channels=channels,
            num_classes=num_classes,
            label_dim=label_dim,
            rngs=rngs,
        )
        self.discriminator = Discriminator(
            image_shape=image_shape,
            channels=channels,
            hidden_size=hidden_size,
            num_classes=num_classes,
            negative_slope=negative_slope,
            rngs=rngs,
        )

    def sample_latent(self, key: jax.Array, num: int) -> jax.Array:
        """z ~ N(0, I): `(num, latent_dim)` float32."""
        return jax.random.normal(key, (num, self.latent_dim))

    def generate(self, key: jax.Array, num: int, labels: jax.Array | None = None) -> jax.Array:
        """`num` images G(z) for z ~ N(0, I) drawn with `key`: `(num, H, W, C)` in [-1, 1].

        A function of `key` (and `labels`) only: the same key gives bitwise the same images.
        """
        return self.generator(self.sample_latent(key, num), labels)

    def __call__(self, z: jax.Array, y: jax.Array | None = None) -> jax.Array:
        return self.generator(z, y)


# --------------------------------------------------------------------------------- losses


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """softplus(-real) + softplus(fake) per example: `(B,)` twice -> `(B,)` nats."""
    return jax.nn.softplus(-real_logits) + jax.nn.softplus(fake_logits)


def generator_loss(fake_logits: jax.Array) -> jax.Array:
    """The non-saturating generator loss softplus(-fake) = -log sigmoid(fake): `(B,)`."""
    return jax.nn.softplus(-fake_logits)


def r1_penalty(
    discriminator: Callable[[jax.Array], jax.Array], x: jax.Array, gamma: float
) -> jax.Array:
    """(gamma / 2) ||d D(x_i) / d x_i||^2 per example: `(B,)`.

    `discriminator` maps images `(B, ...)` to logits `(B,)` with each logit a function of
    its own image only (no batch statistics), so the gradient of the logits' sum is
    each image's own gradient. Differentiable again (for the discriminator's update).
    """
    grads = jax.grad(lambda images: jnp.sum(discriminator(images)))(x)  # (B, ...)
    return 0.5 * gamma * jnp.sum(jnp.square(grads), axis=tuple(range(1, x.ndim)))


# ------------------------------------------------------------------------- optimizer, step


def _network_of(path) -> str:
    return path[0].key  # nnx.State paths start with the module attribute's name


def _network_labels(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: _network_of(path), params)


def gan_optimizer(
    *, generator: optax.GradientTransformation, discriminator: optax.GradientTransformation
) -> optax.GradientTransformation:
    """One optimizer per network, as one optax transformation for `jdl.TrainState.create`.

    `optax.multi_transform` keyed by the first name of each parameter's path (the
    `GAN` attribute it belongs to). Its state holds one inner state per network under
    `opt_state.inner_states["generator"]` and `["discriminator"]`; `apply_to_network`
    moves one of them at a time.
    """
    return optax.multi_transform(
        {"generator": generator, "discriminator": discriminator}, _network_labels
    )


def _select(name: str, chosen, other):
    """`chosen`'s leaves under network `name`, `other`'s elsewhere (same tree structure)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a, b: a if _network_of(path) == name else b, chosen, other
    )


def _only(name: str, params):
    """`params` with every network other than `name` behind a stop_gradient."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p if _network_of(path) == name else jax.lax.stop_gradient(p), params
    )


def _check_gan_state(state: TrainState) -> None:
    inner = getattr(state.opt_state, "inner_states", None)
    if not isinstance(inner, dict) or set(inner) != set(NETWORKS):
        raise GANInputError(
            "a GAN train step needs a state whose optimizer is jdl.models.gan.gan_optimizer"
            "(generator=..., discriminator=...); create it with TrainState.create(gan, "
            "gan_optimizer(...))"
        )


def apply_to_network(state: TrainState, name: str, grads: nnx.State) -> TrainState:
    """`state` after one optimizer update of network `name` with `grads` (pure; traceable).

    Only `name`'s parameters and `name`'s optimizer state change; every other network's
    parameters and optimizer state (Adam moments, counts) are `state`'s own, bitwise.
    `state.step` and the EMA are not touched (the caller closes the step once with
    `TrainState.finish_step`).
    The other networks' updates are computed by the multi_transform and discarded, and
    so removed by XLA's dead-code elimination: they cost nothing in a compiled step.

    Args:
      state: a state whose `tx` is `gan_optimizer(...)` (a multi_transform keyed by the
        networks' names).
      name: "generator" or "discriminator".
      grads: gradients shaped like `state.params`; the other networks' entries are ignored.
    """
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = _select(name, optax.apply_updates(state.params, updates), state.params)
    inner = {**state.opt_state.inner_states, name: opt_state.inner_states[name]}
    return state.replace(params=params, opt_state=state.opt_state._replace(inner_states=inner))


def _labels(model: GAN, batch: steps_lib.Batch) -> jax.Array | None:
    return batch["y"] if model.num_classes is not None else None


def discriminator_update(
    state: TrainState, batch: steps_lib.Batch, key: jax.Array, *, r1_gamma: float = 0.0
) -> tuple[TrainState, steps_lib.Metrics]:
    """One discriminator update on real images batch["x"] against G(z), z drawn with `key`.

    Loss: mean of `discriminator_loss` (+ `r1_penalty` on the real images when
    `r1_gamma` > 0). The generated images are labelled like the real ones (batch["y"],
    conditional GANs only). Only the discriminator moves (`apply_to_network`).

    Returns:
      (state, metrics): "d_loss" (without the penalty), "r1" (the mean penalty, 0 when
      off), "d_real" and "d_fake" (mean sigmoid(D) on real and generated images),
      "d_grad_norm".
    """
    model = state.model()
    x = batch["x"]
    y = _labels(model, batch)
    fake = jax.lax.stop_gradient(model.generator(model.sample_latent(key, x.shape[0]), y))

    def loss(params):
        net = state.model(_only("discriminator", params)).discriminator
        real_logits, fake_logits = net(x, y), net(fake, y)
        d_loss = jnp.mean(discriminator_loss(real_logits, fake_logits))
        r1 = jnp.mean(r1_penalty(lambda im: net(im, y), x, r1_gamma)) if r1_gamma else 0.0
        return d_loss + r1, (d_loss, r1, real_logits, fake_logits)

    (_, (d_loss, r1, real_logits, fake_logits)), grads = jax.value_and_grad(loss, has_aux=True)(
        state.params
    )
    metrics = {
        "d_loss": d_loss,
        "r1": jnp.asarray(r1, jnp.float32),
        "d_real": jnp.mean(jax.nn.sigmoid(real_logits)),
        "d_fake": jnp.mean(jax.nn.sigmoid(fake_logits)),
        "d_grad_norm": optax.global_norm(grads["discriminator"]),
    }
    return apply_to_network(state, "discriminator", grads), metrics


def generator_update(
    state: TrainState, batch: steps_lib.Batch, key: jax.Array
) -> tuple[TrainState, steps_lib.Metrics]:
    """One generator update: the non-saturating loss of D(G(z)), z drawn with `key`.

    batch["x"] gives the batch size only; batch["y"] the labels of a conditional GAN.
    Only the generator moves (`apply_to_network`); the discriminator is held fixed.

    Returns:
      (state, metrics): "g_loss", "g_grad_norm".
    """
    model = state.model()
    rows = batch["x"].shape[0]
    y = _labels(model, batch)
    z = model.sample_latent(key, rows)

    def loss(params):
        net = state.model(_only("generator", params))
        return jnp.mean(generator_loss(net.discriminator(net.generator(z, y), y)))

    g_loss, grads = jax.value_and_grad(loss)(state.params)
    metrics = {"g_loss": g_loss, "g_grad_norm": optax.global_norm(grads["generator"])}
    return apply_to_network(state, "generator", grads), metrics


def make_gan_train_step(*, r1_gamma: float = 0.0) -> steps_lib.TrainStep:
    """The pure GAN step `(state, batch) -> (state, metrics)` for `jdl.fit`.

    How a step that trains two models with two optimizers is written in jdl: the state
    is `TrainState.create(GAN(...), gan_optimizer(generator=..., discriminator=...))`,
    and the step is a plain function of it:

        def train_step(state, batch):
            state, d_metrics = discriminator_update(state, batch, state.step_key("d"), ...)
            state, g_metrics = generator_update(state, batch, state.step_key("g"))
            return state.finish_step(), {...}  # one step, one EMA update

    i.e. a discriminator update, then a generator update against the new discriminator;
    each moves its own network and optimizer state only (`apply_to_network`). The
    step counter advances once per step; the noise of both halves comes from the
    step's keys, so a run is a function of its seed and resumes bitwise. A state made
    with `ema_decay` keeps its EMA of both networks' parameters (sample from
    `state.eval_model(ema=True).generator`).

    Args:
      r1_gamma: weight of the R1 penalty on real images (0: off).

    Returns:
      `train_step`; metrics: "loss" (d_loss + g_loss, the sum `jdl.fit` checks for
      finiteness), "d_loss", "g_loss", "r1", "d_real", "d_fake", "d_grad_norm",
      "g_grad_norm", "param_norm". Batches: {"x": (B, H, W, C) real images in [-1, 1],
      "y": (B,) labels (conditional GANs)}.

    Raises:
      GANInputError: when traced, if the state's optimizer is not `gan_optimizer`'s.
      GANInputError: `r1_gamma` < 0 (also a ValueError).
    """
    if not r1_gamma >= 0.0:
        raise GANInputError(f"r1_gamma must be >= 0 (0: no R1 penalty), got {r1_gamma!r}")

    def train_step(state: TrainState, batch: steps_lib.Batch):
        _check_gan_state(state)
        new, d_metrics = discriminator_update(
            state, batch, state.step_key("discriminator"), r1_gamma=r1_gamma
        )
        new, g_metrics = generator_update(new, batch, state.step_key("generator"))
        new = new.finish_step()  # one step count and one EMA update for both halves
        metrics = {**d_metrics, **g_metrics}
        metrics["loss"] = d_metrics["d_loss"] + g_metrics["g_loss"]
        metrics["param_norm"] = optax.global_norm(new.params)
        return new, metrics

    train_step.lr_schedule = None
    return train_step
