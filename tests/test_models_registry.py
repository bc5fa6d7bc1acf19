"""Every entry of the MODELS registry builds (abstractly: no memory) with trainable params."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

import jdl


@pytest.mark.parametrize("name", sorted(jdl.models.MODELS))
def test_registry_entry_builds(name):
    build = jdl.models.MODELS[name]
    if name.startswith("gpt"):
        model = nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0)))
    else:
        model = nnx.eval_shape(lambda: build(num_classes=7, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert jdl.count_params(params) > 0
    if not name.startswith("gpt"):  # the head has num_classes outputs
        shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
        assert any(shape[-1] == 7 for shape in shapes)
