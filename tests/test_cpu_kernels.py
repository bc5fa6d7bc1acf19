"""Hand-written convolution and pooling gradients equal XLA's autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdl
from jdl.models import cpu_kernels


@pytest.mark.parametrize("shape, kernel", [((2, 9, 7, 3), 3), ((1, 6, 6, 2), 5), ((3, 5, 8, 1), 1)])
def test_conv_value_and_gradients_match_xla(shape, kernel):
    kx, kw, kd = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (kernel, kernel, shape[-1], 4))
    dy = jax.random.normal(kd, shape[:-1] + (4,))

    def reference(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    y, vjp = jax.vjp(cpu_kernels.conv2d_same, x, w)
    y_ref, vjp_ref = jax.vjp(reference, x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 5, 2)])
def test_max_pool_value_and_gradient_match_xla(shape):
    x = jax.random.normal(jax.random.PRNGKey(1), shape)  # no ties
    dy = jax.random.normal(
        jax.random.PRNGKey(2), (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
    )

    def reference(x):
        return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")

    y, vjp = jax.vjp(cpu_kernels.max_pool_2x2, x)
    y_ref, vjp_ref = jax.vjp(reference, x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(vjp(dy)[0], vjp_ref(dy)[0], rtol=1e-6)


def test_cnn_with_and_without_cpu_kernels_agree():
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 28, 28, 1))
    fast = jdl.models.CNN(1, 10, input_shape=(28, 28), cpu_kernels=True, rngs=nnx.Rngs(0))
    plain = jdl.models.CNN(1, 10, input_shape=(28, 28), cpu_kernels=False, rngs=nnx.Rngs(0))
    # Same initialisation, same parameter tree shapes.
    fast_params = jax.tree.leaves(nnx.state(fast, nnx.Param))
    plain_params = jax.tree.leaves(nnx.state(plain, nnx.Param))
    for a, b in zip(fast_params, plain_params, strict=True):
        np.testing.assert_array_equal(a, b)

    def loss(model):
        return jnp.sum(model(x) ** 2)

    grads_fast = jax.tree.leaves(nnx.grad(loss)(fast))
    grads_plain = jax.tree.leaves(nnx.grad(loss)(plain))
    np.testing.assert_allclose(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_fast, grads_plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
