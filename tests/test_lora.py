"""LoRA: zero-initialised adapters change nothing, merging is exact, training moves only the
adapters, and adapter files round-trip on their own."""

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
IMAGES = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))


def gpt(seed: int = 0, **overrides) -> jdl.models.GPT:
    config = dict(vocab_size=61, max_len=16, embed_dim=32, num_heads=4, num_layers=2)
    return jdl.models.GPT(**{**config, **overrides}, rngs=nnx.Rngs(seed))


def vit(seed: int = 0) -> jdl.models.ViT:
    return jdl.models.ViT(16, 4, 3, 5, 32, 4, 2, rngs=nnx.Rngs(seed))


def randomize_b(model: nnx.Module, seed: int = 3, std: float = 0.05) -> None:
    """Non-zero B matrices, so that the adapters change the function."""
    for i, (_, layer) in enumerate(lora.lora_layers(model)):
        b = layer.lora.lora_b
        b.set_value(std * jax.random.normal(jax.random.PRNGKey(seed + i), b[...].shape))


def flat_params(model_or_params) -> dict[str, np.ndarray]:
    params = (
        nnx.state(model_or_params, nnx.Param)
        if isinstance(model_or_params, nnx.Module)
        else model_or_params
    )
    return {
        param_path(path): np.asarray(value)
        for path, value in jax.tree_util.tree_flatten_with_path(params)[0]
    }


@pytest.mark.parametrize(
    "make, inputs, per_block",
    [(gpt, TOKENS, 4), (vit, IMAGES, 4)],
    ids=["gpt", "vit"],
)
def test_zero_initialised_adapters_leave_outputs_unchanged(make, inputs, per_block):
    model = make()
    model.eval()
    before = model(inputs)
    lora.add_lora(model, rank=4, alpha=16.0)
    layers = lora.lora_layers(model)
    assert len(layers) == per_block * len(model.blocks)
    assert {path.split("/", 2)[2] for path, _ in layers} == {
        "attn/qkv",
        "attn/out",
        "mlp/fc1",
        "mlp/fc2",
    }
    assert all(np.any(np.asarray(layer.lora.lora_a[...]) != 0) for _, layer in layers)
    np.testing.assert_array_equal(model(inputs), before)  # B = 0: bit for bit


@pytest.mark.parametrize("make, inputs", [(gpt, TOKENS), (vit, IMAGES)], ids=["gpt", "vit"])
def test_merged_model_equals_adapter_model(make, inputs):
    reference = make()
    model = make()
    lora.add_lora(model, rank=4, alpha=8.0)
    randomize_b(model)
    model.eval()
    adapted = model(inputs)
    reference.eval()
    assert np.abs(adapted - reference(inputs)).max() > 1e-3  # the adapters matter

    merged = lora.merge(model)
    np.testing.assert_allclose(merged(inputs), adapted, atol=1e-6, rtol=0)
    # The merged model is the plain architecture again: same paths, shapes and types.
    assert type(merged) is type(reference)
    assert lora.lora_layers(merged) == []
    want = {k: v.shape for k, v in flat_params(reference).items()}
    assert {k: v.shape for k, v in flat_params(merged).items()} == want
    # merge copies: the adapted model keeps its adapters and function.
    assert len(lora.lora_layers(model)) == 4 * len(model.blocks)
    np.testing.assert_array_equal(model(inputs), adapted)
    # The kernel is W + (alpha / rank) A B.
    layer = dict(lora.lora_layers(model))["blocks/0/attn/qkv"]
    expected = layer.base.kernel[...] + 2.0 * layer.lora.lora_a[...] @ layer.lora.lora_b[...]
    np.testing.assert_allclose(merged.blocks[0].attn.qkv.kernel[...], expected, atol=1e-7)


def lm_loss(model, batch):
    logits = model(batch["x"])
    return {"loss": jdl.losses.softmax_xent(logits=logits, labels=batch["y"]).mean(axis=-1)}


def test_training_changes_only_the_adapters_and_optimizer_holds_only_them():
    model = gpt(tie_embeddings=False)
    lora.add_lora(model, rank=4)
    adapters, total = lora.count_adapter_params(model)
    # qkv 4*(32+96), out 4*(32+32), fc1 4*(32+128), fc2 4*(128+32) per block, 2 blocks.
    assert adapters == 2 * 4 * (128 + 64 + 160 + 160)
    state = jdl.TrainState.create(model, lora.optimizer(optax.adam(1e-2)))
    opt_size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state))
    assert opt_size == 2 * adapters + 1  # Adam's two moments of the adapters, and a count

    step = jax.jit(jdl.make_train_step(lm_loss))
    batch = {"x": TOKENS, "y": jnp.roll(TOKENS, -1, axis=1)}
    before = flat_params(state.params)
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    after = flat_params(state.params)
    assert losses[-1] < losses[0]
    for name, value in before.items():
        if "/lora/lora_" in name:
            assert not np.array_equal(after[name], value), name  # A and B both trained
        else:
            assert after[name].tobytes() == value.tobytes(), name  # frozen bit for bit


def test_also_train_unfreezes_named_parameters():
    model = gpt(tie_embeddings=False)
    lora.add_lora(model, rank=2, targets=["*attn/qkv"])
    state = jdl.TrainState.create(
        model, lora.optimizer(optax.sgd(0.1), also_train=("head", "ln_f"))
    )
    step = jax.jit(jdl.make_train_step(lm_loss))
    before = flat_params(state.params)
    state, _ = step(state, {"x": TOKENS, "y": TOKENS})
    after = flat_params(state.params)
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert {"head/kernel", "ln_f/scale", "ln_f/bias"} <= changed
    assert all(n.startswith(("head", "ln_f")) or "/lora/" in n for n in changed), changed
    assert not any("fc1" in n or "token_embed" in n for n in changed)


def test_adapter_checkpoint_round_trips_alone(tmp_path):
    model = gpt(tie_embeddings=False)
    lora.add_lora(model, rank=4, alpha=8.0, targets=lora.DEFAULT_TARGETS + ("head",))
    randomize_b(model)
    model.eval()
    want = model(TOKENS)
    state = jdl.TrainState.create(model, lora.optimizer(optax.adam(1e-3)))
    lora.save_adapters(tmp_path / "adapters", state)

    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "adapters" / lora.ADAPTERS_FILE))
    assert set(saved) == {n for n in flat_params(model) if "/lora/lora_" in n}
    config = json.loads((tmp_path / "adapters" / lora.CONFIG_FILE).read_text())
    assert config["layers"]["head"] == {"rank": 4, "alpha": 8.0}

    # Into the base model alone: the recorded adapters are added, then filled.
    base = gpt(tie_embeddings=False)
    base.eval()
    assert np.abs(base(TOKENS) - want).max() > 1e-3
    restored = lora.load_adapters(tmp_path / "adapters", base)
    assert restored is base
    np.testing.assert_array_equal(base(TOKENS), want)
    # Into a model adapted the same way: its own adapters are overwritten.
    again = lora.add_lora(
        gpt(tie_embeddings=False), rank=4, alpha=8.0, targets=lora.DEFAULT_TARGETS + ("head",)
    )
    again.eval()
    lora.load_adapters(tmp_path / "adapters", again)
    np.testing.assert_array_equal(again(TOKENS), want)
    for name, value in saved.items():
        np.testing.assert_array_equal(flat_params(again)[name], value)


def test_adapter_files_that_do_not_fit_are_user_errors(tmp_path):
    model = lora.add_lora(gpt(), rank=4)
    lora.save_adapters(tmp_path / "a", model)
    other_rank = lora.add_lora(gpt(), rank=2, alpha=4.0)  # same scale numerator
    with pytest.raises(lora.LoRAError, match="saved shape .* does not fit") as caught:
        lora.load_adapters(tmp_path / "a", other_rank)
    assert isinstance(caught.value, jdl.UserError) and "\n" not in str(caught.value)
    fewer = lora.add_lora(gpt(), rank=4, targets=["*attn/qkv"])
    with pytest.raises(lora.LoRAError, match="differ from the saved ones"):
        lora.load_adapters(tmp_path / "a", fewer)
    with pytest.raises(lora.LoRAError, match="has no adapter_config.json"):
        lora.load_adapters(tmp_path / "nothing", gpt())
    (tmp_path / "a" / lora.ADAPTERS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(lora.LoRAError, match="cannot read the adapters"):
        lora.load_adapters(tmp_path / "a", gpt())
    with pytest.raises(lora.LoRAError, match="no LoRA adapters to save"):
        lora.save_adapters(tmp_path / "b", gpt())


def test_add_lora_errors():
    with pytest.raises(lora.LoRAError, match="no dense layer of GPT matches") as caught:
        lora.add_lora(gpt(), targets=["*attention*"])
    assert isinstance(caught.value, ValueError) and "blocks/0/attn/qkv" in str(caught.value)
    model = lora.add_lora(gpt(), rank=2)
    with pytest.raises(lora.LoRAError, match="already has a LoRA adapter"):
        lora.add_lora(model, rank=2)
    with pytest.raises(lora.LoRAError, match="rank must be >= 1"):
        lora.add_lora(gpt(), rank=0)
    with pytest.raises(lora.LoRAError, match="hold no LoRA adapter"):
        jdl.TrainState.create(gpt(), lora.optimizer(optax.adam(1e-3)))
    # A predicate selects as well as patterns do.
    picked = lora.add_lora(gpt(), targets=lambda path, layer: layer.out_features == 32 * 4)
    assert [p for p, _ in lora.lora_layers(picked)] == ["blocks/0/mlp/fc1", "blocks/1/mlp/fc1"]
