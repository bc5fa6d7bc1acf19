"""The GAN: shapes, losses against hand computations, a step that moves one network at a
time, and training through `jdl.fit` with checkpoints and bitwise resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl.errors import UserError
from jdl.models import MODELS
from jdl.models.gan import (
    GAN,
    GANInputError,
    apply_to_network,
    discriminator_loss,
    discriminator_update,
    gan_optimizer,
    generator_loss,
    generator_update,
    make_gan_train_step,
    r1_penalty,
)
from jdl.models.sizes import ModelSizeError

TINY = {"image_shape": (8, 8, 1), "latent_dim": 3, "channels": (2, 4), "hidden_size": 5}


def _tiny(num_classes=None, seed=0) -> GAN:
    return GAN(**TINY, num_classes=num_classes, label_dim=2, rngs=nnx.Rngs(seed))


def _state(num_classes=None, seed=0, **create) -> jdl.TrainState:
    tx = gan_optimizer(generator=optax.adam(1e-2, b1=0.5), discriminator=optax.adam(2e-2, b1=0.5))
    return jdl.TrainState.create(_tiny(num_classes, seed), tx, seed=seed, **create)


def _batch(num=8, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (num, 8, 8, 1)).astype(np.float32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(rng.integers(0, 3, num), jnp.int32)}


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_equal(a, b) -> None:
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _assert_moved(a, b) -> None:
    assert any(not np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


# ------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("num_classes", [None, 3])
def test_shapes_of_generator_discriminator_and_samples(num_classes):
    model = _tiny(num_classes)
    labels = jnp.arange(5) % 3 if num_classes else None
    z = model.sample_latent(jax.random.key(0), 5)
    images = model.generator(z, labels)
    assert z.shape == (5, 3) and images.shape == (5, 8, 8, 1)
    assert float(jnp.max(jnp.abs(images))) <= 1.0  # tanh: the data's [-1, 1]
    assert model.discriminator(images, labels).shape == (5,)
    np.testing.assert_array_equal(model(z, labels), images)
    assert model.generate(jax.random.key(0), 5, labels).shape == (5, 8, 8, 1)


def test_conditional_discriminator_adds_the_projection_term():
    model = _tiny(3)
    x = _batch(4)["x"]
    y = jnp.array([0, 1, 2, 0])
    net = model.discriminator
    phi = net.features(x)
    expected = net.logit(phi)[:, 0] + jnp.sum(net.projection(y) * phi, axis=-1)
    np.testing.assert_allclose(net(x, y), expected, rtol=1e-6)


def test_registry_entry_builds_the_mnist_gan():
    model = MODELS["mnist_gan"](latent_dim=4, channels=(2, 4), hidden_size=8, rngs=nnx.Rngs(0))
    assert isinstance(model, GAN) and model.image_shape == (28, 28, 1)
    assert model(jnp.zeros((2, 4))).shape == (2, 28, 28, 1)
    assert model.discriminator(jnp.zeros((2, 28, 28, 1))).shape == (2,)


def _one_line(caught) -> str:
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert "\n" not in message
    return message


def test_bad_inputs_are_one_line_user_errors():
    plain, conditional = _tiny(), _tiny(3)
    with pytest.raises(GANInputError) as caught:
        plain.generate(jax.random.key(0), 2, jnp.zeros(2, jnp.int32))
    assert "labels given to an unconditional GAN" in _one_line(caught)
    with pytest.raises(GANInputError) as caught:
        plain.discriminator(jnp.zeros((2, 8, 8, 1)), jnp.zeros(2, jnp.int32))
    assert "unconditional" in _one_line(caught)
    with pytest.raises(GANInputError) as caught:
        conditional.generate(jax.random.key(0), 2)
    assert "pass labels" in _one_line(caught)
    with pytest.raises(GANInputError) as caught:
        plain.discriminator(jnp.zeros((2, 28, 28, 1)))
    assert "(B, *(8, 8, 1))" in _one_line(caught) and "(2, 28, 28, 1)" in str(caught.value)
    with pytest.raises(GANInputError) as caught:
        plain(jnp.zeros((2, 5)))
    assert "(B, 3)" in _one_line(caught)
    with pytest.raises(ModelSizeError) as caught:
        GAN(image_shape=(30, 30, 1), channels=(4, 8), rngs=nnx.Rngs(0))
    assert "divisible by 4" in _one_line(caught)


def test_bad_images_in_the_train_step_are_one_line():
    step = make_gan_train_step()
    with pytest.raises(GANInputError) as caught:
        jax.jit(step)(_state(), {"x": jnp.zeros((4, 28, 28, 1))})
    assert "image_shape" in _one_line(caught)


def test_a_state_without_the_gan_optimizer_is_refused_in_one_line():
    state = jdl.TrainState.create(_tiny(), optax.adam(1e-3))
    with pytest.raises(GANInputError) as caught:
        jax.jit(make_gan_train_step())(state, _batch())
    assert "gan_optimizer" in _one_line(caught)
    with pytest.raises(GANInputError, match="r1_gamma must be >= 0"):
        make_gan_train_step(r1_gamma=-1.0)


# ---------------------------------------------------------------------------------- losses


def _log_sigmoid(v):
    return -np.log1p(np.exp(-v))


def test_non_saturating_losses_by_hand():
    real = np.array([2.0, -1.0, 0.0, 30.0], np.float32)
    fake = np.array([-3.0, 0.5, 0.0, -30.0], np.float32)
    d_hand = -_log_sigmoid(real.astype(np.float64)) - np.log(1.0 - 1.0 / (1.0 + np.exp(-fake)))
    np.testing.assert_allclose(discriminator_loss(real, fake), d_hand, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(generator_loss(fake), -_log_sigmoid(fake.astype(np.float64)),
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(generator_loss(jnp.zeros(1)), [np.log(2.0)], rtol=1e-6)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_step_metrics_are_the_losses_of_the_networks_on_the_steps_noise(num_classes):
    state = _state(num_classes)
    batch = _batch()
    _, metrics = jax.jit(make_gan_train_step())(state, batch)
    model = state.model()
    y = batch["y"] if num_classes else None
    d_key, g_key = state.step_key("discriminator"), state.step_key("generator")
    real = np.asarray(model.discriminator(batch["x"], y), np.float64)
    fake = np.asarray(model.discriminator(model.generate(d_key, 8, y), y), np.float64)
    d_hand = np.mean(-_log_sigmoid(real) - np.log(1.0 - 1.0 / (1.0 + np.exp(-fake))))
    np.testing.assert_allclose(metrics["d_loss"], d_hand, rtol=1e-5)
    np.testing.assert_allclose(metrics["d_real"], np.mean(1 / (1 + np.exp(-real))), rtol=1e-5)
    np.testing.assert_allclose(metrics["d_fake"], np.mean(1 / (1 + np.exp(-fake))), rtol=1e-5)
    # The generator's half runs against the discriminator after its update.
    after_d, _ = discriminator_update(state, batch, d_key)
    updated = after_d.model()
    g_fake = np.asarray(updated.discriminator(updated.generate(g_key, 8, y), y), np.float64)
    np.testing.assert_allclose(metrics["g_loss"], np.mean(-_log_sigmoid(g_fake)), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], metrics["d_loss"] + metrics["g_loss"], rtol=1e-6)
    assert float(metrics["r1"]) == 0.0


def test_r1_penalty_matches_finite_differences():
    net = _tiny().discriminator
    x = _batch(2)["x"]
    gamma = 3.0
    penalty = np.asarray(r1_penalty(lambda images: net(images), x, gamma))
    with jax.enable_x64(True):  # central differences in float64: error ~ eps^2
        net64 = nnx.merge(*nnx.split(jax.tree.map(lambda p: p.astype(jnp.float64), net)))
        x64 = np.asarray(x, np.float64)
        eps = 1e-5
        grads = np.zeros_like(x64)
        for index in np.ndindex(x64.shape[1:]):
            step = np.zeros_like(x64)
            step[(slice(None), *index)] = eps
            up = np.asarray(net64(jnp.asarray(x64 + step)), np.float64)
            down = np.asarray(net64(jnp.asarray(x64 - step)), np.float64)
            grads[(slice(None), *index)] = (up - down) / (2 * eps)
    expected = 0.5 * gamma * np.sum(grads**2, axis=(1, 2, 3))
    assert np.all(expected > 0)
    np.testing.assert_allclose(penalty, expected, rtol=1e-4)


def test_r1_enters_the_discriminators_loss_and_gradient():
    state, batch = _state(), _batch()
    key = state.step_key("discriminator")
    plain, plain_metrics = discriminator_update(state, batch, key)
    with_r1, metrics = discriminator_update(state, batch, key, r1_gamma=10.0)
    net = state.model().discriminator
    expected = np.mean(np.asarray(r1_penalty(lambda im: net(im), batch["x"], 10.0)))
    np.testing.assert_allclose(metrics["r1"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["d_loss"], plain_metrics["d_loss"], rtol=1e-6)
    _assert_moved(plain.params["discriminator"], with_r1.params["discriminator"])
    _assert_equal(plain.params["generator"], with_r1.params["generator"])


# ------------------------------------------------------- each update moves its own network


def test_discriminator_update_moves_only_the_discriminator_and_its_adam_state():
    state, batch = _state(3), _batch()
    new, _ = jax.jit(discriminator_update)(state, batch, jax.random.key(1))
    before, after = state.opt_state.inner_states, new.opt_state.inner_states
    _assert_equal(new.params["generator"], state.params["generator"])
    _assert_equal(after["generator"], before["generator"])  # moments and count
    _assert_moved(new.params["discriminator"], state.params["discriminator"])
    _assert_moved(after["discriminator"], before["discriminator"])
    assert int(new.step) == int(state.step)


def test_generator_update_moves_only_the_generator_and_its_adam_state():
    state, batch = _state(3), _batch()
    new, _ = jax.jit(generator_update)(state, batch, jax.random.key(1))
    before, after = state.opt_state.inner_states, new.opt_state.inner_states
    _assert_equal(new.params["discriminator"], state.params["discriminator"])
    _assert_equal(after["discriminator"], before["discriminator"])
    _assert_moved(new.params["generator"], state.params["generator"])
    _assert_moved(after["generator"], before["generator"])


def _adam_count(state, network) -> int:
    return int(state.opt_state.inner_states[network].inner_state[0].count)


def test_the_real_step_is_d_then_g_each_on_its_own_network():
    state, batch = _state(3), _batch()
    step = jax.jit(make_gan_train_step())
    new, _ = step(state, batch)
    # The same two updates one after the other, with the step's keys.
    d_key, g_key = state.step_key("discriminator"), state.step_key("generator")
    after_d, _ = jax.jit(discriminator_update)(state, batch, d_key)
    after_g, _ = jax.jit(generator_update)(after_d, batch, g_key)
    for ours, theirs in ((new.params, after_g.params), (new.opt_state, after_g.opt_state)):
        for x, y in zip(_leaves(ours), _leaves(theirs), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    # The generator's update left the discriminator as its own update made it.
    np.testing.assert_allclose(
        np.concatenate([x.ravel() for x in _leaves(new.params["discriminator"])]),
        np.concatenate([x.ravel() for x in _leaves(after_d.params["discriminator"])]),
        rtol=1e-6,
        atol=1e-7,
    )
    assert int(new.step) == 1
    for _ in range(2):
        new, _ = step(new, batch)
    # Adam's count of each network moved once per step, in its own update only (not 6).
    assert _adam_count(new, "generator") == _adam_count(new, "discriminator") == 3


def test_apply_to_network_with_another_networks_gradients_changes_nothing():
    state = _state()
    grads = jax.tree.map(jnp.ones_like, state.params)
    grads = jax.tree_util.tree_map_with_path(
        lambda path, g: g if path[0].key == "discriminator" else jnp.zeros_like(g), grads
    )
    new = apply_to_network(state, "generator", grads)  # the generator's entries are zero
    _assert_equal(new.params["discriminator"], state.params["discriminator"])
    _assert_equal(new.opt_state.inner_states["discriminator"],
                  state.opt_state.inner_states["discriminator"])  # fmt: skip
    assert _adam_count(new, "generator") == 1 and _adam_count(new, "discriminator") == 0


def test_the_step_keeps_an_ema_of_the_weights():
    state = _state(ema_decay=0.9)
    new, _ = jax.jit(make_gan_train_step())(state, _batch())
    decay = float(new.ema_decay_at(1))
    for average, start, now in zip(
        _leaves(new.ema), _leaves(state.params), _leaves(new.params), strict=True
    ):
        np.testing.assert_allclose(average, decay * start + (1 - decay) * now, rtol=1e-5)


# ------------------------------------------------------------------------------ jdl.fit


def _data(num=32, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    # Two kinds of "digits": a bright left half or a bright right half.
    x = -np.ones((num, 8, 8, 1), np.float32)
    y = rng.integers(0, 2, num).astype(np.int32)
    for i, label in enumerate(y):
        if label == 0:
            x[i, :, :4] = 1.0
        else:
            x[i, :, 4:] = 1.0
    return {"x": x, "y": y}


def _fit(state, workdir=None, num_steps=6, r1_gamma=1.0, **options):
    return jdl.fit(
        state,
        train_step=make_gan_train_step(r1_gamma=r1_gamma),
        train_data=jdl.InMemoryData(_data(), batch_size=8, seed=0),
        num_steps=num_steps,
        log_every=options.pop("log_every", 3),
        workdir=workdir,
        progress=False,
        **options,
    )


def test_fit_trains_the_discriminator_and_moves_the_samples():
    state = _state(2)
    key, labels = jax.random.key(5), jnp.array([0, 1, 0, 1])
    before = np.asarray(state.model().generate(key, 4, labels))
    data = {name: jnp.asarray(value) for name, value in _data().items()}
    d_loss = jax.jit(lambda s: discriminator_update(s, data, key)[1]["d_loss"])
    first = float(d_loss(state))  # on all the data, one noise draw, before fit consumes it
    result = _fit(state, num_steps=40, log_every=10, r1_gamma=0.0)
    after = np.asarray(result.state.model().generate(key, 4, labels))
    assert np.abs(after - before).max() > 0.1
    assert float(d_loss(result.state)) < first - 0.1
    assert {"loss", "d_loss", "g_loss", "r1", "d_real", "d_fake"} <= set(result.train_metrics)


@pytest.mark.slow  # three fits of a step with R1's double backward: ~1 min on a loaded CPU
def test_checkpoint_and_resume_are_bitwise_and_the_seed_fixes_the_samples(tmp_path):
    straight = _fit(_state(2), num_steps=6)
    first = _fit(_state(2), workdir=str(tmp_path), num_steps=3, checkpoint_every=3)
    assert first.step == 3
    resumed = _fit(_state(2), workdir=str(tmp_path), num_steps=6, checkpoint_every=3)
    assert resumed.step == 6
    _assert_equal(straight.state.params, resumed.state.params)
    _assert_equal(straight.state.opt_state, resumed.state.opt_state)
    key, labels = jax.random.key(2), jnp.array([0, 1, 1])
    samples = [np.asarray(r.state.model().generate(key, 3, labels)) for r in (straight, resumed)]
    np.testing.assert_array_equal(samples[0], samples[1])
    assert float(np.abs(samples[0]).max()) > 0.0


def test_same_seed_same_samples_and_another_seed_other_samples():
    key, labels = jax.random.key(2), jnp.array([0, 1, 1])
    samples = [np.asarray(_tiny(2, seed).generate(key, 3, labels)) for seed in (0, 0, 1)]
    np.testing.assert_array_equal(samples[0], samples[1])
    assert not np.array_equal(samples[0], samples[2])
    other_key = np.asarray(_tiny(2, 0).generate(jax.random.key(3), 3, labels))
    assert not np.array_equal(samples[0], other_key)
