"""Recurrent networks: LSTM and GRU cells, stacked (bi)directional layers, and two models.

The cells follow PyTorch's equations, gate order and parameterisation (two bias vectors,
uniform(-1/sqrt(H), 1/sqrt(H)) init), so weights copied from `torch.nn.LSTM` /
`torch.nn.GRU` give the same outputs. Kernels are stored transposed with respect to
PyTorch (`w_ih = weight_ih.T`, shape `(F, G * H)`), so the step is `x @ w_ih`.

Sequences are batch-first at the API, `(B, T, F)`, and time-major inside `jax.lax.scan`.
The input projection `x @ w_ih` of a whole sequence is one large matmul before the scan;
only the recurrent `h @ w_hh` runs step by step.

Recurrent state ("carry") per cell: `(h, c)` for an LSTM, `h` for a GRU, each `(B, H)`.
Whole-network states stack the cells in PyTorch's order (layer-major, forward before
backward): `(h_n, c_n)` for an LSTM and `h_n` for a GRU, each `(num_layers * dirs, B, H)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdl.models.initializers import uniform_init
from jdl.models.sizes import check_sizes
from jdl.models.transformer import sample_logits

# (h, c) for an LSTM, h for a GRU; stacked over cells for a whole network.
Carry = Any
CELL_TYPES = ("lstm", "gru")


class _Cell(nnx.Module):
    """Parameters and input projection shared by the gated cells."""

    num_gates: int = 1

    def __init__(self, input_size: int, hidden_size: int, *, rngs: nnx.Rngs):
        self.input_size, self.hidden_size = input_size, hidden_size
        init = uniform_init(1.0 / math.sqrt(hidden_size))
        size = self.num_gates * hidden_size
        self.w_ih = nnx.Param(init(rngs.params(), (input_size, size)))
        self.w_hh = nnx.Param(init(rngs.params(), (hidden_size, size)))
        self.b_ih = nnx.Param(init(rngs.params(), (size,)))
        self.b_hh = nnx.Param(init(rngs.params(), (size,)))

    def project_inputs(self, x: jax.Array) -> jax.Array:
        """`x @ w_ih + b_ih`: `(..., F) -> (..., G * H)`; done for all steps at once."""
        return x @ self.w_ih[...] + self.b_ih[...]

    def step(self, carry: Carry, xw: jax.Array) -> tuple[Carry, jax.Array]:
        """One time step from projected inputs `xw` `(B, G * H)`; returns (carry, h)."""
        raise NotImplementedError

    def initial_state(self, batch_size: int, dtype: jnp.dtype = jnp.float32) -> Carry:
        """The zero state for a batch of `batch_size`."""
        raise NotImplementedError

    def __call__(self, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
        """One time step: `carry`, `x` `(B, F)` -> `(new carry, h (B, H))`."""
        return self.step(carry, self.project_inputs(x))


class LSTMCell(_Cell):
    """Long short-term memory cell, PyTorch's equations with gates in order i, f, g, o:

        i = sigmoid(x W_ii + b_ii + h W_hi + b_hi)
        f = sigmoid(x W_if + b_if + h W_hf + b_hf)
        g = tanh(x W_ig + b_ig + h W_hg + b_hg)
        o = sigmoid(x W_io + b_io + h W_ho + b_ho)
        c' = f * c + i * g;  h' = o * tanh(c')

    Args:
      input_size: F, features of one input step.
      hidden_size: H.
      rngs: NNX random streams (`params`).

    Params: `w_ih (F, 4H)`, `w_hh (H, 4H)`, `b_ih (4H,)`, `b_hh (4H,)`.
    Call: `((h, c), x)` with `h, c (B, H)`, `x (B, F)` -> `((h', c'), h')`.
    """

    num_gates = 4

    def initial_state(
        self, batch_size: int, dtype: jnp.dtype = jnp.float32
    ) -> tuple[jax.Array, jax.Array]:
        zeros = jnp.zeros((batch_size, self.hidden_size), dtype)
        return zeros, zeros

    def step(
        self, carry: tuple[jax.Array, jax.Array], xw: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        h, c = carry
        gates = xw + h @ self.w_hh[...] + self.b_hh[...]  # (B, 4H)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h


class GRUCell(_Cell):
    """Gated recurrent unit, PyTorch's equations with gates in order r, z, n:

        r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
        z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
        n = tanh(x W_in + b_in + r * (h W_hn + b_hn))
        h' = (1 - z) * n + z * h

    Args and params as `LSTMCell`, with 3H instead of 4H.
    Call: `(h, x)` with `h (B, H)`, `x (B, F)` -> `(h', h')`.
    """

    num_gates = 3

    def initial_state(self, batch_size: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jnp.zeros((batch_size, self.hidden_size), dtype)

    def step(self, carry: jax.Array, xw: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = carry
        hw = h @ self.w_hh[...] + self.b_hh[...]  # (B, 3H); b_hn must stay inside r * (.)
        x_r, x_z, x_n = jnp.split(xw, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(hw, 3, axis=-1)
        r = jax.nn.sigmoid(x_r + h_r)
        z = jax.nn.sigmoid(x_z + h_z)
        n = jnp.tanh(x_n + r * h_n)
        h = (1.0 - z) * n + z * h
        return h, h


def make_cell(cell_type: str, input_size: int, hidden_size: int, *, rngs: nnx.Rngs) -> _Cell:
    """An `LSTMCell` ("lstm") or `GRUCell` ("gru")."""
    if cell_type == "lstm":
        return LSTMCell(input_size, hidden_size, rngs=rngs)
    if cell_type == "gru":
        return GRUCell(input_size, hidden_size, rngs=rngs)
    raise ValueError(f"cell_type must be one of {CELL_TYPES}, got {cell_type!r}")


def scan_cell(
    cell: _Cell,
    x: jax.Array,
    carry: Carry,
    *,
    mask: jax.Array | None = None,
    reverse: bool = False,
) -> tuple[jax.Array, Carry]:
    """Runs `cell` over a time-major sequence.

    Args:
      cell: the cell.
      x: `(T, B, F)` inputs.
      carry: initial state for a batch of B.
      mask: optional bool `(T, B)`, False at padding. Padded steps leave the state
        unchanged and output zeros, so with right-padding the forward direction ends at
        each sequence's last valid step and the reverse direction starts at it.
      reverse: run from t = T - 1 down to 0 (outputs stay in input order).

    Returns:
      `(outputs (T, B, H), final carry)`.
    """
    xw = cell.project_inputs(x)  # (T, B, G * H): one matmul for all steps

    def step(carry: Carry, inputs: tuple[jax.Array, jax.Array | None]) -> tuple[Carry, jax.Array]:
        xw_t, valid = inputs
        new_carry, h = cell.step(carry, xw_t)
        if valid is None:
            return new_carry, h
        keep = valid[:, None]  # (B, 1)
        new_carry = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_carry, carry)
        return new_carry, jnp.where(keep, h, 0.0)

    carry, outputs = jax.lax.scan(step, carry, (xw, mask), reverse=reverse)
    return outputs, carry


class RNN(nnx.Module):
    """Stacked, optionally bidirectional LSTM or GRU layers, as `torch.nn.LSTM` / `GRU`.

    Args:
      cell_type: "lstm" or "gru".
      input_size: F, features per time step.
      hidden_size: H, per direction.
      num_layers: stacked layers; layer k > 0 reads layer k - 1's (concatenated) outputs.
      bidirectional: add a reverse-time direction to every layer; outputs concatenate
        forward then backward features.
      dropout: dropout rate on the outputs of every layer except the last (as PyTorch).
      rngs: NNX random streams; `params` for init, `dropout` if dropout > 0.

    Call: `x (B, T, F)` float, optional `initial_state` (see the module docstring; zeros
    if None), optional `lengths (B,)` int for right-padded batches ->
    `(outputs (B, T, H * dirs), final_state)`. Outputs at padded steps are zero.
    """

    def __init__(
        self,
        cell_type: str,
        input_size: int,
        hidden_size: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        check_sizes("RNN", input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        self.cell_type, self.hidden_size = cell_type, hidden_size
        self.num_layers, self.num_directions = num_layers, 2 if bidirectional else 1
        self.cells = nnx.List(
            [
                make_cell(
                    cell_type,
                    input_size if layer == 0 else hidden_size * self.num_directions,
                    hidden_size,
                    rngs=rngs,
                )
                for layer in range(num_layers)
                for _ in range(self.num_directions)
            ]
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 and num_layers > 1 else None

    def initial_state(self, batch_size: int, dtype: jnp.dtype = jnp.float32) -> Carry:
        """Zero state of the whole network: `(h_0, c_0)` or `h_0`, `(L * dirs, B, H)`."""
        return _stack([cell.initial_state(batch_size, dtype) for cell in self.cells])

    def __call__(
        self,
        x: jax.Array,
        initial_state: Carry | None = None,
        *,
        lengths: jax.Array | None = None,
        deterministic: bool | None = None,
    ) -> tuple[jax.Array, Carry]:
        batch, time = x.shape[:2]
        if initial_state is None:
            initial_state = self.initial_state(batch, x.dtype)
        mask = None
        if lengths is not None:
            mask = jnp.arange(time)[:, None] < jnp.asarray(lengths)[None, :]  # (T, B)
        x = jnp.swapaxes(x, 0, 1)  # (T, B, F): scan runs over the leading axis
        finals = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout is not None:
                x = self.dropout(x, deterministic=deterministic)
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                carry = jax.tree.map(lambda s, i=index: s[i], initial_state)
                out, carry = scan_cell(
                    self.cells[index], x, carry, mask=mask, reverse=direction == 1
                )
                outputs.append(out)  # (T, B, H)
                finals.append(carry)
            x = jnp.concatenate(outputs, axis=-1)  # (T, B, H * dirs)
        return jnp.swapaxes(x, 0, 1), _stack(finals)  # (B, T, H * dirs)


def _stack(carries: Sequence[Carry]) -> Carry:
    # [(h, c), (h, c), ...] -> (h_n, c_n); [h, h, ...] -> h_n.
    return jax.tree.map(lambda *xs: jnp.stack(xs), *carries)


def last_hidden(rnn: RNN, final_state: Carry) -> jax.Array:
    """The top layer's final hidden states, directions concatenated: `(B, H * dirs)`.

    For the forward direction this is the output at the last (valid) step; for the
    backward direction, the output at step 0.
    """
    h_n = final_state[0] if rnn.cell_type == "lstm" else final_state  # (L * dirs, B, H)
    top = h_n[-rnn.num_directions :]  # (dirs, B, H)
    return jnp.concatenate(list(top), axis=-1)


class SequenceClassifier(nnx.Module):
    """An RNN over the sequence, then a dense head on its last hidden state.

    The features are the top layer's output at the last time step; when bidirectional,
    concatenated with the backward direction's output at the first time step (the end
    of its pass), so both directions have read the whole sequence.

    Args:
      cell_type: "lstm" or "gru".
      input_size: F, features per time step (1 for a univariate series).
      hidden_size: as in `RNN`.
      num_layers: as in `RNN`.
      bidirectional: as in `RNN`.
      dropout: as in `RNN`.
      num_classes: outputs of the head.
      rngs: NNX random streams.

    Call: `x (B, T, F)` or `(B, T)` (read as `(B, T, 1)`), optional `lengths (B,)` ->
    `(B, num_classes)` logits.
    """

    def __init__(
        self,
        cell_type: str,
        input_size: int,
        hidden_size: int,
        num_classes: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            "SequenceClassifier",
            input_size=input_size,
            hidden_size=hidden_size,
            num_classes=num_classes,
            num_layers=num_layers,
        )
        self.rnn = RNN(
            cell_type,
            input_size,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            dropout=dropout,
            rngs=rngs,
        )
        self.head = nnx.Linear(hidden_size * self.rnn.num_directions, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        if x.ndim == 2:
            x = x[..., None]  # (B, T, 1)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.float32)
        _, final_state = self.rnn(x, lengths=lengths)
        return self.head(last_hidden(self.rnn, final_state))  # (B, num_classes)


class CharLM(nnx.Module):
    """Character (token) language model: embedding -> RNN -> dense to vocabulary logits.

    Args:
      vocab_size: V, number of token ids.
      embed_dim: size of the token embeddings.
      hidden_size: H of every RNN layer.
      num_layers: stacked RNN layers.
      cell_type: "lstm" or "gru".
      dropout: rate between RNN layers and before the head (0 disables).
      rngs: NNX random streams; `params`, and `dropout` if dropout > 0.

    Call: `tokens (B, T)` int -> `(B, T, V)` logits of the next token at every position.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        cell_type: str = "lstm",
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            "CharLM",
            vocab_size=vocab_size,
            embed_dim=embed_dim,
            hidden_size=hidden_size,
            num_layers=num_layers,
        )
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.rnn = RNN(
            cell_type, embed_dim, hidden_size, num_layers=num_layers, dropout=dropout, rngs=rngs
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.head = nnx.Linear(hidden_size, vocab_size, rngs=rngs)

    def run(
        self,
        tokens: jax.Array,
        state: Carry | None = None,
        *,
        deterministic: bool | None = None,
    ) -> tuple[jax.Array, Carry]:
        """Logits and the state after the last token, starting from `state` (zeros if None).

        `tokens (B, T)` int -> `(logits (B, T, V), state)`; feeding the returned state to
        the next call continues the sequence. `deterministic=True` disables dropout.
        """
        x = self.embed(tokens)  # (B, T, E)
        x, state = self.rnn(x, state, deterministic=deterministic)  # (B, T, H)
        if self.dropout is not None:
            x = self.dropout(x, deterministic=deterministic)
        return self.head(x), state  # (B, T, V)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.run(tokens)[0]

    def generate(
        self,
        key: jax.Array,
        prompt_ids: jax.Array,
        num_tokens: int,
        temperature: float | jax.Array = 1.0,
        top_k: int | None = None,
    ) -> jax.Array:
        """Samples `num_tokens` tokens after `prompt_ids`, carrying the recurrent state.

        The prompt is read in one pass; then each sampled token is fed back through a
        `jax.lax.scan`, so the whole call traces once and can be jitted (with
        `num_tokens` and `top_k` static; `temperature` may be traced). Dropout is off.
        The same key gives the same tokens.

        Args:
          key: PRNG key for sampling.
          prompt_ids: `(B, P)` or `(P,)` int token ids, P >= 1.
          num_tokens: how many tokens to sample.
          temperature: logits are divided by it; 0 picks the most likely token.
          top_k: sample only among the k most likely tokens (None: all).

        Returns:
          int32 `(B, num_tokens)` (or `(num_tokens,)` for a 1-D prompt): the sampled
          continuation, without the prompt.
        """
        prompt = jnp.atleast_2d(prompt_ids)  # (B, P)
        logits, state = self.run(prompt, deterministic=True)

        def sample(
            carry: tuple[jax.Array, Carry], step_key: jax.Array
        ) -> tuple[tuple[jax.Array, Carry], jax.Array]:
            next_logits, state = carry  # (B, V)
            token = sample_logits(step_key, next_logits, temperature=temperature, top_k=top_k)
            # The last iteration's forward pass is unused; one step is cheaper than a
            # second code path outside the scan.
            logits, state = self.run(token[:, None], state, deterministic=True)
            return (logits[:, -1], state), token

        keys = jax.random.split(key, num_tokens)
        _, tokens = jax.lax.scan(sample, (logits[:, -1], state), keys)  # (num_tokens, B)
        tokens = tokens.T  # (B, num_tokens)
        return tokens[0] if prompt_ids.ndim == 1 else tokens
