"""Transformers: multi-head attention, pre-LayerNorm blocks, GPT, an encoder classifier.

Attention runs through `jax.nn.dot_product_attention`, so XLA (or cuDNN, when asked for
with `implementation="cudnn"`) can use a fused kernel. That function has no dropout on
the attention weights; the `dropout` of `MultiHeadAttention` is therefore applied to its
output (after the output projection), which is the residual dropout of GPT-2 and ViT.

Autoregressive decoding is pure: a `KVCache` is a pair of arrays passed in and returned
out, never stored in a module, so `generate` runs prefill plus one `jax.lax.scan` step per
token under a single `jax.jit`.

Shape letters: B batch, T query length, S key length, L cache capacity, C embed_dim,
H heads, D head_dim = C // H, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jdl.models.mlp import activation_fn
from jdl.models.sizes import check_sizes

# PyTorch's and GPT-2's LayerNorm epsilon (flax defaults to 1e-6).
LAYER_NORM_EPS = 1e-5
POSITIONS = ("learned", "rotary")
POOLINGS = ("mean", "cls")

Initializer = nnx.Initializer


class KVCache(NamedTuple):
    """Keys and values of one attention layer for positions `[0, L)`, each (B, L, H, D).

    Only the positions written so far are meaningful; attention masks out the rest.
    """

    key: jax.Array
    value: jax.Array


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------


def apply_rotary(x: jax.Array, positions: jax.Array, *, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (RoPE) of queries or keys.

    Channel pairs `(i, i + D/2)` are rotated by the angle `position * base^(-2i/D)`
    ("rotate half" layout). Rotations compose, so the dot product of a query rotated to
    position m and a key rotated to position n depends only on `m - n`.

    Args:
      x: float array (..., T, H, D) with D even.
      positions: int array (T,) or (B, T), the absolute position of each of the T rows.
      base: the wavelength base; 10,000 as in RoFormer and most language models.

    Returns:
      Array of `x`'s shape and dtype; angles are computed in float32.
    """
    dim = x.shape[-1]
    if dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {dim}")
    inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # (D/2,)
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # (..., T, D/2)
    cos = jnp.cos(angles)[..., None, :]  # (..., T, 1, D/2): shared by all heads
    sin = jnp.sin(angles)[..., None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attention and blocks
# ---------------------------------------------------------------------------------------------


class MultiHeadAttention(nnx.Module):
    """Multi-head self-attention with a fused q/k/v projection.

    Args:
      embed_dim: C, the model width; must be a multiple of `num_heads`.
      num_heads: H.
      causal: whether position t may only attend to positions <= t.
      dropout: rate of dropout on the output (see the module docstring: the fused
        attention has no dropout on the attention weights).
      use_bias: biases in the q/k/v and output projections.
      rotary: apply rotary position embeddings to queries and keys.
      rope_base: wavelength base of the rotary embeddings.
      kernel_init: initializer of the q/k/v kernel (flax's default if None).
      out_kernel_init: initializer of the output kernel (`kernel_init` if None).
      implementation: passed to `jax.nn.dot_product_attention` (None, "xla" or "cudnn").
      rngs: NNX random streams; `params` for init, `dropout` if dropout > 0.

    Call: `(B, T, C)` float, optional key mask `(B, T)` bool -> `(B, T, C)`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        dropout: float = 0.0,
        use_bias: bool = True,
        rotary: bool = False,
        rope_base: float = 10_000.0,
        kernel_init: Initializer | None = None,
        out_kernel_init: Initializer | None = None,
        implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        check_sizes("MultiHeadAttention", embed_dim=embed_dim, num_heads=num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.causal, self.rotary, self.rope_base = causal, rotary, rope_base
        self.implementation = implementation
        # One (C, 3C) matmul instead of three (C, C) ones; columns are [q | k | v].
        self.qkv = _linear(embed_dim, 3 * embed_dim, use_bias, kernel_init, rngs)
        self.out = _linear(embed_dim, embed_dim, use_bias, out_kernel_init or kernel_init, rngs)
        self.dropout = _dropout(dropout, rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Self-attention over the whole sequence.

        Args:
          x: float (B, T, C).
          mask: optional bool (B, T); False marks padding keys that no query may attend to.
            Padding queries still produce (meaningless) outputs.

        Returns:
          float (B, T, C).
        """
        q, k, v = self._project(x)  # each (B, T, H, D)
        q, k = self._rotate(q, k, jnp.arange(x.shape[1]))
        key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S)
        y = jax.nn.dot_product_attention(
            q, k, v, mask=key_mask, is_causal=self.causal, implementation=self.implementation
        )
        return self._merge_heads(y)

    def init_cache(self, batch_size: int, length: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
        """An empty cache with room for `length` positions: two zero arrays (B, L, H, D)."""
        shape = (batch_size, length, self.num_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def decode(
        self, x: jax.Array, cache: KVCache, position: jax.Array | int
    ) -> tuple[jax.Array, KVCache]:
        """Causal attention of S new positions against everything cached so far.

        Pure: the updated cache is returned, not stored. `S` may be a whole prompt
        (prefill, position 0) or a single token.

        Args:
          x: float (B, S, C), the inputs at positions `[position, position + S)`.
          cache: the keys and values of positions `[0, position)`, arrays (B, L, H, D).
          position: int scalar (may be traced), where `x` starts. The caller keeps
            `position + S <= L`; writes past the end are clamped by XLA, not reported.

        Returns:
          `(y, cache)`: y float (B, S, C); the cache with positions `[position, position + S)`
          written.
        """
        if not self.causal:
            raise ValueError("decode needs causal attention")
        q, k, v = self._project(x)  # each (B, S, H, D)
        positions = position + jnp.arange(x.shape[1])  # (S,)
        q, k = self._rotate(q, k, positions)
        start = (0, jnp.asarray(position, jnp.int32), 0, 0)
        cache = KVCache(
            jax.lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype), start),
            jax.lax.dynamic_update_slice(cache.value, v.astype(cache.value.dtype), start),
        )
        # Query at position p sees cached keys 0..p; unwritten slots are masked out.
        visible = jnp.arange(cache.key.shape[1])[None, :] <= positions[:, None]  # (S, L)
        y = jax.nn.dot_product_attention(
            q,
            cache.key.astype(q.dtype),
            cache.value.astype(q.dtype),
            mask=visible[None, None],  # (1, 1, S, L)
            implementation=self.implementation,
        )
        return self._merge_heads(y), cache

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        batch, length, _ = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, H, D)

    def _rotate(
        self, q: jax.Array, k: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Queries and keys (B, T, H, D) at `positions` (T,), rotated when `rotary`."""
        if not self.rotary:
            return q, k
        rotate = functools.partial(apply_rotary, positions=positions, base=self.rope_base)
        return rotate(q), rotate(k)

    def _merge_heads(self, y: jax.Array) -> jax.Array:
        y = self.out(y.reshape(*y.shape[:2], -1))  # (B, T, H * D) -> (B, T, C)
        return _apply_dropout(self.dropout, y)


class FeedForward(nnx.Module):
    """The position-wise MLP of a transformer block: dense, activation, dense, dropout.

    Call: `(B, T, C)` -> `(B, T, C)`, with a hidden width of `hidden_dim`.
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int,
        *,
        activation: str = "gelu",
        dropout: float = 0.0,
        kernel_init: Initializer | None = None,
        out_kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        self.activation = activation_fn(activation)
        self.fc1 = _linear(embed_dim, hidden_dim, True, kernel_init, rngs)
        self.fc2 = _linear(hidden_dim, embed_dim, True, out_kernel_init or kernel_init, rngs)
        self.dropout = _dropout(dropout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.activation(self.fc1(x))  # (B, T, hidden_dim)
        return _apply_dropout(self.dropout, self.fc2(h))  # (B, T, C)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Everything a `TransformerBlock` is built from; one per model, shared by its blocks.

    Fields (the keyword arguments of `TransformerBlock`):
      embed_dim: C, the model width.
      num_heads: H, the number of attention heads.
      causal: causal (decoder) or bidirectional (encoder) attention.
      mlp_ratio: hidden width of the MLP as a multiple of C (4 in GPT-2 and ViT).
      dropout: rate on the attention output and the MLP output (0 disables).
      activation: of the MLP; "gelu" is the tanh approximation, as in GPT-2.
      rotary: rotary position embeddings in the attention.
      rope_base: the rotary base frequency.
      use_bias: biases in the attention projections.
      kernel_init: initializer of the q/k/v and first MLP kernels (flax's default if None).
      residual_init: initializer of the two kernels that write into the residual stream
        (attention output and second MLP layer); `kernel_init` if None.
      implementation: see `MultiHeadAttention`.
      layer_norm_eps: epsilon of both LayerNorms (1e-5 as in PyTorch and GPT-2; ViT uses 1e-12).
    """

    embed_dim: int
    num_heads: int
    causal: bool = False
    mlp_ratio: int = 4
    dropout: float = 0.0
    activation: str = "gelu"
    rotary: bool = False
    rope_base: float = 10_000.0
    use_bias: bool = True
    kernel_init: Initializer | None = None
    residual_init: Initializer | None = None
    implementation: str | None = None
    layer_norm_eps: float = LAYER_NORM_EPS


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm transformer block: `x + attn(ln(x))`, then `x + mlp(ln(x))`.

    Args: the fields of `BlockConfig` (`TransformerBlock.from_config` takes one), and
      rngs: NNX random streams.

    Call: `(B, T, C)` float, optional key mask `(B, T)` bool -> `(B, T, C)`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        activation: str = "gelu",
        rotary: bool = False,
        rope_base: float = 10_000.0,
        use_bias: bool = True,
        kernel_init: Initializer | None = None,
        residual_init: Initializer | None = None,
        implementation: str | None = None,
        layer_norm_eps: float = LAYER_NORM_EPS,
        rngs: nnx.Rngs,
    ):
        self.ln1 = nnx.LayerNorm(embed_dim, epsilon=layer_norm_eps, rngs=rngs)
        self.attn = MultiHeadAttention(
            embed_dim,
            num_heads,
            causal=causal,
            dropout=dropout,
            use_bias=use_bias,
            rotary=rotary,
            rope_base=rope_base,
            kernel_init=kernel_init,
            out_kernel_init=residual_init,
            implementation=implementation,
            rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(embed_dim, epsilon=layer_norm_eps, rngs=rngs)
        self.mlp = FeedForward(
            embed_dim,
            mlp_ratio * embed_dim,
            activation=activation,
            dropout=dropout,
            kernel_init=kernel_init,
            out_kernel_init=residual_init,
            rngs=rngs,
        )

    @classmethod
    def from_config(cls, config: BlockConfig, *, rngs: nnx.Rngs) -> TransformerBlock:
        """The block `config` describes."""
        fields = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
        return cls(**fields, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)  # (B, T, C)
        return x + self.mlp(self.ln2(x))

    def decode(
        self, x: jax.Array, cache: KVCache, position: jax.Array | int
    ) -> tuple[jax.Array, KVCache]:
        """`__call__` for S new positions with a KV cache; see `MultiHeadAttention.decode`."""
        attended, cache = self.attn.decode(self.ln1(x), cache, position)
        x = x + attended  # (B, S, C)
        return x + self.mlp(self.ln2(x)), cache


@nnx.remat
def checkpointed_block(
    block: TransformerBlock, x: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """`block(x, mask=mask)`, with the block's activations recomputed in the backward pass.

    Only the block's input is kept for the backward pass (instead of every attention
    and MLP activation), at the cost of running the block's forward pass twice. The
    outputs and gradients are the same as without it.
    """
    return block(x, mask=mask)


def block_stack(num_layers: int, config: BlockConfig, *, rngs: nnx.Rngs) -> nnx.List:
    """`num_layers` `TransformerBlock`s of `config`, built first to last.

    Built in order, so the blocks draw their initial parameters from `rngs` in layer
    order (as a list comprehension would).
    """
    return nnx.List([TransformerBlock.from_config(config, rngs=rngs) for _ in range(num_layers)])


def apply_blocks(
    blocks: nnx.List, x: jax.Array, *, mask: jax.Array | None = None, remat: bool = False
) -> jax.Array:
    """`x` (B, T, C) through every block in order; `remat` recomputes each block's
    activations in the backward pass (`checkpointed_block`)."""
    for block in blocks:
        x = checkpointed_block(block, x, mask) if remat else block(x, mask=mask)
    return x


# ---------------------------------------------------------------------------------------------
# GPT
# ---------------------------------------------------------------------------------------------


class GPT(nnx.Module):
    """A GPT-2 style decoder-only language model.

    Token (+ learned position) embeddings, `num_layers` causal pre-LN blocks, a final
    LayerNorm and a linear head onto the vocabulary (the transposed token embedding when
    `tie_embeddings`). Initialisation follows GPT-2: weights normal(0, 0.02), biases 0,
    and the kernels that write into the residual stream normal(0, 0.02 / sqrt(2 * layers)),
    so the residual stream's variance does not grow with depth.

    Args:
      vocab_size: V.
      max_len: the context length: the longest sequence the model (and `generate`) takes.
      embed_dim: C, the model width.
      num_heads: H, the number of attention heads.
      num_layers: the number of blocks.
      positions: "learned" (a table of `max_len` embeddings, as in GPT-2) or "rotary".
      tie_embeddings: share the token embedding with the output head.
      dropout: rate on the embeddings and inside every block (0 disables).
      mlp_ratio: MLP hidden width as a multiple of C.
      activation: of the MLPs; "gelu" is the tanh approximation, GPT-2's "gelu_new".
      layer_norm_eps: epsilon of every LayerNorm (GPT-2's `layer_norm_epsilon`).
      remat: recompute each block's activations in the backward pass
        (`checkpointed_block`): less memory for training, about one more forward pass.
      rngs: NNX random streams; `params` for init, `dropout` if dropout > 0.

    Call: `(B, T)` int tokens, T <= max_len -> `(B, T, V)` float32 logits.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        *,
        positions: str = "learned",
        tie_embeddings: bool = True,
        dropout: float = 0.0,
        mlp_ratio: int = 4,
        activation: str = "gelu",
        layer_norm_eps: float = LAYER_NORM_EPS,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            "GPT",
            vocab_size=vocab_size,
            max_len=max_len,
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_layers=num_layers,
            mlp_ratio=mlp_ratio,
        )
        _check_choice("positions", positions, POSITIONS)
        self.vocab_size, self.max_len, self.positions = vocab_size, max_len, positions
        self.remat = remat
        init = nnx.initializers.normal(0.02)
        residual_init = nnx.initializers.normal(0.02 / math.sqrt(2 * num_layers))
        self.token_embed = nnx.Embed(vocab_size, embed_dim, embedding_init=init, rngs=rngs)
        self.position_embed = (
            nnx.Embed(max_len, embed_dim, embedding_init=init, rngs=rngs)
            if positions == "learned"
            else None
        )
        self.dropout = _dropout(dropout, rngs)
        block = BlockConfig(
            embed_dim,
            num_heads,
            causal=True,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            activation=activation,
            rotary=positions == "rotary",
            kernel_init=init,
            residual_init=residual_init,
            layer_norm_eps=layer_norm_eps,
        )
        self.blocks = block_stack(num_layers, block, rngs=rngs)
        self.ln_f = nnx.LayerNorm(embed_dim, epsilon=layer_norm_eps, rngs=rngs)
        self.head = (
            None
            if tie_embeddings
            else nnx.Linear(embed_dim, vocab_size, use_bias=False, kernel_init=init, rngs=rngs)
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {self.max_len}")
        x = self._embed(tokens, jnp.arange(tokens.shape[1]))  # (B, T, C)
        x = apply_blocks(self.blocks, x, remat=self.remat)
        return self._logits(x)  # (B, T, V)

    def init_cache(
        self, batch_size: int, length: int | None = None, dtype: jnp.dtype = jnp.float32
    ) -> tuple[KVCache, ...]:
        """Empty per-layer caches with room for `length` (default `max_len`) positions."""
        length = self.max_len if length is None else length
        return tuple(block.attn.init_cache(batch_size, length, dtype) for block in self.blocks)

    def decode(
        self, tokens: jax.Array, cache: tuple[KVCache, ...], position: jax.Array | int
    ) -> tuple[jax.Array, tuple[KVCache, ...]]:
        """Logits of S new tokens given the cache of everything before them.

        Args:
          tokens: int (B, S), the tokens at positions `[position, position + S)`.
          cache: from `init_cache` or a previous `decode`, one `KVCache` per block.
          position: int scalar (may be traced).

        Returns:
          `(logits, cache)`: logits float32 (B, S, V), equal (up to rounding) to
          `model(all_tokens)[:, position:position + S]`; the updated caches.
        """
        x, cache = self._decode_hidden(tokens, cache, position)
        return self._logits(x), cache

    def _decode_hidden(
        self, tokens: jax.Array, cache: tuple[KVCache, ...], position: jax.Array | int
    ) -> tuple[jax.Array, tuple[KVCache, ...]]:
        x = self._embed(tokens, position + jnp.arange(tokens.shape[1]))  # (B, S, C)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block.decode(x, layer_cache, position)
            new_cache.append(layer_cache)
        return x, tuple(new_cache)  # x before the final LayerNorm

    def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = self.token_embed(tokens)  # (B, T, C)
        if self.position_embed is not None:
            x = x + self.position_embed(positions)  # (T, C) broadcast over the batch
        return _apply_dropout(self.dropout, x)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.ln_f(x)
        logits = self.token_embed.attend(x) if self.head is None else self.head(x)
        return logits.astype(jnp.float32)  # (..., V)


def gpt_tiny(*, rngs: nnx.Rngs, **overrides) -> GPT:
    """A GPT for tests and toy data: vocab 256 (bytes), context 128, 2 layers of width 64."""
    config = dict(vocab_size=256, max_len=128, embed_dim=64, num_heads=4, num_layers=2)
    return GPT(**{**config, **overrides}, rngs=rngs)


def gpt_small(*, rngs: nnx.Rngs, **overrides) -> GPT:
    """GPT-2 small: 12 layers, width 768, 12 heads, vocab 50257, context 1024 (124M params)."""
    config = dict(vocab_size=50257, max_len=1024, embed_dim=768, num_heads=12, num_layers=12)
    return GPT(**{**config, **overrides}, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def generate(
    model: GPT,
    key: jax.Array,
    prompt: jax.Array,
    num_tokens: int,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
    use_cache: bool = True,
) -> jax.Array:
    """Samples `num_tokens` continuation tokens from `model` (in eval mode: no dropout).

    With the cache, the prompt is run once (prefill) and then one token per
    `jax.lax.scan` step. Without it, every step recomputes the full forward pass over a
    fixed `(B, prompt_len + num_tokens)` buffer, so it too compiles once. Both draw
    token i with the key `jax.random.split(key, num_tokens)[i]` and so return the same
    tokens, up to floating-point ties.

    Args:
      model: a `GPT`; it is not modified.
      key: PRNG key of the sampling.
      prompt: int (B, P) with P >= 1 and `P + num_tokens <= model.max_len`.
      num_tokens: how many tokens to append.
      temperature: divides the logits; 0 means greedy (argmax).
      top_k: sample only among the k most likely tokens (None: all); 1 means greedy.
      top_p: nucleus sampling: only among the most likely tokens whose probabilities
        (after temperature and top-k) add up to at least `top_p`, in (0, 1]; None or 1
        keeps all. Traced, like `temperature`: a new value does not recompile.
      use_cache: decode with a KV cache (fast) or by recomputation.

    Returns:
      int32 (B, P + num_tokens): the prompt followed by the generated tokens.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (B, P) with P >= 1, got shape {prompt.shape}")
    if prompt.shape[1] + num_tokens > model.max_len:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + num_tokens {num_tokens} exceeds "
            f"max_len {model.max_len}"
        )
    _check_sampling(temperature, top_k, top_p)
    if num_tokens == 0:
        return prompt
    graphdef, state = nnx.split(model)
    run = _generate_cached if use_cache else _generate_recompute
    temperature = jnp.asarray(temperature, jnp.float32)  # traced: no recompile per value
    top_p = None if top_p is None else jnp.asarray(top_p, jnp.float32)
    return run(graphdef, state, key, prompt, temperature, top_p, num_tokens=num_tokens, top_k=top_k)


def _check_sampling(temperature, top_k: int | None, top_p) -> None:
    """ValueError for a negative temperature, top_k < 1 or top_p outside (0, 1]."""
    if isinstance(temperature, int | float) and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if isinstance(top_p, int | float) and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def sample_logits(
    key: jax.Array,
    logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """One token per row of `logits` (B, V): int32 (B,).

    Greedy (argmax) when `temperature` is 0 or `top_k` is 1. Otherwise the logits are
    divided by `temperature`, cut to the `top_k` largest, then to the nucleus: the
    smallest set of most likely tokens whose probabilities add up to at least `top_p`
    (the most likely token always stays), and the token is drawn from the softmax of
    what is left, i.e. from the renormalised nucleus. Tokens tied at a cut-off are kept.

    `temperature` and `top_p` may be traced, so changing them does not recompile;
    `top_k` fixes a shape and must be a Python int; `top_p` None (or 1) keeps all tokens.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k == 1:
        return greedy
    temperature = jnp.asarray(temperature, jnp.float32)
    # The division is guarded so that temperature 0 yields no NaN in the unused branch.
    logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    if top_k is not None:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]  # (B, 1)
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None:
        logits = _nucleus(logits, jnp.asarray(top_p, jnp.float32))
    sampled = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def _nucleus(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """`logits` (B, V) with every token outside the top-p nucleus set to -inf."""
    descending = jnp.sort(logits, axis=-1)[..., ::-1]  # (B, V)
    probs = jax.nn.softmax(descending, axis=-1)
    # A token is in the nucleus when the tokens more likely than it hold < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # (B, 1), >= 1
    threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)  # smallest kept logit
    # top_p >= 1 keeps everything, also the tokens that rounding would push past 1.
    return jnp.where((logits < threshold) & (top_p < 1), -jnp.inf, logits)


def generate_text(
    model: GPT,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> str:
    """The prompt and up to `max_new_tokens` sampled tokens after it, decoded as text.

    Text in, text out on top of `generate` (KV-cache decoding). A continuation longer than
    the context slides: when the text reaches `model.max_len` tokens, the last half
    context becomes the prompt of the next round, so at most three shapes compile.

    Args:
      model: a `GPT` (not modified; sampled in eval mode).
      tokenizer: has `encode(str) -> int ids` and `decode(ids) -> str`, with ids below
        the model's vocabulary size: a `jdl.data.tokenizer.BPETokenizer` (e.g. from
        `jdl.hf.load_pretrained(..., with_tokenizer=True)`) or a `jdl.CharVocab`.
      prompt: the text to continue; it must encode to at least one token.
      max_new_tokens: how many tokens to sample (>= 0).
      temperature: divides the logits; 0 means greedy (argmax).
      top_k: sample among the k most likely tokens only (None: all).
      top_p: nucleus sampling threshold in (0, 1] (None: off); see `sample_logits`.
      seed: the sampling's seed; the same seed gives the same text.

    Returns:
      `tokenizer.decode(prompt ids + new ids)`: the prompt (as the tokenizer decodes it,
      which is the prompt itself for byte-level BPE) followed by the continuation.

    Raises:
      ValueError: an empty prompt, a negative `max_new_tokens`, a bad sampling argument,
        or a token id the model's vocabulary does not have.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens and model.max_len < 2:
        raise ValueError(f"a model with max_len {model.max_len} has no room to continue text")
    _check_sampling(temperature, top_k, top_p)
    prompt_ids = [int(token) for token in tokenizer.encode(prompt)]
    if not prompt_ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens; give at least one")
    if max(prompt_ids) >= model.vocab_size:
        raise ValueError(
            f"the tokenizer gives id {max(prompt_ids)} but the model has only "
            f"{model.vocab_size} tokens; use the model's own tokenizer"
        )
    half = max(1, model.max_len // 2)
    new_ids: list[int] = []
    key = jax.random.PRNGKey(seed)
    while len(new_ids) < max_new_tokens:
        context = (prompt_ids + new_ids)[-model.max_len :]
        if len(context) == model.max_len:
            context = context[-half:]  # full context: slide by half a context
        count = min(max_new_tokens - len(new_ids), model.max_len - len(context))
        key, round_key = jax.random.split(key)
        tokens = generate(
            model,
            round_key,
            jnp.asarray([context], jnp.int32),
            count,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
        new_ids += [int(token) for token in jax.device_get(tokens[0, len(context) :])]
    return tokenizer.decode(prompt_ids + new_ids)


_GENERATE_STATIC = ("graphdef", "num_tokens", "top_k")


@functools.partial(jax.jit, static_argnames=_GENERATE_STATIC)
def _generate_cached(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    key: jax.Array,
    prompt: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array | None,
    *,
    num_tokens: int,
    top_k: int | None,
) -> jax.Array:
    model = _eval_model(graphdef, state)
    batch, prompt_len = prompt.shape
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    keys = jax.random.split(key, num_tokens)
    cache = model.init_cache(batch, prompt_len + num_tokens)
    # Prefill; only the last position needs logits ((B, P, V) would be large).
    hidden, cache = model._decode_hidden(prompt, cache, 0)  # (B, P, C)
    first = sample(keys[0], model._logits(hidden[:, -1]))  # (B,)

    def step(carry, step_key):
        token, cache, position = carry
        logits, cache = model.decode(token[:, None], cache, position)  # (B, 1, V)
        token = sample(step_key, logits[:, 0])
        return (token, cache, position + 1), token

    _, rest = jax.lax.scan(step, (first, cache, jnp.int32(prompt_len)), keys[1:])  # (N-1, B)
    return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnames=_GENERATE_STATIC)
def _generate_recompute(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    key: jax.Array,
    prompt: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array | None,
    *,
    num_tokens: int,
    top_k: int | None,
) -> jax.Array:
    model = _eval_model(graphdef, state)
    batch, prompt_len = prompt.shape
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    buffer = jnp.zeros((batch, prompt_len + num_tokens), jnp.int32).at[:, :prompt_len].set(prompt)

    def step(buffer, inputs):
        position, step_key = inputs
        # Causal attention: the zeros after `position` do not affect the logits used here.
        logits = model(buffer)  # (B, P + N, V)
        last = jax.lax.dynamic_index_in_dim(logits, position - 1, axis=1, keepdims=False)
        token = sample(step_key, last)  # (B,)
        return jax.lax.dynamic_update_slice(buffer, token[:, None], (0, position)), None

    positions = jnp.arange(prompt_len, prompt_len + num_tokens, dtype=jnp.int32)
    buffer, _ = jax.lax.scan(step, buffer, (positions, jax.random.split(key, num_tokens)))
    return buffer


def _eval_model(graphdef: nnx.GraphDef, state: nnx.State) -> GPT:
    model = nnx.merge(graphdef, state)
    model.eval()  # a fresh copy inside the trace: the caller's module keeps its mode
    return model


# ---------------------------------------------------------------------------------------------
# Encoder classifier
# ---------------------------------------------------------------------------------------------


class EncoderClassifier(nnx.Module):
    """A bidirectional (BERT-style) transformer encoder that classifies token sequences.

    Args:
      vocab_size: V, the number of tokens.
      max_len: the longest input sequence.
      embed_dim: C, the model width.
      num_heads: H, the number of attention heads.
      num_layers: the number of blocks.
      num_classes: outputs of the head.
      pooling: "mean" (average of the non-padding token outputs) or "cls" (the output of
        a learned class token prepended to the sequence).
      positions: "learned" or "rotary".
      dropout: rate on the embeddings and inside every block (0 disables).
      mlp_ratio: MLP hidden width as a multiple of C.
      remat: recompute each block's activations in the backward pass (see `GPT`).
      rngs: NNX random streams.

    Call: `(B, T)` int tokens, optional mask `(B, T)` bool (False = padding) ->
    `(B, num_classes)` logits. Padding positions influence neither the other tokens
    (they are masked out as attention keys) nor the pooled vector.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        num_classes: int,
        *,
        pooling: str = "mean",
        positions: str = "learned",
        dropout: float = 0.0,
        mlp_ratio: int = 4,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            "EncoderClassifier",
            vocab_size=vocab_size,
            max_len=max_len,
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_layers=num_layers,
            num_classes=num_classes,
            mlp_ratio=mlp_ratio,
        )
        _check_choice("pooling", pooling, POOLINGS)
        _check_choice("positions", positions, POSITIONS)
        self.max_len, self.pooling, self.remat = max_len, pooling, remat
        init = nnx.initializers.normal(0.02)
        self.token_embed = nnx.Embed(vocab_size, embed_dim, embedding_init=init, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, embed_dim))) if pooling == "cls" else None
        num_positions = max_len + (pooling == "cls")
        self.position_embed = (
            nnx.Embed(num_positions, embed_dim, embedding_init=init, rngs=rngs)
            if positions == "learned"
            else None
        )
        self.dropout = _dropout(dropout, rngs)
        block = BlockConfig(
            embed_dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            rotary=positions == "rotary",
            kernel_init=init,
        )
        self.blocks = block_stack(num_layers, block, rngs=rngs)
        self.ln_f = nnx.LayerNorm(embed_dim, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.head = nnx.Linear(embed_dim, num_classes, kernel_init=init, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        batch, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        mask = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
        x = self.token_embed(tokens)  # (B, T, C)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...], (batch, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)  # (B, 1 + T, C)
            mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask], axis=1)
        if self.position_embed is not None:
            x = x + self.position_embed(jnp.arange(x.shape[1]))
        x = _apply_dropout(self.dropout, x)
        x = apply_blocks(self.blocks, x, mask=mask, remat=self.remat)
        x = self.ln_f(x)
        if self.pooling == "cls":
            pooled = x[:, 0]  # (B, C)
        else:
            weights = mask[..., None].astype(x.dtype)  # (B, T, 1)
            pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return self.head(pooled)  # (B, num_classes)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _linear(
    in_features: int,
    out_features: int,
    use_bias: bool,
    kernel_init: Initializer | None,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    extra = {} if kernel_init is None else {"kernel_init": kernel_init}
    return nnx.Linear(in_features, out_features, use_bias=use_bias, rngs=rngs, **extra)


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
    # No module (and no RNG stream in the state) when dropout is off.
    return nnx.Dropout(rate, rngs=rngs) if rate > 0 else None


def _apply_dropout(dropout: nnx.Dropout | None, x: jax.Array) -> jax.Array:
    return x if dropout is None else dropout(x)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
