"""jdl.diffusion and jdl.models.UNet: schedules, forward process, conversions, samplers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl import diffusion as D
from jdl.errors import UserError
from jdl.models.sizes import ModelSizeError
from jdl.models.unet import AttentionBlock, UNet, UNetInputError, depth_to_space, space_to_depth
from jdl.steps import reseed_all_streams

TINY = {"image_shape": (8, 8, 1), "channels": (8, 16), "attention_heads": 2, "groups": 4}


def tiny_unet(num_classes: int | None = 3, seed: int = 0, **overrides) -> UNet:
    return UNet(**{**TINY, **overrides}, num_classes=num_classes, rngs=nnx.Rngs(seed))


# --------------------------------------------------------------------------------- model


@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("num_classes", [None, 3])
def test_unet_maps_images_timesteps_and_labels_to_image_shape(num_classes, patch_size):
    model = tiny_unet(num_classes, patch_size=patch_size, image_shape=(8, 12, 2))
    x = jax.random.normal(jax.random.key(0), (5, 8, 12, 2))
    t = jnp.arange(5)
    y = None if num_classes is None else jnp.arange(5) % num_classes
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    # The output depends on the timestep (the embedding reaches the blocks).
    assert not np.allclose(out, model(x, t + 100, y))
    if num_classes is not None:  # ... and on the label
        assert not np.allclose(out, model(x, t, (y + 1) % num_classes))


def test_unet_has_attention_at_the_lowest_level_only(monkeypatch):
    model = UNet(num_classes=10, rngs=nnx.Rngs(0))  # 28 -> 14 -> 7
    seen = []

    def record(self, x):
        seen.append(x.shape[1:3])
        return x

    monkeypatch.setattr(AttentionBlock, "__call__", record)
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    jax.eval_shape(lambda x: model(x, jnp.zeros(2)), x)
    assert len(seen) == 4 and set(seen) == {(7, 7)}  # 1 down, 1 middle, 2 up blocks


def test_space_to_depth_inverts():
    x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
    folded = space_to_depth(x, 2)
    assert folded.shape == (2, 3, 2, 12)
    np.testing.assert_array_equal(folded[0, 1, 1, :3], x[0, 2, 2])  # a patch's first pixel
    np.testing.assert_array_equal(depth_to_space(folded, 2), x)


def test_labels_to_an_unconditional_unet_is_one_line():
    model = tiny_unet(None)
    with pytest.raises(UNetInputError, match="unconditional") as caught:
        model(jnp.zeros((2, 8, 8, 1)), jnp.zeros(2), jnp.zeros(2, jnp.int32))
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"channels": (8, 0)}, "channels must hold ints >= 1"),
        ({"channels": (8, 10)}, "multiple of groups=4"),
        ({"channels": (8, 12), "groups": 2, "attention_heads": 8}, "attention_heads"),
        ({"image_shape": (10, 10, 1), "channels": (8, 8, 8)}, "divisible by 4"),
        ({"patch_size": 0}, "patch_size must be"),
    ],
)
def test_bad_unet_sizes_are_one_line(overrides, words):
    with pytest.raises(ModelSizeError, match=words) as caught:
        tiny_unet(**overrides)
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- schedules


def hand_alpha_bar(betas: list[float]) -> list[float]:
    out, product = [], 1.0
    for beta in betas:
        product *= 1.0 - beta
        out.append(product)
    return out


def test_linear_schedule_alpha_bar_by_hand():
    T = 10
    schedule = D.make_schedule("linear", T, beta_start=0.01, beta_end=0.2)
    betas = [0.01 + i * (0.2 - 0.01) / (T - 1) for i in range(T)]
    np.testing.assert_allclose(schedule.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(schedule.alpha_bar, hand_alpha_bar(betas), rtol=1e-6)
    assert schedule.num_steps == T


def test_cosine_schedule_alpha_bar_by_hand():
    T, s = 10, 0.008

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    schedule = D.make_schedule("cosine", T)
    # alpha_bar_t = f(t + 1) / f(0) as long as no beta was clipped (the last one is).
    betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    np.testing.assert_allclose(schedule.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(schedule.alpha_bar, hand_alpha_bar(betas), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(
        schedule.alpha_bar[:-1], [f(t + 1) / f(0) for t in range(T - 1)], rtol=1e-5
    )
    assert betas[-1] == 0.999


@pytest.mark.parametrize("name", D.SCHEDULES)
def test_forward_process_matches_closed_form_mean_and_variance(name):
    schedule = D.make_schedule(name, 100)
    n = 200_000
    x0 = jnp.broadcast_to(jnp.array([0.7, -0.3]), (n, 2))
    for t in (0, 30, 99):
        noise = jax.random.normal(jax.random.key(t), x0.shape)
        x_t = np.asarray(D.q_sample(schedule, x0, jnp.full(n, t), noise), np.float64)
        ab = float(schedule.alpha_bar[t])
        # Standard errors: sqrt(var / n) ~ 0.0022 for the mean; var's relative ~0.003.
        np.testing.assert_allclose(x_t.mean(0), math.sqrt(ab) * np.array([0.7, -0.3]), atol=0.01)
        np.testing.assert_allclose(x_t.var(0), [1 - ab, 1 - ab], rtol=0.02, atol=1e-6)


def test_v_and_epsilon_conversions_invert():
    keys = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(keys[0], (6, 4, 4, 1))
    eps = jax.random.normal(keys[1], (6, 4, 4, 1))
    ab = jax.random.uniform(keys[2], (6,), minval=0.01, maxval=0.99)
    x_t = jnp.sqrt(ab)[:, None, None, None] * x0 + jnp.sqrt(1 - ab)[:, None, None, None] * eps
    v = D.v_from_eps(x0, eps, ab)
    np.testing.assert_allclose(D.eps_from_v(x_t, v, ab), eps, atol=1e-5)
    np.testing.assert_allclose(D.x0_from_v(x_t, v, ab), x0, atol=1e-5)
    for prediction, output in (("epsilon", eps), ("v", v)):
        x0_hat, eps_hat = D.to_x0_eps(prediction, x_t, output, ab)
        np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
        np.testing.assert_allclose(eps_hat, eps, atol=1e-5)


# ------------------------------------------------------------------------------ samplers


def test_guidance_scale_zero_is_unconditional_and_one_is_conditional():
    model = tiny_unet(3)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    t, y = jnp.array([0, 5, 50, 999]), jnp.array([0, 1, 2, 0])
    uncond, cond = model(x, t), model(x, t, y)
    np.testing.assert_allclose(D.guided_output(model, x, t, y, 0.0), uncond, atol=1e-5)
    np.testing.assert_allclose(D.guided_output(model, x, t, y, 1.0), cond, atol=1e-5)
    np.testing.assert_allclose(
        D.guided_output(model, x, t, y, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-4
    )


def ddim_by_hand(model, schedule, x, labels, timesteps, prediction):
    """DDIM with eta = 0 in float64 numpy, one model call per step, x_0 clipped to [-1, 1]."""
    ab = np.asarray(schedule.alpha_bar, np.float64)
    x = np.asarray(x, np.float64)
    for i, t in enumerate(timesteps):
        ab_t = ab[t]
        ab_s = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        out = np.asarray(model(jnp.asarray(x, jnp.float32), jnp.full(len(x), t), labels))
        if prediction == "v":
            x0 = math.sqrt(ab_t) * x - math.sqrt(1 - ab_t) * out
        else:
            x0 = (x - math.sqrt(1 - ab_t) * out) / math.sqrt(ab_t)
        x0 = np.clip(x0, -1, 1)
        eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        x = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s) * eps
    return x


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_ddim_eta0_is_the_deterministic_map_from_the_start_noise(prediction):
    model, schedule = tiny_unet(3), D.make_schedule("cosine", 50)
    labels = np.array([0, 1, 2, 1])
    images, states = D.sample(
        model, schedule, jax.random.key(3), 4, labels=labels, num_steps=5,
        prediction=prediction, trajectory=True,
    )  # fmt: skip
    assert images.shape == (4, 8, 8, 1) and states.shape == (6, 4, 8, 8, 1)
    np.testing.assert_array_equal(states[-1], images)
    timesteps = D.sampling_timesteps(50, 5)
    assert list(timesteps) == [49, 37, 24, 12, 0]
    expected = ddim_by_hand(model, schedule, states[0], jnp.asarray(labels), timesteps, prediction)
    np.testing.assert_allclose(images, expected, atol=2e-4)


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_same_seed_gives_bitwise_the_same_samples(sampler, eta):
    model, schedule = tiny_unet(3), D.make_schedule("linear", 20)
    kwargs = dict(labels=np.array([2, 0, 1]), sampler=sampler, eta=eta, num_steps=20,
                  guidance_scale=2.0)  # fmt: skip
    a = np.asarray(D.sample(model, schedule, jax.random.key(7), 3, **kwargs))
    b = np.asarray(D.sample(model, schedule, jax.random.key(7), 3, **kwargs))
    c = np.asarray(D.sample(model, schedule, jax.random.key(8), 3, **kwargs))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.all(np.abs(a) <= 1.0 + 1e-6)  # the last step returns the clipped x_0


def test_ddpm_with_all_steps_takes_the_posterior_step():
    """One step of T = 1: x_0 = the clipped prediction, no noise (alpha_bar_s = 1)."""
    model, schedule = tiny_unet(None), D.make_schedule("linear", 1, beta_start=0.5)
    images, states = D.sample(model, schedule, jax.random.key(0), 2, sampler="ddpm",
                              num_steps=1, trajectory=True)  # fmt: skip
    x = states[0]
    x0 = (x - math.sqrt(0.5) * model(x, jnp.zeros(2, jnp.int32))) / math.sqrt(0.5)
    np.testing.assert_allclose(images, jnp.clip(x0, -1, 1), atol=1e-5)


# ------------------------------------------------------------------------------ training


def digits_8x8() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:512, :, :, None] / 16.0 * 2.0 - 1.0).astype(np.float32)
    return {"x": x, "y": (digits.target[:512] % 3).astype(np.int32)}


def fixed_draw_loss(loss_fn, state, batch) -> float:
    """The loss on `batch` with one fixed draw of timesteps, noise and label drops."""
    model = state.eval_model(ema=True)
    reseed_all_streams(model, jax.random.key(123))
    return float(jnp.mean(loss_fn(model, batch)["loss"]))


@pytest.mark.parametrize("prediction", ["v", pytest.param("epsilon", marks=pytest.mark.slow)])
def test_tiny_model_loss_falls_under_fit(prediction, tmp_path):
    data = digits_8x8()
    schedule = D.make_schedule("cosine", 100)
    loss_fn = D.diffusion_loss(schedule, prediction=prediction, label_dropout=0.2)
    state = jdl.TrainState.create(tiny_unet(3), optax.adam(3e-3), seed=0, ema_decay=0.9)
    before = fixed_draw_loss(loss_fn, state, data)
    result = jdl.fit(
        state,
        train_step=jdl.make_train_step(loss_fn),
        train_data=jdl.InMemoryData(data, batch_size=64, seed=0),
        num_steps=60,
        log_every=30,
        steps_per_dispatch=1,  # one small step to compile
        progress=False,
    )
    after = fixed_draw_loss(loss_fn, result.state, data)
    assert after < 0.6 * before, (before, after)


def test_train_step_draws_from_the_step_key():
    """Same state and batch: the same loss; the next step draws new noise (another loss)."""
    data = {k: v[:16] for k, v in digits_8x8().items()}
    loss_fn = D.diffusion_loss(D.make_schedule("linear", 100), label_dropout=0.5)
    step = jax.jit(jdl.make_train_step(loss_fn))
    state = jdl.TrainState.create(tiny_unet(3), optax.sgd(0.0), seed=0)
    _, first = step(state, data)
    _, again = step(state, data)
    assert float(first["loss"]) == float(again["loss"])
    later = state.replace(step=state.step + 1)  # sgd(0): same weights, next step's draw
    _, second = step(later, data)
    assert float(second["loss"]) != float(first["loss"])


# -------------------------------------------------------------------------------- errors


def one_line(caught) -> str:
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert "\n" not in message
    return message


def test_unknown_schedule_is_one_line():
    with pytest.raises(D.DiffusionError) as caught:
        D.make_schedule("quadratic")
    assert "'quadratic'" in one_line(caught) and "cosine" in str(caught.value)


def test_unknown_sampler_and_prediction_are_one_line():
    model, schedule = tiny_unet(None), D.make_schedule("linear", 10)
    with pytest.raises(D.DiffusionError) as caught:
        D.sample(model, schedule, jax.random.key(0), 2, sampler="euler")
    assert "'euler'" in one_line(caught) and "ddim" in str(caught.value)
    with pytest.raises(D.DiffusionError) as caught:
        D.diffusion_loss(schedule, prediction="x0")
    assert "'x0'" in one_line(caught)
    with pytest.raises(D.DiffusionError) as caught:
        D.sample(model, schedule, jax.random.key(0), 2, num_steps=11)
    assert "num_steps <= 10" in one_line(caught)


def test_guidance_on_an_unconditional_model_is_one_line():
    model, schedule = tiny_unet(None), D.make_schedule("linear", 10)
    with pytest.raises(D.DiffusionError) as caught:
        D.sample(model, schedule, jax.random.key(0), 2, guidance_scale=2.0)
    assert "class-conditional" in one_line(caught)
    with pytest.raises(D.DiffusionError) as caught:
        D.sample(model, schedule, jax.random.key(0), 2, labels=np.array([0, 1]))
    assert "unconditional" in one_line(caught)


def test_bad_labels_are_one_line():
    model, schedule = tiny_unet(3), D.make_schedule("linear", 10)
    for labels in (np.array([0, 3]), np.array([0]), np.array([0.0, 1.0])):
        with pytest.raises(D.DiffusionError) as caught:
            D.sample(model, schedule, jax.random.key(0), 2, labels=labels, guidance_scale=1.0)
        assert "labels must be 2 ints in 0..2" in one_line(caught)
    with pytest.raises(D.DiffusionError) as caught:
        D.sample(model, schedule, jax.random.key(0), 2, guidance_scale=1.0)
    assert "needs labels" in one_line(caught)


def test_images_of_another_shape_than_the_model_are_one_line():
    loss_fn = D.diffusion_loss(D.make_schedule("linear", 10))
    step = jax.jit(jdl.make_train_step(loss_fn))
    state = jdl.TrainState.create(tiny_unet(3), optax.sgd(0.1))
    batch = {"x": jnp.zeros((2, 28, 28, 1)), "y": jnp.zeros(2, jnp.int32)}
    with pytest.raises(D.DiffusionError) as caught:
        step(state, batch)
    message = one_line(caught)
    assert "(28, 28, 1)" in message and "(8, 8, 1)" in message
