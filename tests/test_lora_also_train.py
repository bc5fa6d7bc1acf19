"""LoRA with parameters trained in full next to the adapters (`also_train`): patterns select
them, they count as trainable, and the adapter files carry them to a fresh base model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl.techniques import lora
from jdl.techniques.transfer import param_path

TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 61)
LAYER_NORMS = ("*ln1", "*ln2", "ln_f")


def gpt(seed: int = 0) -> jdl.models.GPT:
    return jdl.models.GPT(61, 16, 32, 4, 2, tie_embeddings=False, rngs=nnx.Rngs(seed))


def lm_loss(model, batch):
    logits = model(batch["x"])
    return {"loss": jdl.losses.softmax_xent(logits=logits, labels=batch["y"]).mean(axis=-1)}


def flat(params) -> dict[str, np.ndarray]:
    return {
        param_path(path): np.asarray(value)
        for path, value in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def trained_state(also_train, steps: int = 3) -> jdl.TrainState:
    model = gpt()
    lora.add_lora(model, rank=2)
    state = jdl.TrainState.create(model, lora.optimizer(optax.adam(1e-2), also_train=also_train))
    step = jax.jit(jdl.make_train_step(lm_loss))
    for _ in range(steps):
        state, _ = step(state, {"x": TOKENS, "y": jnp.roll(TOKENS, -1, axis=1)})
    return state


def test_patterns_select_every_layer_norm_and_only_those_train_besides_adapters():
    state = trained_state(("head", *LAYER_NORMS), steps=1)
    before = flat(trained_state(("head", *LAYER_NORMS), steps=0).params)
    after = flat(state.params)
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    norms = {f"blocks/{b}/ln{i}/{p}" for b in (0, 1) for i in (1, 2) for p in ("scale", "bias")}
    expected_full = {"head/kernel", "ln_f/scale", "ln_f/bias"} | norms
    assert expected_full <= changed
    assert changed - expected_full == {n for n in changed if "/lora/lora_" in n}


def test_trainable_count_adds_the_also_train_parameters_once():
    model = gpt()
    lora.add_lora(model, rank=2)
    adapters, total = lora.count_adapter_params(model)
    assert lora.count_trainable_params(model) == (adapters, total)
    # head 32*61 (no bias), LayerNorms 5 * (32 + 32); "ln_f" listed twice counts once.
    trained, all_params = lora.count_trainable_params(
        model, also_train=("head", *LAYER_NORMS, "ln_f/scale")
    )
    assert all_params == total and trained == adapters + 32 * 61 + 5 * 64
    state = jdl.TrainState.create(model, lora.optimizer(optax.sgd(0.1), also_train=("head",)))
    assert lora.count_trainable_params(state, also_train=("head",))[0] == adapters + 32 * 61


def test_adapter_files_carry_the_also_train_parameters_to_a_fresh_base_model(tmp_path):
    also_train = ("head", *LAYER_NORMS)
    state = trained_state(also_train)
    lora.save_adapters(tmp_path / "a", state, also_train=also_train)
    config = json.loads((tmp_path / "a" / lora.CONFIG_FILE).read_text())
    assert "head/kernel" in config["trained"] and "blocks/1/ln2/bias" in config["trained"]
    assert not any("/lora/" in name for name in config["trained"])

    tuned = state.model()
    base = gpt()  # the same pretrained weights (seed 0), no adapters
    assert not np.allclose(base(TOKENS), tuned(TOKENS), atol=1e-3)
    lora.load_adapters(tmp_path / "a", base)
    np.testing.assert_allclose(base(TOKENS), tuned(TOKENS), atol=1e-5)

    # Without also_train the files hold the adapters alone: the head stays the base's.
    lora.save_adapters(tmp_path / "b", state)
    assert json.loads((tmp_path / "b" / lora.CONFIG_FILE).read_text())["trained"] == []
    adapters_only = lora.load_adapters(tmp_path / "b", gpt())
    np.testing.assert_array_equal(adapters_only.head.kernel[...], gpt().head.kernel[...])


def test_saved_parameters_the_model_lacks_are_a_user_error(tmp_path):
    state = trained_state(("head",), steps=1)
    lora.save_adapters(tmp_path / "a", state, also_train=("head",))
    tied = jdl.models.GPT(61, 16, 32, 4, 2, tie_embeddings=True, rngs=nnx.Rngs(0))
    with pytest.raises(lora.LoRAError, match=r"\['head/kernel'\] are not parameters of GPT"):
        lora.load_adapters(tmp_path / "a", tied)
