"""Rematerialisation (`remat=True`): same outputs and gradients, activations recomputed."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdl.models import resnet, transformer, vit

_TOKENS = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 256)
_MASK = jnp.arange(12)[None, :] < jnp.array([[12], [7]])  # the second sequence is padded
_IMAGES = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 1))
_CIFAR = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))

# name: (model factory taking remat and rngs, the forward pass)
CASES = {
    "gpt_with_dropout": (
        functools.partial(transformer.gpt_tiny, max_len=16, embed_dim=32, num_heads=2, dropout=0.1),
        lambda model: model(_TOKENS),
    ),
    "encoder_with_mask": (
        functools.partial(
            transformer.EncoderClassifier, 256, 12, 32, 2, 2, 3, pooling="cls", dropout=0.1
        ),
        lambda model: model(_TOKENS, _MASK),
    ),
    "vit": (
        functools.partial(vit.vit_tiny, 10, embed_dim=32, num_heads=2, num_layers=2, dropout=0.1),
        lambda model: model(_IMAGES),
    ),
    "resnet_with_batch_norm": (
        functools.partial(resnet.ResNet, (1, 1), resnet.BasicBlock, 10, width=8, stem="cifar"),
        lambda model: model(_CIFAR),
    ),
}


def _output_and_grads(model, forward):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, rest):
        def loss(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            model.train()  # dropout on, batch norm on batch statistics
            out = forward(model)
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            return jnp.sum(jnp.sin(out)), (out, new_rest)

        (_, (out, new_rest)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return out, grads, new_rest

    return run(params, rest), jax.make_jaxpr(run)(params, rest)


# ViT runs the same `checkpointed_block` as GPT, and ResNet's remat has its own tests in
# test_models_resnet.py: those two cases only run with the slow tests.
SLOW = {"vit", "resnet_with_batch_norm"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else []) for name in CASES],
)
def test_remat_gives_identical_outputs_and_gradients(name):
    factory, forward = CASES[name]
    (plain, plain_jaxpr) = _output_and_grads(factory(rngs=nnx.Rngs(0)), forward)
    (remat, remat_jaxpr) = _output_and_grads(factory(remat=True, rngs=nnx.Rngs(0)), forward)
    # remat really is in the program, and only there.
    assert "remat" in str(remat_jaxpr) or "checkpoint" in str(remat_jaxpr)
    assert "remat" not in str(plain_jaxpr) and "checkpoint" not in str(plain_jaxpr)
    # Outputs, gradients and the updated model state (batch statistics, RNG counters).
    plain_leaves, remat_leaves = jax.tree.leaves(plain), jax.tree.leaves(remat)
    assert len(plain_leaves) == len(remat_leaves)
    for a, b in zip(plain_leaves, remat_leaves, strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(plain[1]))
