"""Encoder-decoder (sequence-to-sequence) models, their loss, decoding and error rates.

Two models share one interface, so the same loss, greedy decoding and beam search serve
both:

- `Seq2SeqTransformer`: token + learned position embeddings, pre-LN encoder blocks
  (`jdl.models.transformer.TransformerBlock`, bidirectional, source padding masked),
  decoder blocks of causal self-attention, cross-attention onto the encoder output and an
  MLP, a final LayerNorm and a tied (or untied) output projection.
- `Seq2SeqGRU`: a bidirectional GRU encoder and a GRU decoder with Luong ("general")
  attention, the recurrent baseline.

The interface (token ids are int32; `pad_id` 0 marks source padding):
  `model(src (B, S), tgt_in (B, T)) -> logits (B, T, V)`  teacher forcing
  `model.encode(src) -> memory`                            a pytree, batch-leading leaves
  `model.init_decoder(memory, length) -> state`            a pytree, batch-leading leaves
  `model.decode_step(tokens (B,), state, memory, position) -> (logits (B, V), state)`

Decoding is pure and jitted: the decoder state (for the transformer, one `KVCache` of
the self-attention per layer; the cross-attention keys and values are computed once, in
`encode`) is passed in and out of a `jax.lax.while_loop` of at most `max_len` steps.

Shape letters: B batch, S source length, T target length, K beam size, C width, V
target vocabulary, H heads, D head width.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdl import losses as losses_lib
from jdl.models.rnn import RNN, GRUCell, scan_cell
from jdl.models.sizes import check_sizes
from jdl.models.transformer import (
    LAYER_NORM_EPS,
    BlockConfig,
    FeedForward,
    KVCache,
    MultiHeadAttention,
    _apply_dropout,
    _dropout,
    _linear,
    block_stack,
)

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
Memory = Any  # what `encode` returns
DecoderState = Any  # what `init_decoder` returns


# ---------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------


class CrossAttention(nnx.Module):
    """Multi-head attention of decoder queries onto encoder outputs (the "memory").

    The memory's keys and values are projected once (`memory_kv`) and reused by every
    decoder step. Dropout, as in `MultiHeadAttention`, is on the output.

    Call: `x (B, T, C)`, `memory_kv` (keys, values (B, S, H, D)), `mask (B, S)` bool
    (False: padding) -> `(B, T, C)`.
    """

    def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs):
        c, heads = config.embed_dim, config.num_heads
        self.num_heads, self.head_dim = heads, c // heads
        self.implementation = config.implementation
        self.query = _linear(c, c, config.use_bias, config.kernel_init, rngs)
        self.key_value = _linear(c, 2 * c, config.use_bias, config.kernel_init, rngs)
        self.out = _linear(c, c, config.use_bias, config.residual_init or config.kernel_init, rngs)
        self.dropout = _dropout(config.dropout, rngs)

    def memory_kv(self, memory: jax.Array) -> KVCache:
        """Keys and values (B, S, H, D) of the memory (B, S, C)."""
        batch, length, _ = memory.shape
        kv = self.key_value(memory).reshape(batch, length, 2, self.num_heads, self.head_dim)
        return KVCache(kv[:, :, 0], kv[:, :, 1])

    def __call__(self, x: jax.Array, memory_kv: KVCache, mask: jax.Array) -> jax.Array:
        batch, length, _ = x.shape
        q = self.query(x).reshape(batch, length, self.num_heads, self.head_dim)
        y = jax.nn.dot_product_attention(
            q,
            memory_kv.key.astype(q.dtype),
            memory_kv.value.astype(q.dtype),
            mask=mask[:, None, None, :],  # (B, 1, 1, S)
            implementation=self.implementation,
        )  # (B, T, H, D)
        return _apply_dropout(self.dropout, self.out(y.reshape(batch, length, -1)))


class DecoderBlock(nnx.Module):
    """Pre-LN decoder block: causal self-attention, cross-attention, MLP, each residual.

    Built from a `BlockConfig` (its `causal` is ignored: the self-attention is causal).
    """

    def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs):
        c, eps = config.embed_dim, config.layer_norm_eps
        self.ln1 = nnx.LayerNorm(c, epsilon=eps, rngs=rngs)
        self.attn = MultiHeadAttention(
            c,
            config.num_heads,
            causal=True,
            dropout=config.dropout,
            use_bias=config.use_bias,
            kernel_init=config.kernel_init,
            out_kernel_init=config.residual_init,
            implementation=config.implementation,
            rngs=rngs,
        )
        self.ln_cross = nnx.LayerNorm(c, epsilon=eps, rngs=rngs)
        self.cross = CrossAttention(config, rngs=rngs)
        self.ln2 = nnx.LayerNorm(c, epsilon=eps, rngs=rngs)
        self.mlp = FeedForward(
            c,
            config.mlp_ratio * c,
            activation=config.activation,
            dropout=config.dropout,
            kernel_init=config.kernel_init,
            out_kernel_init=config.residual_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, memory_kv: KVCache, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))  # (B, T, C)
        x = x + self.cross(self.ln_cross(x), memory_kv, mask)
        return x + self.mlp(self.ln2(x))

    def decode(
        self,
        x: jax.Array,
        cache: KVCache,
        position: jax.Array | int,
        memory_kv: KVCache,
        mask: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """`__call__` for new positions `[position, position + S)` with a self-attention cache."""
        attended, cache = self.attn.decode(self.ln1(x), cache, position)
        x = x + attended
        x = x + self.cross(self.ln_cross(x), memory_kv, mask)
        return x + self.mlp(self.ln2(x)), cache


class Seq2SeqTransformer(nnx.Module):
    """Encoder-decoder transformer (Vaswani et al. 2017 with pre-LayerNorm blocks).

    Initialisation as `GPT`: normal(0.02) weights and embeddings, residual-writing
    kernels normal(0.02 / sqrt(2 * layers)).

    Args:
      src_vocab_size: source tokens (id `pad_id` is padding).
      tgt_vocab_size: V, target tokens.
      max_len: the longest source and the longest target (position tables of this size).
      embed_dim: C.
      num_heads: H.
      num_encoder_layers: encoder blocks.
      num_decoder_layers: decoder blocks.
      mlp_ratio: MLP hidden width as a multiple of C.
      dropout: on the embeddings and inside every block (0 disables).
      tie_embeddings: the output projection is the transposed target embedding.
      pad_id: the source padding id (masked out as an attention key).
      rngs: NNX random streams; `params`, and `dropout` if dropout > 0.

    Call: `src (B, S)`, `tgt_in (B, T)` int, S, T <= max_len -> float32 logits (B, T, V);
    the logits at t depend on `tgt_in[:, :t + 1]` and the non-padding source only.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        max_len: int,
        embed_dim: int,
        num_heads: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        *,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        pad_id: int = PAD_ID,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            "Seq2SeqTransformer",
            src_vocab_size=src_vocab_size,
            tgt_vocab_size=tgt_vocab_size,
            max_len=max_len,
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            mlp_ratio=mlp_ratio,
        )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.max_len, self.pad_id, self.vocab_size = max_len, pad_id, tgt_vocab_size
        init = nnx.initializers.normal(0.02)
        layers = max(num_encoder_layers, num_decoder_layers)
        config = BlockConfig(
            embed_dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            kernel_init=init,
            residual_init=nnx.initializers.normal(0.02 / math.sqrt(2 * layers)),
        )
        embed = functools.partial(nnx.Embed, features=embed_dim, embedding_init=init, rngs=rngs)
        self.src_embed = embed(src_vocab_size)
        self.src_position = embed(max_len)
        self.tgt_embed = embed(tgt_vocab_size)
        self.tgt_position = embed(max_len)
        self.dropout = _dropout(dropout, rngs)
        self.encoder = block_stack(num_encoder_layers, config, rngs=rngs)
        self.ln_enc = nnx.LayerNorm(embed_dim, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.decoder = nnx.List(
            [DecoderBlock(config, rngs=rngs) for _ in range(num_decoder_layers)]
        )
        self.ln_dec = nnx.LayerNorm(embed_dim, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.head = (
            None
            if tie_embeddings
            else nnx.Linear(embed_dim, tgt_vocab_size, use_bias=False, kernel_init=init, rngs=rngs)
        )

    def encode(self, src: jax.Array) -> Memory:
        """{"kv": per decoder layer the cross-attention `KVCache` (B, S, H, D), "mask": (B, S)}."""
        _check_length("source", src.shape[1], self.max_len)
        mask = src != self.pad_id  # (B, S)
        x = self.src_embed(src) + self.src_position(jnp.arange(src.shape[1]))
        x = _apply_dropout(self.dropout, x)
        for block in self.encoder:
            x = block(x, mask=mask)
        x = self.ln_enc(x)  # (B, S, C)
        return {"kv": [block.cross.memory_kv(x) for block in self.decoder], "mask": mask}

    def __call__(self, src: jax.Array, tgt_in: jax.Array) -> jax.Array:
        _check_length("target", tgt_in.shape[1], self.max_len)
        memory = self.encode(src)
        x = self._embed_target(tgt_in, jnp.arange(tgt_in.shape[1]))  # (B, T, C)
        for block, kv in zip(self.decoder, memory["kv"], strict=True):
            x = block(x, kv, memory["mask"])
        return self._logits(x)

    def init_decoder(self, memory: Memory, length: int) -> DecoderState:
        """Empty self-attention caches (one per decoder layer) for `length` positions."""
        batch = memory["mask"].shape[0]
        return [block.attn.init_cache(batch, length) for block in self.decoder]

    def decode_step(
        self, tokens: jax.Array, state: DecoderState, memory: Memory, position: jax.Array | int
    ) -> tuple[jax.Array, DecoderState]:
        """Logits (B, V) of the token after `tokens` (B,), which sit at `position`."""
        x = self._embed_target(tokens[:, None], jnp.reshape(position, (1,)))  # (B, 1, C)
        new_state = []
        for block, cache, kv in zip(self.decoder, state, memory["kv"], strict=True):
            x, cache = block.decode(x, cache, position, kv, memory["mask"])
            new_state.append(cache)
        return self._logits(x)[:, 0], new_state

    def _embed_target(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = self.tgt_embed(tokens) + self.tgt_position(positions)
        return _apply_dropout(self.dropout, x)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.ln_dec(x)
        logits = self.tgt_embed.attend(x) if self.head is None else self.head(x)
        return logits.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# GRU with attention
# ---------------------------------------------------------------------------------------------


class Seq2SeqGRU(nnx.Module):
    """GRU encoder-decoder with attention (Luong et al. 2015, "general" score).

    The encoder is a bidirectional GRU (`jdl.models.RNN`) over the non-padding source;
    the decoder a GRU started from `tanh(W mean(encoder outputs))`. At step t the decoder
    state h_t attends over the encoder outputs m_s with weights softmax_s(h_t W_a m_s),
    and the logits are `W_o tanh(W_c [h_t; context_t])`. Without input feeding, so the
    teacher-forced decoder runs as one scan and the attention as one batched product.

    Args:
      src_vocab_size: source token count.
      tgt_vocab_size: target token count (V).
      embed_dim: width of both embeddings.
      hidden_size: H, the decoder state; each encoder direction has H as well.
      num_encoder_layers: stacked bidirectional layers.
      dropout: on the embeddings, between encoder layers and before the output layer.
      pad_id: the source padding id.
      rngs: NNX random streams.

    Call: `src (B, S)`, `tgt_in (B, T)` int -> float32 logits (B, T, V).
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        embed_dim: int,
        hidden_size: int,
        *,
        num_encoder_layers: int = 1,
        dropout: float = 0.0,
        pad_id: int = PAD_ID,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            "Seq2SeqGRU",
            src_vocab_size=src_vocab_size,
            tgt_vocab_size=tgt_vocab_size,
            embed_dim=embed_dim,
            hidden_size=hidden_size,
            num_encoder_layers=num_encoder_layers,
        )
        self.pad_id, self.vocab_size = pad_id, tgt_vocab_size
        h = hidden_size
        self.src_embed = nnx.Embed(src_vocab_size, embed_dim, rngs=rngs)
        self.tgt_embed = nnx.Embed(tgt_vocab_size, embed_dim, rngs=rngs)
        self.encoder = RNN(
            "gru",
            embed_dim,
            h,
            num_layers=num_encoder_layers,
            bidirectional=True,
            dropout=dropout,
            rngs=rngs,
        )
        self.bridge = nnx.Linear(2 * h, h, rngs=rngs)
        self.attention = nnx.Linear(2 * h, h, use_bias=False, rngs=rngs)
        self.cell = GRUCell(embed_dim, h, rngs=rngs)
        self.combine = nnx.Linear(3 * h, h, rngs=rngs)
        self.head = nnx.Linear(h, tgt_vocab_size, rngs=rngs)
        self.dropout = _dropout(dropout, rngs)

    def encode(self, src: jax.Array) -> Memory:
        """{"values": outputs (B, S, 2H), "keys": W_a outputs (B, S, H), "mask", "h0" (B, H)}."""
        mask = src != self.pad_id
        x = _apply_dropout(self.dropout, self.src_embed(src))
        values, _ = self.encoder(x, lengths=jnp.sum(mask, axis=1))  # (B, S, 2H), 0 at padding
        mean = jnp.sum(values, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)[:, None]
        return {
            "values": values,
            "keys": self.attention(values),
            "mask": mask,
            "h0": jnp.tanh(self.bridge(mean)),
        }

    def __call__(self, src: jax.Array, tgt_in: jax.Array) -> jax.Array:
        memory = self.encode(src)
        x = _apply_dropout(self.dropout, self.tgt_embed(tgt_in))  # (B, T, E)
        hidden, _ = scan_cell(self.cell, jnp.swapaxes(x, 0, 1), memory["h0"])  # (T, B, H)
        return self._readout(jnp.swapaxes(hidden, 0, 1), memory)

    def init_decoder(self, memory: Memory, length: int) -> DecoderState:
        """The decoder's first state (B, H); `length` is not needed by a recurrent decoder."""
        return memory["h0"]

    def decode_step(
        self, tokens: jax.Array, state: DecoderState, memory: Memory, position: jax.Array | int
    ) -> tuple[jax.Array, DecoderState]:
        """Logits (B, V) of the token after `tokens` (B,); `position` is not needed."""
        state, _ = self.cell(state, self.tgt_embed(tokens))
        return self._readout(state[:, None], memory)[:, 0], state

    def _readout(self, hidden: jax.Array, memory: Memory) -> jax.Array:
        scores = jnp.einsum("bth,bsh->bts", hidden, memory["keys"])  # (B, T, S)
        scores = jnp.where(memory["mask"][:, None, :], scores, -1e9)
        context = jnp.einsum("bts,bsc->btc", jax.nn.softmax(scores, axis=-1), memory["values"])
        out = jnp.tanh(self.combine(jnp.concatenate([hidden, context], axis=-1)))  # (B, T, H)
        return self.head(_apply_dropout(self.dropout, out)).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def seq2seq_loss(*, label_smoothing: float = 0.0, pad_id: int = PAD_ID):
    """Teacher-forced cross-entropy of a sequence-to-sequence model (a `jdl.steps` loss_fn).

    Reads batch["src"] (B, S), batch["tgt_in"] (B, T) and batch["tgt_out"] (B, T), int;
    positions where `tgt_out == pad_id` do not count. Per example: "loss", the mean
    label-smoothed cross-entropy over its target tokens; "token_accuracy"; and
    "sequence_accuracy" (1 when every target token is the argmax).
    """

    def loss_fn(model: nnx.Module, batch) -> dict[str, jax.Array]:
        logits = model(batch["src"], batch["tgt_in"])  # (B, T, V)
        labels = batch["tgt_out"]
        weight = (labels != pad_id).astype(jnp.float32)  # (B, T)
        count = jnp.maximum(jnp.sum(weight, axis=1), 1.0)
        xent = losses_lib.softmax_xent(
            logits=logits, labels=labels, label_smoothing=label_smoothing
        )
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return {
            "loss": jnp.sum(weight * xent, axis=1) / count,
            "token_accuracy": jnp.sum(weight * correct, axis=1) / count,
            "sequence_accuracy": jnp.all((correct > 0) | (weight == 0), axis=1).astype(jnp.float32),
        }

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def greedy_decode(
    model: nnx.Module,
    src: jax.Array,
    max_len: int,
    *,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    use_cache: bool = True,
) -> jax.Array:
    """Argmax decoding of every source row, in eval mode, under one `jax.jit`.

    Args:
      model: a model with the interface of the module docstring (not modified).
      src: int (B, S) source ids.
      max_len: N, the most tokens generated (`<eos>` included).
      bos_id: the start token.
      eos_id: the end token.
      use_cache: decode with `decode_step` (a KV cache for the transformer); False runs
        the whole teacher-forced model on the prefix at every step (a reference).

    Returns:
      int32 (B, N): the tokens of each row up to and including its `<eos>`, then
      `PAD_ID` (a row without `<eos>` fills all N). `<pad>` and `<bos>` are never
      generated (their logits are set to -inf).
    """
    graphdef, state = nnx.split(model)
    run = _greedy_cached if use_cache else _greedy_recompute
    return run(graphdef, state, jnp.asarray(src, jnp.int32), max_len, bos_id, eos_id)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _greedy_cached(graphdef, state, src, max_len, bos_id, eos_id):
    model = _eval_model(graphdef, state)
    memory = model.encode(src)
    batch = src.shape[0]

    def keep_going(carry):
        position, _, _, _, done = carry
        return (position < max_len) & ~jnp.all(done)

    def step(carry):
        position, tokens, dec_state, out, done = carry
        logits, dec_state = model.decode_step(tokens, dec_state, memory, position)
        tokens = jnp.argmax(_outputs_only(logits, bos_id), axis=-1).astype(jnp.int32)
        tokens = jnp.where(done, PAD_ID, tokens)
        out = jax.lax.dynamic_update_slice(out, tokens[:, None], (0, position))
        return position + 1, tokens, dec_state, out, done | (tokens == eos_id)

    carry = (
        jnp.int32(0),
        jnp.full((batch,), bos_id, jnp.int32),
        model.init_decoder(memory, max_len),
        jnp.full((batch, max_len), PAD_ID, jnp.int32),
        jnp.zeros((batch,), bool),
    )
    return jax.lax.while_loop(keep_going, step, carry)[3]


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _greedy_recompute(graphdef, state, src, max_len, bos_id, eos_id):
    model = _eval_model(graphdef, state)
    batch = src.shape[0]
    # Column 0 is <bos>; column t + 1 receives the token predicted at step t.
    buffer = jnp.full((batch, max_len + 1), PAD_ID, jnp.int32).at[:, 0].set(bos_id)

    def step(carry, position):
        buffer, done = carry
        # Causal decoder: the pads after `position` do not change the logits read here.
        logits = model(src, buffer[:, :max_len])[:, position]  # (B, V)
        tokens = jnp.argmax(_outputs_only(logits, bos_id), axis=-1).astype(jnp.int32)
        tokens = jnp.where(done, PAD_ID, tokens)
        buffer = jax.lax.dynamic_update_slice(buffer, tokens[:, None], (0, position + 1))
        return (buffer, done | (tokens == eos_id)), None

    done = jnp.zeros((batch,), bool)
    (buffer, _), _ = jax.lax.scan(step, (buffer, done), jnp.arange(max_len))
    return buffer[:, 1:]


def decode_in_batches(
    model: nnx.Module,
    src: np.ndarray,
    max_len: int,
    *,
    batch_size: int,
    beam_size: int = 0,
    alpha: float = 0.0,
) -> np.ndarray:
    """`greedy_decode` (beam_size 0) or `beam_search` over every row of `src`, in batches.

    The last batch is filled up with copies of the first row, so one shape compiles.

    Args:
      model: as `greedy_decode`.
      src: int (N, S) source ids.
      max_len: the most tokens generated per row.
      batch_size: rows per call.
      beam_size: 0 for greedy decoding, else the beam width.
      alpha: `beam_search`'s length-penalty exponent.

    Returns:
      int (N, max_len) token ids, one row per source row.
    """
    out = []
    for start in range(0, len(src), batch_size):
        chunk = src[start : start + batch_size]
        filled = np.concatenate([chunk, np.repeat(src[:1], batch_size - len(chunk), axis=0)])
        if beam_size:
            ids = beam_search(model, filled, max_len, beam_size=beam_size, alpha=alpha)
        else:
            ids = greedy_decode(model, filled, max_len)
        out.append(np.asarray(ids)[: len(chunk)])
    return np.concatenate(out)


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT's length normalisation `((5 + length) / 6) ** alpha` (Wu et al. 2016)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(
    model: nnx.Module,
    src: jax.Array,
    max_len: int,
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
) -> jax.Array:
    """Beam search with length normalisation, in eval mode, under one `jax.jit`.

    Each row keeps `beam_size` (K) unfinished hypotheses. At every step the 2K best
    one-token extensions (by summed log-probability) are ranked; those among the first K
    that end in `<eos>` become finished, with score `log p / length_penalty(length,
    alpha)` (length counts `<eos>`); the K best that do not end in `<eos>` stay in the
    beam. A row stops when it holds K finished hypotheses or none of its unfinished ones
    can still beat its best finished one; the loop stops when every row has, or after
    `max_len` steps. A row with no finished hypothesis returns its best unfinished one.
    With K = 1 this is exactly greedy decoding. Log-probabilities are those of the
    softmax over the tokens other than `<pad>` and `<bos>`, which are never generated.

    Args:
      model: a model with the interface of the module docstring (not modified).
      src: int (B, S) source ids.
      max_len: N, the most tokens generated (`<eos>` included).
      beam_size: K >= 1.
      alpha: length-penalty exponent >= 0 (0: plain summed log-probability).
      bos_id: the start token.
      eos_id: the end token.

    Returns:
      int32 (B, N): the best hypothesis of each row, as `greedy_decode` returns them.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    graphdef, state = nnx.split(model)
    src = jnp.asarray(src, jnp.int32)
    return _beam(graphdef, state, src, max_len, beam_size, float(alpha), bos_id, eos_id)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6, 7))
def _beam(graphdef, state, src, max_len, beam_size, alpha, bos_id, eos_id):
    model = _eval_model(graphdef, state)
    batch, k = src.shape[0], beam_size
    memory = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), model.encode(src))  # (B * K, ...)
    rows = jnp.arange(batch)[:, None]  # (B, 1)
    worst_penalty = length_penalty(max_len, alpha)

    def keep_going(carry):
        position, _, _, _, alive_logp, _, finished_score, done = carry
        return (position < max_len) & ~jnp.all(done)

    def step(carry):
        position, tokens, dec_state, seqs, alive_logp, finished, finished_score, done = carry
        logits, dec_state = model.decode_step(tokens, dec_state, memory, position)
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(_outputs_only(logits, bos_id)).reshape(batch, k, vocab)
        total = (alive_logp[..., None] + logp).reshape(batch, k * vocab)
        top_logp, top_index = jax.lax.top_k(total, 2 * k)  # (B, 2K), best first
        parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        candidates = seqs[rows, parent]  # (B, 2K, N)
        candidates = jax.lax.dynamic_update_slice(candidates, token[..., None], (0, 0, position))
        ends = token == eos_id
        # Unfinished: the K best candidates that do not end here.
        alive_logp, pick = jax.lax.top_k(jnp.where(ends, -jnp.inf, top_logp), k)  # (B, K)
        seqs = candidates[rows, pick]
        tokens = token[rows, pick].reshape(batch * k)
        beams = (rows * k + parent[rows, pick]).reshape(batch * k)
        dec_state = jax.tree.map(lambda x: x[beams], dec_state)
        # Finished: candidates ending here among the first K, merged with the earlier ones.
        new_score = top_logp / length_penalty(position + 1, alpha)
        new_score = jnp.where(ends & (jnp.arange(2 * k) < k), new_score, -jnp.inf)
        merged_score, best = jax.lax.top_k(jnp.concatenate([finished_score, new_score], axis=1), k)
        merged = jnp.concatenate([finished, candidates], axis=1)[rows, best]
        # A row that was done keeps its finished set.
        finished = jnp.where(done[:, None, None], finished, merged)
        finished_score = jnp.where(done[:, None], finished_score, merged_score)
        full = finished_score[:, -1] > -jnp.inf
        hopeless = finished_score[:, 0] >= jnp.max(alive_logp, axis=1) / worst_penalty
        return (
            position + 1,
            tokens,
            dec_state,
            seqs,
            alive_logp,
            finished,
            finished_score,
            done | full | hopeless,
        )

    seqs = jnp.full((batch, k, max_len), PAD_ID, jnp.int32)
    # Only beam 0 is live at the start, so the K beams do not begin as K copies.
    alive_logp = jnp.full((batch, k), -jnp.inf).at[:, 0].set(0.0)
    carry = (
        jnp.int32(0),
        jnp.full((batch * k,), bos_id, jnp.int32),
        model.init_decoder(memory, max_len),
        seqs,
        alive_logp,
        seqs,
        jnp.full((batch, k), -jnp.inf),
        jnp.zeros((batch,), bool),
    )
    _, _, _, seqs, _, finished, finished_score, _ = jax.lax.while_loop(keep_going, step, carry)
    has_finished = finished_score[:, 0] > -jnp.inf
    return jnp.where(has_finished[:, None], finished[:, 0], seqs[:, 0])


def _outputs_only(logits: jax.Array, bos_id: int) -> jax.Array:
    """`logits` (B, V) with `<pad>` and `<bos>` ruled out: they are never an output."""
    return logits.at[:, PAD_ID].set(-jnp.inf).at[:, bos_id].set(-jnp.inf)


def _eval_model(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.Module:
    model = nnx.merge(graphdef, state)
    model.eval()  # a fresh copy inside the trace: the caller's module keeps its mode
    return model


def _check_length(what: str, length: int, max_len: int) -> None:
    if length > max_len:
        raise ValueError(f"{what} length {length} exceeds max_len {max_len}")


# ---------------------------------------------------------------------------------------------
# Error rates
# ---------------------------------------------------------------------------------------------


def strip_tokens(ids: Sequence[int], *, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> list[int]:
    """The ids before the first `eos_id`, without `pad_id`s."""
    out = []
    for i in np.asarray(ids).tolist():
        if i == eos_id:
            break
        if i != pad_id:
            out.append(i)
    return out


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def error_rates(
    predictions: Sequence[Sequence], references: Sequence[Sequence[Sequence]]
) -> dict[str, float]:
    """Phoneme and word error rates against one or more references per word.

    For each word the closest reference (fewest edits; the shorter on a tie) is the one
    scored, as in the G2P literature.

    Args:
      predictions: per word, the predicted symbols.
      references: per word, a non-empty list of acceptable symbol sequences.

    Returns:
      A dict: "phoneme_error_rate", the sum of edits over the sum of the chosen
        references' lengths, and "word_error_rate", the share of words that match no
        reference exactly.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions as references (>= 1), got {len(predictions)} "
            f"and {len(references)}"
        )
    edits = length = wrong = 0
    for predicted, options in zip(predictions, references, strict=True):
        predicted = list(predicted)
        distance, size = min((edit_distance(predicted, list(r)), len(r)) for r in options)
        edits, length, wrong = edits + distance, length + size, wrong + (distance > 0)
    return {
        "phoneme_error_rate": edits / max(length, 1),
        "word_error_rate": wrong / len(predictions),
    }
