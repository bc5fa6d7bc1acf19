"""Attribution maps: finite differences, completeness, Grad-CAM by hand, PNG output."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdl
from jdl.techniques import explain


def _tiny_mlp():
    model = jdl.models.MLP(5, (7,), 3, activation="tanh", rngs=nnx.Rngs(0))
    model.eval()
    return model


def test_saliency_equals_central_finite_differences():
    jax.config.update("jax_enable_x64", True)
    try:
        model = _tiny_mlp()
        params = jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model))
        nnx.update(model, params)
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 5), jnp.float64)
        target = jnp.array([2, 0])
        grads = np.asarray(jax.jit(lambda v: explain.saliency(model, v, target))(x))
        forward = jax.jit(lambda v: model(v))
        eps = 1e-6
        for b in range(2):
            for i in range(5):
                step = jnp.zeros_like(x).at[b, i].set(eps)
                up = forward(x + step)[b, target[b]]
                down = forward(x - step)[b, target[b]]
                assert grads[b, i] == pytest.approx(float((up - down) / (2 * eps)), rel=1e-6)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_saliency_of_a_linear_model_is_its_weight_row():
    w = jnp.arange(12.0).reshape(3, 4)
    grads = explain.saliency(lambda x: x @ w.T, jnp.ones((2, 4)), jnp.array([1, 2]))
    np.testing.assert_array_equal(grads, np.stack([w[1], w[2]]))


@pytest.mark.parametrize("baseline", [None, 0.5])
def test_integrated_gradients_completeness_within_one_percent(baseline):
    model = jdl.models.CNN(
        1, 4, input_shape=(8, 8), conv_channels=(4,), dense_sizes=(8,), rngs=nnx.Rngs(1)
    )
    model.eval()
    x = jax.random.uniform(jax.random.PRNGKey(2), (3, 8, 8, 1))
    target = jnp.array([0, 1, 3])
    attributions = jax.jit(
        lambda v: explain.integrated_gradients(model, v, target, baseline=baseline, steps=64)
    )(x)
    base = jnp.zeros_like(x) if baseline is None else jnp.full_like(x, baseline)
    rows = jnp.arange(3)
    forward = jax.jit(lambda v: model(v)[rows, target])
    difference = forward(x) - forward(base)
    total = jnp.sum(attributions, axis=(1, 2, 3))
    assert float(jnp.min(jnp.abs(difference))) > 1e-3  # a meaningful check
    np.testing.assert_array_less(np.abs(total - difference), 0.01 * np.abs(difference))


def test_integrated_gradients_is_exact_for_a_linear_model():
    w = jnp.array([[1.0, -2.0, 3.0]])
    x = jnp.array([[2.0, 1.0, -1.0]])
    attributions = explain.integrated_gradients(lambda v: v @ w.T, x, jnp.array([0]), steps=1)
    np.testing.assert_allclose(attributions, x * w)  # (x - 0) * w


def test_smoothgrad_without_noise_is_saliency_and_with_noise_is_deterministic():
    model = _tiny_mlp()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5))
    target = jnp.array([1, 2])
    key = jax.random.PRNGKey(3)
    smooth = jax.jit(
        lambda k, noise: explain.smoothgrad(
            model, x, target, key=k, num_samples=4, noise_level=noise
        )
    )
    noiseless = smooth(key, 0.0)
    np.testing.assert_allclose(noiseless, explain.saliency(model, x, target), rtol=1e-6)
    noisy = smooth(key, 0.15)
    assert not np.allclose(noisy, noiseless)
    np.testing.assert_array_equal(noisy, smooth(key, 0.15))
    assert not np.allclose(noisy, smooth(jax.random.PRNGKey(4), 0.15))


def _cnn():
    model = jdl.models.CNN(
        1, 5, input_shape=(12, 12), conv_channels=(3, 4), dense_sizes=(6,), rngs=nnx.Rngs(0)
    )
    model.eval()
    return model


def test_grad_cam_shape_non_negativity_and_hand_computation():
    model = _cnn()
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 12, 12, 1))
    target = jnp.array([1, 4])
    cam = jax.jit(lambda v: explain.grad_cam(model, v, target, layer="convs/1", resize=False))(x)
    assert cam.shape == (2, 6, 6) and cam.dtype == jnp.float32
    assert float(jnp.min(cam)) >= 0.0 and float(jnp.max(cam)) > 0.0
    # by hand: split the CNN at the second conv's output A (before its ReLU and pooling)
    features = model.activation(model.convs[0](x))
    features = jdl.models.cnn.pool(features, kind="max", window=2)
    activations = model.convs[1](features)  # (2, 6, 6, 4)

    def head(a):
        h = jdl.models.cnn.pool(model.activation(a), kind="max", window=2).reshape(2, -1)
        for layer in model.dense:
            h = model.activation(layer(h))
        logits = model.head(h)
        return jnp.sum(logits[jnp.arange(2), target])

    weights = jnp.mean(jax.jit(jax.grad(head))(activations), axis=(1, 2), keepdims=True)
    expected = jax.nn.relu(jnp.sum(weights * activations, axis=-1))
    np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-6)
    resized = jax.jit(lambda v: explain.grad_cam(model, v, target, layer="convs/1"))(x)
    assert resized.shape == (2, 12, 12) and float(jnp.min(resized)) >= 0.0


def test_grad_cam_leaves_the_model_unchanged():
    model = _cnn()
    x = jnp.ones((1, 12, 12, 1))
    before = model(x)
    explain.grad_cam(model, x, jnp.array([0]), layer="convs/0")
    assert type(model.convs[0]).__name__ == "Conv"
    np.testing.assert_array_equal(model(x), before)


@pytest.mark.parametrize(
    "layer, message", [("convs/7", "no submodule"), ("head/kernel", "not an NNX submodule")]
)
def test_grad_cam_bad_layer_is_a_clear_error(layer, message):
    with pytest.raises(ValueError, match=message):
        explain.grad_cam(_cnn(), jnp.ones((1, 12, 12, 1)), jnp.array([0]), layer=layer)


def test_grad_cam_needs_a_spatial_layer():
    with pytest.raises(ValueError, match=r"needs \(B, H, W, K\)"):
        explain.grad_cam(_cnn(), jnp.ones((1, 12, 12, 1)), jnp.array([0]), layer="dense/0")


def test_heatmap_png_is_written(tmp_path):
    images = np.random.default_rng(0).uniform(size=(2, 12, 12, 1))
    maps = {"a": np.random.default_rng(1).normal(size=(2, 12, 12, 1)), "b": np.ones((2, 12, 12))}
    path = explain.save_heatmaps(tmp_path / "out" / "maps.png", images, maps, titles=["x", "y"])
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    normalised = explain.normalize_maps(maps["a"])
    assert normalised.shape == (2, 12, 12)
    assert normalised.min() == 0.0 and normalised.max() == pytest.approx(1.0)


def test_experiment_smoke(tmp_path, capsys, monkeypatch):
    from experiments import explain_mnist

    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "no-data"))
    assert "python -m experiments.explain_mnist" in explain_mnist.__doc__
    final = explain_mnist.main(
        [
            "--config.duration=2",
            "--config.num_images=2",
            "--config.smoothgrad_samples=2",
            "--config.ig_steps=8",
            "--config.conv_channels=(4, 8)",
            "--config.dense_sizes=(8,)",
            "--config.steps_per_dispatch=1",
            "--config.compilation_cache=false",
            "--config.download=false",
            "--workdir",
            str(tmp_path / "run"),
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("FINAL ") and json.loads(last[6:]) == final
    with open(tmp_path / "run" / "heatmaps.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_experiment_rejects_missing_layer(tmp_path):
    from experiments import explain_mnist

    with pytest.raises(SystemExit, match="config.cam_layer"):
        explain_mnist.main(["--config.cam_layer=", "--workdir", str(tmp_path)])
