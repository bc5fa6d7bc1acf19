"""The convolutional VAE: shapes, its bounds against hand computations, its train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx

import jdl
from jdl.models import MODELS
from jdl.models.sizes import ModelSizeError
from jdl.models.vae import (
    VAE,
    binarize,
    binarize_images,
    elbo,
    gaussian_kl,
    iwae_bound,
    iwae_log_weights,
    kl_weight,
    make_vae_train_step,
    vae_loss,
)

TINY = {"image_shape": (4, 4, 1), "latent_dim": 2, "channels": (2,), "hidden_size": 3}


def _tiny(decoder: str = "bernoulli", seed: int = 0) -> VAE:
    return VAE(**TINY, decoder=decoder, rngs=nnx.Rngs(seed))


def _images(num: int = 3, seed: int = 0, shape=(4, 4, 1)) -> np.ndarray:
    grey = np.random.default_rng(seed).random((num, *shape))
    return binarize_images(grey, seed)


def test_shapes_of_encoder_decoder_and_call_in_both_modes():
    model = VAE(latent_dim=5, channels=(4, 8), hidden_size=16, rngs=nnx.Rngs(0))
    x = jnp.asarray(_images(6, shape=(28, 28, 1)))
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (6, 5)
    assert model.decode(mean).shape == (6, 28, 28, 1)
    assert model.generate(jax.random.key(0), 7).shape == (7, 28, 28, 1)
    train_a, train_b = model(x), model(x)  # z drawn from the stream: two draws differ
    assert train_a.shape == (6, 28, 28, 1) and not np.allclose(train_a, train_b)
    model.eval()  # z = the posterior mean
    np.testing.assert_array_equal(model(x), model.decode(mean))


def test_registry_entry_builds_the_mnist_vae():
    model = MODELS["mnist_vae"](latent_dim=3, channels=(2, 4), hidden_size=8, rngs=nnx.Rngs(0))
    assert isinstance(model, VAE) and model.image_shape == (28, 28, 1)
    assert model(jnp.zeros((2, 28, 28, 1))).shape == (2, 28, 28, 1)


def test_sizes_that_cannot_halve_are_one_clear_error():
    with pytest.raises(ModelSizeError, match="divisible by 4"):
        VAE(image_shape=(30, 30, 1), channels=(4, 8), rngs=nnx.Rngs(0))
    with pytest.raises(ModelSizeError, match="latent_dim"):
        VAE(latent_dim=0, rngs=nnx.Rngs(0))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_elbo_matches_a_hand_computation_in_numpy(decoder):
    model = _tiny(decoder)
    x = _images(3)
    key = jax.random.key(7)
    mean, logvar = (np.asarray(a, np.float64) for a in model.encode(jnp.asarray(x)))
    eps = np.asarray(jax.random.normal(key, mean.shape), np.float64)
    z = mean + np.exp(0.5 * logvar) * eps
    out = np.asarray(model.decode(jnp.asarray(z, jnp.float32)), np.float64)
    xs = x.reshape(3, -1).astype(np.float64)
    out = out.reshape(3, -1)
    if decoder == "bernoulli":
        p = _sigmoid(out)
        log_px = np.sum(xs * np.log(p) + (1 - xs) * np.log(1 - p), axis=1)
    else:
        sigma = float(model.scale()[0])
        log_px = np.sum(scipy.stats.norm.logpdf(xs, loc=out, scale=sigma), axis=1)
    kl = 0.5 * np.sum(np.exp(logvar) + mean**2 - 1.0 - logvar, axis=1)
    np.testing.assert_allclose(elbo(model, jnp.asarray(x), key), log_px - kl, rtol=2e-5)


def test_gaussian_kl_by_hand():
    # KL(N(1, 1) || N(0, 1)) = 1/2; KL(N(0, 4) || N(0, 1)) = (4 - 1 - log 4) / 2.
    kl = gaussian_kl(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, np.log(4.0)]]))
    np.testing.assert_allclose(kl, [0.5 + (3.0 - np.log(4.0)) / 2], rtol=1e-6)


def test_iwae_with_one_sample_is_the_elbo_with_a_sampled_kl():
    model = _tiny()
    x = jnp.asarray(_images(3))
    key = jax.random.key(3)
    mean, logvar = model.encode(x)
    z = model.sample_latent(mean, logvar, jax.random.split(key, 1)[0])
    log_prior = scipy.stats.norm.logpdf(np.asarray(z)).sum(axis=1)
    log_q = scipy.stats.norm.logpdf(
        np.asarray(z), loc=np.asarray(mean), scale=np.exp(0.5 * np.asarray(logvar))
    ).sum(axis=1)
    log_px = np.asarray(model.log_likelihood(x, model.decode(z)))
    np.testing.assert_allclose(iwae_bound(model, x, key, 1), log_px + log_prior - log_q, rtol=1e-5)


def test_iwae_with_one_sample_equals_the_elbo_in_expectation():
    model = _tiny(seed=1)
    x = jnp.asarray(_images(4, seed=1))
    draws = 4000
    one_sample = np.asarray(iwae_log_weights(model, x, jax.random.key(0), draws))  # (k, B)
    keys = jax.random.split(jax.random.key(1), draws)
    elbos = np.asarray(jax.vmap(lambda k: elbo(model, x, k))(keys))  # (draws, B)
    gap = one_sample.mean(axis=0) - elbos.mean(axis=0)
    error = np.sqrt(one_sample.var(axis=0) / draws + elbos.var(axis=0) / draws)
    assert np.all(np.abs(gap) < 4 * error), (gap, error)


def test_iwae_grows_with_k_and_bounds_the_mean_log_weight():
    model = _tiny(seed=2)
    x = jnp.asarray(_images(4, seed=2))
    log_w = np.asarray(iwae_log_weights(model, x, jax.random.key(0), 4000))  # (4000, B)

    def bound(k):  # 4000 / k independent IWAE(k) estimates per image, averaged
        groups = log_w.reshape(-1, k, log_w.shape[1])
        return np.mean(jax.nn.logsumexp(groups, axis=1) - np.log(k), axis=0)

    analytic_elbo = np.mean(
        jax.vmap(lambda k: elbo(model, x, k))(jax.random.split(jax.random.key(1), 4000)), axis=0
    )
    assert np.all(bound(10) > analytic_elbo) and np.all(bound(100) > bound(10))
    # For every draw (not only in expectation): log-mean-exp >= mean (Jensen).
    for key in range(3):
        weights = iwae_log_weights(model, x, jax.random.key(10 + key), 5)
        bound_5 = iwae_bound(model, x, jax.random.key(10 + key), 5)
        assert np.all(np.asarray(bound_5) >= np.asarray(weights).mean(axis=0) - 1e-5)


def test_kl_weight_warms_up_linearly():
    assert [float(kl_weight(s, 4)) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert float(kl_weight(0, 0)) == 1.0


def test_binarize_draws_each_pixel_with_its_grey_value():
    x = jnp.full((200, 4, 4, 1), 0.3)
    out = binarize(jax.random.key(0), {"x": x, "y": jnp.zeros(200)})["x"]
    assert set(np.unique(out)) == {0.0, 1.0} and abs(float(out.mean()) - 0.3) < 0.02
    fixed = binarize_images(np.full((200, 4, 4, 1), 0.3), seed=0)
    np.testing.assert_array_equal(fixed, binarize_images(np.full((200, 4, 4, 1), 0.3), seed=0))


def _state(seed=0):
    return jdl.TrainState.create(_tiny(seed=seed), optax.adam(1e-2), seed=seed)


def test_train_step_binarises_with_the_steps_key_and_weights_the_kl():
    grey = {"x": jnp.asarray(np.random.default_rng(0).random((8, 4, 4, 1)), jnp.float32)}
    state = _state()
    step = make_vae_train_step(kl_warmup_steps=4, dynamic_binarization=True)
    _, metrics = jax.jit(step)(state, grey)
    # The same step by hand: binarise with the step's "augment" key, KL weight 1/4.
    binary = binarize(state.step_key("augment"), grey)
    plain = jdl.make_train_step(vae_loss())
    _, expected = jax.jit(plain)(state, {**binary, "kl_weight": jnp.full((8,), 0.25)})
    for name in ("loss", "nelbo", "recon", "kl"):
        np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], metrics["recon"] + 0.25 * metrics["kl"], rtol=1e-6)
    assert float(metrics["kl_weight"]) == 0.25
    _, unbinarised = jax.jit(make_vae_train_step(kl_warmup_steps=4))(state, grey)
    assert float(unbinarised["recon"]) != pytest.approx(float(metrics["recon"]))


def test_fit_lowers_the_negative_elbo():
    data = {"x": _images(64, seed=3)}
    step = make_vae_train_step(kl_warmup_steps=10, dynamic_binarization=True)
    evaluate = jdl.make_eval_step(vae_loss())
    before = jdl.make_evaluator(evaluate, 64)(_state(), data)["nelbo"]
    result = jdl.fit(
        _state(),
        train_step=step,
        train_data=jdl.InMemoryData(data, batch_size=16, seed=0),
        num_steps=40,
        log_every=20,  # train metrics: means over the last 20 steps, KL weight 1 throughout
        progress=False,
    )
    after = jdl.make_evaluator(evaluate, 64)(result.state, data)["nelbo"]
    assert after < before - 1.0, (before, after)
    assert set(result.train_metrics) >= {"loss", "nelbo", "recon", "kl", "kl_weight"}
    assert result.train_metrics["kl_weight"] == 1.0
