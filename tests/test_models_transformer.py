"""Transformers: attention against NumPy and PyTorch, causality, KV-cache decoding, RoPE,
parameter counts of GPT-2 small and ViT-B/16, and short training runs."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jdl
from jdl.models.transformer import (
    GPT,
    EncoderClassifier,
    MultiHeadAttention,
    TransformerBlock,
    apply_rotary,
    generate,
    gpt_small,
    gpt_tiny,
    sample_logits,
)
from jdl.models.vit import ViT, patchify, vit_b16, vit_cifar, vit_tiny

EMBED, HEADS = 32, 4

# The programs here are tiny: they run in microseconds, but XLA:CPU spends seconds
# optimising each one. LLVM -O0 halves that; the XLA graph passes still run as usual.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def jit_module(fn: Callable) -> Callable:
    """`fast_jit` for `fn(module, *arrays)`: the module travels as (static graph, state)."""

    @functools.partial(fast_jit, static_argnums=0)
    def pure(graphdef, state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    return lambda module, *args: pure(*nnx.split(module), *args)


def _param_count(constructor) -> int:
    """Parameters of the model `constructor()` builds, from shapes only (no memory used)."""
    abstract = nnx.eval_shape(constructor)
    return jdl.count_params(nnx.state(abstract, nnx.Param))


def _numpy(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


@jit_module
def _attend(module: nnx.Module, x: jax.Array, mask: jax.Array) -> jax.Array:
    return module(x, mask=mask)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def _reference_attention(mha: MultiHeadAttention, x, mask, causal):
    """softmax(Q K^T / sqrt(d) + mask) V with the output projection, in float64 NumPy."""
    x = _numpy(x)
    batch, length, embed = x.shape
    qkv = x @ _numpy(mha.qkv.kernel[...]) + _numpy(mha.qkv.bias[...])
    q, k, v = np.split(qkv.reshape(batch, length, 3, HEADS, embed // HEADS), 3, axis=2)
    q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, D)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(embed // HEADS)  # (B, H, T, S)
    allowed = np.asarray(mask)[:, None, None, :]
    if causal:
        allowed = allowed & np.tril(np.ones((length, length), bool))
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, embed)
    return out @ _numpy(mha.out.kernel[...]) + _numpy(mha.out.bias[...])


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_numpy_softmax_formula(causal):
    mha = MultiHeadAttention(EMBED, HEADS, causal=causal, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, EMBED))
    mask = np.ones((2, 7), bool)
    mask[1, 4:] = False  # padding keys of the second sequence
    out = _attend(mha, x, jnp.asarray(mask))
    np.testing.assert_allclose(out, _reference_attention(mha, x, mask, causal), atol=1e-5)


def _copy_attention_to_torch(mha: MultiHeadAttention, target: torch.nn.MultiheadAttention):
    with torch.no_grad():
        target.in_proj_weight.copy_(torch.from_numpy(np.array(mha.qkv.kernel[...]).T))
        target.in_proj_bias.copy_(torch.from_numpy(np.array(mha.qkv.bias[...])))
        target.out_proj.weight.copy_(torch.from_numpy(np.array(mha.out.kernel[...]).T))
        target.out_proj.bias.copy_(torch.from_numpy(np.array(mha.out.bias[...])))


def _copy_linear_to_torch(linear: nnx.Linear, target: torch.nn.Linear):
    with torch.no_grad():
        target.weight.copy_(torch.from_numpy(np.array(linear.kernel[...]).T))
        target.bias.copy_(torch.from_numpy(np.array(linear.bias[...])))


def _copy_norm_to_torch(norm: nnx.LayerNorm, target: torch.nn.LayerNorm):
    with torch.no_grad():
        target.weight.copy_(torch.from_numpy(np.array(norm.scale[...])))
        target.bias.copy_(torch.from_numpy(np.array(norm.bias[...])))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_torch_multihead_attention(causal):
    mha = MultiHeadAttention(EMBED, HEADS, causal=causal, rngs=nnx.Rngs(2))
    reference = torch.nn.MultiheadAttention(EMBED, HEADS, batch_first=True).eval()
    _copy_attention_to_torch(mha, reference)
    x = np.array(jax.random.normal(jax.random.PRNGKey(3), (2, 7, EMBED)))
    mask = np.ones((2, 7), bool)
    mask[1, 4:] = False
    causal_mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1) if causal else None
    xt = torch.from_numpy(x)
    with torch.no_grad():  # torch masks mark what may NOT be attended to
        expected, _ = reference(
            xt, xt, xt, key_padding_mask=torch.from_numpy(~mask), attn_mask=causal_mask
        )
    np.testing.assert_allclose(_attend(mha, x, jnp.asarray(mask)), expected.numpy(), atol=1e-5)


def test_transformer_block_matches_torch_pre_norm_encoder_layer():
    block = TransformerBlock(EMBED, HEADS, rngs=nnx.Rngs(4))
    # nn.TransformerEncoderLayer with norm_first is the same pre-LN block; jdl's "gelu"
    # is the tanh approximation (as in GPT-2).
    reference = torch.nn.TransformerEncoderLayer(
        EMBED,
        HEADS,
        dim_feedforward=4 * EMBED,
        dropout=0.0,
        activation=lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        batch_first=True,
        norm_first=True,
    ).eval()
    _copy_attention_to_torch(block.attn, reference.self_attn)
    _copy_linear_to_torch(block.mlp.fc1, reference.linear1)
    _copy_linear_to_torch(block.mlp.fc2, reference.linear2)
    _copy_norm_to_torch(block.ln1, reference.norm1)
    _copy_norm_to_torch(block.ln2, reference.norm2)
    x = np.array(jax.random.normal(jax.random.PRNGKey(5), (2, 6, EMBED)))
    mask = np.ones((2, 6), bool)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x))
    np.testing.assert_allclose(_attend(block, x, jnp.asarray(mask)), expected.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------


def test_rotary_dot_products_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.PRNGKey(6), (2, 1, 16))  # (T=1, H=1, D=16) each
    positions = jnp.arange(12)

    @fast_jit
    def gram(q, k):  # G[m, n] = <q rotated to m, k rotated to n>
        rq = apply_rotary(jnp.broadcast_to(q, (12, 1, 16)), positions)[:, 0]  # (12, 16)
        rk = apply_rotary(jnp.broadcast_to(k, (12, 1, 16)), positions)[:, 0]
        return rq @ rk.T, rq

    g, rq = gram(q, k)
    g = np.asarray(g)
    np.testing.assert_allclose(g[1:, 1:], g[:-1, :-1], atol=1e-5)  # constant along diagonals
    assert np.ptp(np.diagonal(g, offset=3)) < 1e-5
    assert abs(g[0, 0] - g[0, 5]) > 1e-3  # ... but it does change with the offset
    np.testing.assert_allclose(rq[0], q[0], atol=1e-6)  # position 0 is the identity
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# GPT: causality, KV cache, generation
# ---------------------------------------------------------------------------------------------

VOCAB, MAX_LEN = 64, 24


@pytest.fixture(scope="module", params=["learned", "rotary"])
def small_gpt(request):
    return GPT(VOCAB, MAX_LEN, EMBED, HEADS, 2, positions=request.param, rngs=nnx.Rngs(7))


@jit_module
def _causality_probe(model: GPT, tokens: jax.Array, changed: jax.Array):
    """Full logits of two inputs, and the first one's logits via a prefill and a decode."""
    full, other = jnp.split(model(jnp.concatenate([tokens, changed])), 2)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    prefill, cache = model.decode(tokens[:, :9], cache, 0)
    rest, cache = model.decode(tokens[:, 9:], cache, 9)
    return full, other, jnp.concatenate([prefill, rest], axis=1)


def test_gpt_future_tokens_never_change_earlier_logits_and_cache_matches(small_gpt):
    tokens = jax.random.randint(jax.random.PRNGKey(8), (2, 16), 0, VOCAB)
    cut = 10
    changed = tokens.at[:, cut:].set((tokens[:, cut:] + 1) % VOCAB)
    full, other, decoded = _causality_probe(small_gpt, tokens, changed)
    assert full.shape == (2, 16, VOCAB) and full.dtype == jnp.float32
    assert np.max(np.abs(full[:, :cut] - other[:, :cut])) < 1e-6
    assert np.max(np.abs(full[:, cut:] - other[:, cut:])) > 1e-4  # the change is visible later
    np.testing.assert_allclose(decoded, full, atol=1e-5)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_kv_cache_generation_equals_recomputation(positions):
    model = GPT(VOCAB, MAX_LEN, EMBED, HEADS, 1, positions=positions, rngs=nnx.Rngs(8))
    prompt = jax.random.randint(jax.random.PRNGKey(9), (2, 5), 0, VOCAB)
    key = jax.random.PRNGKey(10)
    results = {}
    for temperature in (0.0, 1.0):  # traced: both share one compilation per path
        cached = generate(model, key, prompt, 12, temperature=temperature)
        recomputed = generate(model, key, prompt, 12, temperature=temperature, use_cache=False)
        assert cached.shape == (2, 17) and cached.dtype == jnp.int32
        np.testing.assert_array_equal(cached[:, :5], prompt)
        np.testing.assert_array_equal(cached, recomputed)
        results[temperature] = np.asarray(cached)
    assert (results[0.0] != results[1.0]).any()  # sampling is not greedy


def test_generate_rejects_too_long_and_sampling_rules():
    model = GPT(VOCAB, MAX_LEN, EMBED, HEADS, 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_len"):
        generate(model, jax.random.PRNGKey(0), jnp.zeros((1, MAX_LEN - 4), jnp.int32), 5)
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0]] * 256)
    keys = jax.random.PRNGKey(1)
    greedy = sample_logits(keys, logits, temperature=0.0)
    np.testing.assert_array_equal(greedy, 1)
    np.testing.assert_array_equal(sample_logits(keys, logits, top_k=1), 1)
    top2 = np.asarray(sample_logits(keys, logits, top_k=2))
    assert set(top2.tolist()) == {1, 3}


def test_gpt_init_scales_residual_projections():
    model = GPT(VOCAB, MAX_LEN, EMBED, HEADS, 8, rngs=nnx.Rngs(0))

    def std(get):
        return np.std(np.stack([np.asarray(get(block)[...]) for block in model.blocks]))

    assert std(lambda b: b.attn.qkv.kernel) == pytest.approx(0.02, rel=0.05)
    assert std(lambda b: b.mlp.fc1.kernel) == pytest.approx(0.02, rel=0.05)
    # Residual-stream writers: 0.02 / sqrt(2 * 8 layers).
    assert std(lambda b: b.attn.out.kernel) == pytest.approx(0.005, rel=0.05)
    assert std(lambda b: b.mlp.fc2.kernel) == pytest.approx(0.005, rel=0.05)
    assert std(lambda b: b.attn.qkv.bias) == 0


# ---------------------------------------------------------------------------------------------
# Parameter counts (abstract init: shapes only)
# ---------------------------------------------------------------------------------------------


def test_gpt2_small_has_124m_parameters():
    assert _param_count(lambda: gpt_small(rngs=nnx.Rngs(0))) == 124_439_808
    untied = _param_count(lambda: gpt_small(tie_embeddings=False, rngs=nnx.Rngs(0)))
    assert untied == 124_439_808 + 50257 * 768


def test_vit_b16_has_86m_parameters():
    assert _param_count(lambda: vit_b16(rngs=nnx.Rngs(0))) == 86_567_656


def test_named_configs_map_inputs_to_expected_shapes():
    def forward(constructor, x):  # shapes only: nothing is compiled or allocated
        return jax.eval_shape(lambda x: constructor(rngs=nnx.Rngs(0))(x), x)

    tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    assert forward(gpt_tiny, tokens).shape == (2, 128, 256)
    digits = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    assert forward(vit_tiny, digits).shape == (2, 10)
    rgb = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    assert forward(vit_cifar, rgb).shape == (2, 10)


def test_patchify_matches_strided_convolution():
    images = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    kernel = np.random.default_rng(1).normal(size=(4, 4, 3, 5)).astype(np.float32)

    @fast_jit
    def both(images, kernel):  # kernel (P, P, C, out)
        conv = jax.lax.conv_general_dilated(
            images, kernel, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )  # (2, 2, 3, 5)
        return patchify(images, 4) @ kernel.reshape(-1, 5), conv.reshape(2, 6, 5)

    dense, conv = both(images, kernel)
    np.testing.assert_allclose(dense, conv, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training with jdl steps
# ---------------------------------------------------------------------------------------------


def _next_token_loss(model, batch):
    logits = model(batch["tokens"][:, :-1])  # (B, T - 1, V)
    xent = jdl.losses.softmax_xent(logits=logits, labels=batch["tokens"][:, 1:])
    return {"loss": jnp.mean(xent, axis=-1)}


def _train(model, loss_fn, batch, steps):
    state = jdl.TrainState.create(model, optax.adam(3e-3), seed=0)
    step = fast_jit(jdl.make_train_step(loss_fn))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


def test_train_steps_lower_gpt_loss():
    model = GPT(VOCAB, MAX_LEN, EMBED, HEADS, 1, positions="rotary", rngs=nnx.Rngs(0))
    batch = {"tokens": jax.random.randint(jax.random.PRNGKey(13), (4, 17), 0, VOCAB)}
    losses = _train(model, _next_token_loss, batch, 20)
    assert losses[0] == pytest.approx(np.log(VOCAB), rel=0.05)  # GPT-2 init: near uniform
    assert losses[-1] < 0.8 * losses[0]


def test_train_steps_lower_vit_loss_with_dropout():
    model = ViT(28, 7, 1, 10, EMBED, HEADS, 1, dropout=0.1, rngs=nnx.Rngs(0))
    batch = {
        "x": jax.random.normal(jax.random.PRNGKey(14), (8, 28, 28, 1)),
        "y": jnp.arange(8) % 10,
    }
    losses = _train(model, jdl.classification_loss(), batch, 20)
    assert losses[0] == pytest.approx(np.log(10), rel=0.05)
    assert losses[-1] < 0.6 * losses[0]


# ---------------------------------------------------------------------------------------------
# Encoder classifier
# ---------------------------------------------------------------------------------------------


@jit_module
def _padding_probe(model: EncoderClassifier, tokens, other, mask, longer, longer_mask):
    """Logits with masked padding, other padding ids, extra padding, and no mask at all."""
    return model(tokens, mask), model(other, mask), model(longer, longer_mask), model(other)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_classifier_ignores_masked_padding(pooling):
    model = EncoderClassifier(VOCAB, MAX_LEN, EMBED, HEADS, 1, 3, pooling=pooling, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(15), (3, 12), 0, VOCAB)
    mask = np.arange(12)[None, :] < np.array([[12], [7], [3]])  # (3, 12): lengths 12, 7, 3
    other = jnp.where(mask, tokens, (tokens + 5) % VOCAB)  # different padding ids
    longer = jnp.concatenate([tokens, jnp.zeros((3, 4), jnp.int32)], axis=1)
    longer_mask = np.concatenate([mask, np.zeros((3, 4), bool)], axis=1)
    logits, other_logits, longer_logits, unmasked = _padding_probe(
        model, tokens, other, jnp.asarray(mask), longer, jnp.asarray(longer_mask)
    )
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32
    np.testing.assert_allclose(other_logits, logits, atol=1e-6)
    np.testing.assert_allclose(longer_logits, logits, atol=1e-5)
    np.testing.assert_allclose(unmasked[0], logits[0], atol=1e-6)  # no padding in row 0
    assert np.max(np.abs(unmasked[1:] - logits[1:])) > 1e-6  # unmasked padding does count


# ---------------------------------------------------------------------------------------------
# Pinned parameters and outputs
# ---------------------------------------------------------------------------------------------


def _digest(tree) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes (key arrays as their data)."""
    import hashlib

    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.asarray(leaf)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


_TOKENS = jnp.arange(24).reshape(2, 12) % 50
_PINNED_MODELS = {
    "gpt_learned": (lambda: GPT(50, 16, 32, 4, 2, dropout=0.1, rngs=nnx.Rngs(0)), _TOKENS),
    "gpt_rotary": (
        lambda: GPT(
            50,
            16,
            32,
            4,
            2,
            positions="rotary",
            tie_embeddings=False,
            activation="relu",
            layer_norm_eps=1e-6,
            mlp_ratio=2,
            rngs=nnx.Rngs(1),
        ),
        _TOKENS,
    ),
    "encoder_cls": (
        lambda: EncoderClassifier(
            50, 16, 32, 4, 2, 3, pooling="cls", dropout=0.1, rngs=nnx.Rngs(2)
        ),
        _TOKENS,
    ),
    "encoder_rotary": (
        lambda: EncoderClassifier(
            50, 16, 32, 4, 2, 3, positions="rotary", mlp_ratio=2, rngs=nnx.Rngs(3)
        ),
        _TOKENS,
    ),
    "vit": (
        lambda: ViT(
            8,
            4,
            3,
            5,
            32,
            4,
            2,
            dropout=0.1,
            activation="gelu_exact",
            layer_norm_eps=1e-12,
            rngs=nnx.Rngs(4),
        ),
        jnp.linspace(-1, 1, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3),
    ),
}
# (whole model state, train-mode output, eval-mode output), computed on CPU before the
# blocks were built from one `BlockConfig`: the construction must stay bitwise the same.
_PINNED = {
    "gpt_learned": ("d9ea106755d4b007", "5249ad55014c8804", "b1573e1b53dfa207"),
    "gpt_rotary": ("6b6d4511d9f050f7", "134cc94454311f4f", "134cc94454311f4f"),
    "encoder_cls": ("cff89f1f3aae7ca4", "840671bc6998d4a6", "a1ac54aac753ff53"),
    "encoder_rotary": ("4f139035666567bc", "f737ae223b6965a8", "f737ae223b6965a8"),
    "vit": ("7f5f4f4e70f01b13", "1912931c48abfd49", "239adb71307a25f4"),
}


@pytest.mark.parametrize("name", sorted(_PINNED))
def test_parameter_trees_and_outputs_are_pinned(name):
    build, x = _PINNED_MODELS[name]
    model = build()
    state = _digest(nnx.state(model))
    train_output = _digest(model(x))
    model.eval()
    assert (state, train_output, _digest(model(x))) == _PINNED[name]


def test_block_config_builds_the_block_its_keywords_build():
    from jdl.models.transformer import BlockConfig

    options = dict(causal=True, mlp_ratio=2, dropout=0.1, rotary=True, layer_norm_eps=1e-6)
    config = BlockConfig(EMBED, HEADS, **options)
    from_config = TransformerBlock.from_config(config, rngs=nnx.Rngs(5))
    from_keywords = TransformerBlock(EMBED, HEADS, **options, rngs=nnx.Rngs(5))
    assert _digest(nnx.state(from_config)) == _digest(nnx.state(from_keywords))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dropout = 0.0  # one config shared by every block: it cannot change under them
