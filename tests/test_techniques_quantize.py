"""Int8 quantization with qwix: outputs close to fp32, 4x smaller weights, QAT trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl.models import CNN, MLP
from jdl.techniques import quantize

X = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))


@pytest.fixture(scope="module")
def mlp():
    return MLP(64, (128, 128), 10, rngs=nnx.Rngs(0))


def relative_error(got, want):
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("activations", [False, True], ids=["weights", "weights+acts"])
def test_ptq_output_close_to_fp32_and_weights_int8(mlp, activations):
    quantized = quantize.quantize_ptq(mlp, X, activations=activations)
    want, got = mlp(X), quantized(X)
    # int8 absmax rounding: about 1/254 of the range per weight, a few % at the output.
    assert 0 < relative_error(got, want) < 0.05
    assert jnp.mean(jnp.argmax(got, -1) == jnp.argmax(want, -1)) >= 0.9
    # Rounding only: dequantized weights are within half a step (scale / 2) of the originals.
    originals = {"hidden/0/kernel": mlp.hidden[0].kernel, "head/kernel": mlp.head.kernel}
    dequantized = quantize.dequantized_params(quantized)
    for name, original in originals.items():
        step = jnp.max(jnp.abs(original[...]), axis=0) / 127
        assert jnp.all(jnp.abs(dequantized[name] - original[...]) <= step / 2 + 1e-7)
    # The original model is untouched.
    assert mlp.head.kernel[...].dtype == jnp.float32


def test_weight_bytes_shrink_about_four_times(mlp):
    fp32_bytes = quantize.model_size_bytes(mlp)
    int8_bytes = quantize.model_size_bytes(quantize.quantize_ptq(mlp, X))
    kernel_count = 64 * 128 + 128 * 128 + 128 * 10
    bias_count = 128 + 128 + 10
    scale_count = 128 + 128 + 10  # one float32 scale per output channel
    assert fp32_bytes == 4 * (kernel_count + bias_count)
    assert int8_bytes == kernel_count + 4 * (bias_count + scale_count)
    assert 3.5 < fp32_bytes / int8_bytes < 4.0


def test_quantized_model_jits_through_split_merge(mlp):
    quantized = quantize.quantize_ptq(mlp, X, activations=True)
    graphdef, state = nnx.split(quantized)
    jitted = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    np.testing.assert_allclose(jitted(state, X), quantized(X), atol=1e-5)


def test_convolutions_quantized_with_activations():
    cnn = CNN(1, 10, input_shape=(8, 8), conv_channels=(4, 8), dense_sizes=(16,), rngs=nnx.Rngs(0))
    weights_only = quantize.dequantized_params(quantize.quantize_ptq(cnn, X))
    assert sorted(weights_only) == ["dense/0/kernel", "head/kernel"]  # convs stay float
    full = quantize.quantize_ptq(cnn, X, activations=True)
    assert sorted(quantize.dequantized_params(full)) == [
        "convs/0/kernel",
        "convs/1/kernel",
        "dense/0/kernel",
        "head/kernel",
    ]
    assert relative_error(full(X), cnn(X)) < 0.1


def test_qat_step_runs_through_make_train_step_and_lowers_loss(mlp):
    qat = quantize.quantize_qat(mlp, X)
    # The forward pass simulates int8: it differs from fp32 and equals PTQ's w+a output.
    np.testing.assert_allclose(
        qat(X), quantize.quantize_ptq(mlp, X, activations=True)(X), atol=1e-5
    )
    assert relative_error(qat(X), mlp(X)) > 0

    state = jdl.TrainState.create(qat, optax.adam(1e-3))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    step = jax.jit(jdl.make_train_step(jdl.classification_loss()))
    batch = {"x": X, "y": jnp.arange(16, dtype=jnp.int32) % 10}
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1
    assert float(metrics["grad_norm"]) > 0  # straight-through gradients reach the weights
    deployable = quantize.quantize_ptq(state.model(), X, activations=True)
    assert quantize.model_size_bytes(deployable) < quantize.model_size_bytes(mlp) / 3.5


@pytest.mark.slow  # about 30 s of CPU: a training run plus compiles
def test_quantize_mnist_experiment_smoke(tmp_path, monkeypatch, capsys):
    from experiments import quantize_mnist

    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "no-data"))
    assert "python -m experiments.quantize_mnist" in quantize_mnist.__doc__
    final = quantize_mnist.main(
        [
            "--config.duration=2",
            "--config.qat_duration=1",
            "--config.hidden_sizes=(16,)",
            "--config.latency_repeats=1",
            "--config.latency_batch_size=8",
            "--config.download=false",
            "--config.progress=false",
            "--config.compilation_cache=false",
            "--workdir",
            str(tmp_path / "run"),
        ]
    )
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FINAL ")
    assert set(final) == {"fp32", "ptq_w", "ptq_wa", "qat"}
    assert final["ptq_w"]["bytes"] < final["fp32"]["bytes"] / 3
    with pytest.raises(SystemExit, match="latency_repeats"):
        quantize_mnist.main(["--config.latency_repeats=0", "--workdir", str(tmp_path / "bad")])
