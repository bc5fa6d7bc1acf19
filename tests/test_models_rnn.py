"""Recurrent models: cells against their equations, layers against PyTorch, the sequence
classifier and the character language model (shapes, training with jdl, sampling)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jdl
from jdl.models import rnn


def rngs(seed: int = 0) -> nnx.Rngs:
    # rbg keys compile far faster than threefry on CPU, which keeps model init cheap here.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def test_lstm_cell_step_matches_its_equations():
    cell = rnn.LSTMCell(3, 4, rngs=rngs())
    state = np.random.RandomState(0)
    x, h, c = state.randn(2, 3), state.randn(2, 4), state.randn(2, 4)
    w_ih, w_hh = np.asarray(cell.w_ih[...]), np.asarray(cell.w_hh[...])
    b = np.asarray(cell.b_ih[...]) + np.asarray(cell.b_hh[...])
    gate = lambda k: (
        x @ w_ih[:, 4 * k : 4 * k + 4] + h @ w_hh[:, 4 * k : 4 * k + 4] + b[4 * k : 4 * k + 4]
    )
    i, f, g, o = sigmoid(gate(0)), sigmoid(gate(1)), np.tanh(gate(2)), sigmoid(gate(3))
    c_next = f * c + i * g
    h_next = o * np.tanh(c_next)
    as_f32 = lambda a: jnp.asarray(a, jnp.float32)
    (h_got, c_got), out = cell((as_f32(h), as_f32(c)), as_f32(x))
    np.testing.assert_allclose(c_got, c_next, atol=1e-5)
    np.testing.assert_allclose(h_got, h_next, atol=1e-5)
    np.testing.assert_array_equal(out, h_got)


def test_gru_cell_step_matches_its_equations():
    cell = rnn.GRUCell(3, 4, rngs=rngs())
    state = np.random.RandomState(1)
    x, h = state.randn(2, 3), state.randn(2, 4)
    w_ih, w_hh = np.asarray(cell.w_ih[...]), np.asarray(cell.w_hh[...])
    b_ih, b_hh = np.asarray(cell.b_ih[...]), np.asarray(cell.b_hh[...])
    xs = lambda k: x @ w_ih[:, 4 * k : 4 * k + 4] + b_ih[4 * k : 4 * k + 4]
    hs = lambda k: h @ w_hh[:, 4 * k : 4 * k + 4] + b_hh[4 * k : 4 * k + 4]
    r, z = sigmoid(xs(0) + hs(0)), sigmoid(xs(1) + hs(1))
    n = np.tanh(xs(2) + r * hs(2))
    h_got, _ = cell(jnp.asarray(h, jnp.float32), jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(h_got, (1 - z) * n + z * h, atol=1e-5)


def test_init_is_uniform_in_torch_bounds():
    cell = rnn.LSTMCell(5, 16, rngs=rngs())
    assert cell.w_ih.shape == (5, 64) and cell.w_hh.shape == (16, 64)
    assert cell.b_ih.shape == (64,) and cell.b_hh.shape == (64,)
    for param in (cell.w_ih, cell.w_hh, cell.b_ih, cell.b_hh):
        values = np.asarray(param[...])
        assert np.all(np.abs(values) <= 0.25) and np.abs(values).max() > 0.2


def copy_from_torch(model: rnn.RNN, torch_rnn: torch.nn.RNNBase) -> None:
    """Copies `torch.nn.LSTM` / `GRU` weights into `model` (same sizes and layout)."""
    for index, cell in enumerate(model.cells):
        layer, direction = divmod(index, model.num_directions)
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        get = lambda name, suffix=suffix: getattr(torch_rnn, name + suffix).detach().numpy()
        cell.w_ih[...] = jnp.asarray(get("weight_ih").T)
        cell.w_hh[...] = jnp.asarray(get("weight_hh").T)
        cell.b_ih[...] = jnp.asarray(get("bias_ih"))
        cell.b_hh[...] = jnp.asarray(get("bias_hh"))


@pytest.mark.parametrize("cell_type", ["lstm", "gru"])
def test_two_layer_bidirectional_rnn_matches_torch(cell_type):
    torch.manual_seed(0)
    torch_class = torch.nn.LSTM if cell_type == "lstm" else torch.nn.GRU
    torch_rnn = torch_class(4, 6, num_layers=2, bidirectional=True, batch_first=True)
    model = rnn.RNN(cell_type, 4, 6, num_layers=2, bidirectional=True, rngs=rngs())
    copy_from_torch(model, torch_rnn)

    state = np.random.RandomState(0)
    x = state.randn(3, 5, 4).astype(np.float32)  # (B, T, F)
    h0, c0 = state.randn(2, 4, 3, 6).astype(np.float32)  # (L * dirs, B, H) each
    lengths = np.array([5, 2, 3])
    initial = (h0, c0) if cell_type == "lstm" else h0
    to_torch = lambda tree: jax.tree.map(torch.tensor, tree)

    with torch.no_grad():
        expected = [torch_rnn(torch.tensor(x)), torch_rnn(torch.tensor(x), to_torch(initial))]
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            torch.tensor(x), torch.tensor(lengths), batch_first=True, enforce_sorted=False
        )
        out, final = torch_rnn(packed, to_torch(initial))
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=5)
        expected.append((out, final))

    @nnx.jit
    def run_all(model, x, initial, lengths):
        return [model(x), model(x, initial), model(x, initial, lengths=lengths)]

    got = run_all(model, jnp.asarray(x), jax.tree.map(jnp.asarray, initial), lengths)
    for (out_got, final_got), (out_expected, final_expected) in zip(got, expected, strict=True):
        assert out_got.shape == (3, 5, 12)
        np.testing.assert_allclose(out_got, out_expected.numpy(), atol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b.numpy(), atol=1e-5),
            final_got,
            final_expected,
        )


def test_sequence_classifier_reads_both_ends_of_the_sequence():
    model = rnn.SequenceClassifier("gru", 1, 8, 3, bidirectional=True, rngs=rngs())
    x = jax.random.normal(jax.random.key(1, impl="rbg"), (2, 6))  # (B, T): univariate

    @nnx.jit
    def run(model, x):
        outputs, _ = model.rnn(x[..., None])  # (B, T, 2H)
        features = jnp.concatenate([outputs[:, -1, :8], outputs[:, 0, 8:]], axis=-1)
        return model(x), model(x[..., None]), model.head(features)

    logits, logits_3d, expected = run(model, x)
    assert logits.shape == (2, 3)
    np.testing.assert_allclose(logits, expected, atol=1e-6)
    np.testing.assert_allclose(logits_3d, logits, atol=1e-6)


def test_char_lm_shapes_and_state_continuation():
    model = rnn.CharLM(11, 8, 16, 2, cell_type="lstm", rngs=rngs())
    tokens = jax.random.randint(jax.random.key(2, impl="rbg"), (2, 7), 0, 11)

    @nnx.jit
    def run(model, tokens):
        first, state = model.run(tokens[:, :4])
        second, _ = model.run(tokens[:, 4:], state)
        return model(tokens), jnp.concatenate([first, second], axis=1)

    logits, pieces = run(model, tokens)
    assert logits.shape == (2, 7, 11) and logits.dtype == jnp.float32
    # Reading the sequence in two pieces, carrying the state, gives the same logits.
    np.testing.assert_allclose(pieces, logits, atol=1e-5)


def lm_loss(model: nnx.Module, batch: dict) -> dict:
    logits = model(batch["x"])  # (B, T, V)
    per_token = jdl.losses.softmax_xent(logits=logits, labels=batch["y"])  # (B, T)
    return {"loss": jnp.mean(per_token, axis=-1)}


def test_char_lm_trains_with_jdl_steps():
    text = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 5, np.int32)
    windows = np.stack([text[i : i + 13] for i in range(0, 8 * 3, 3)])  # (8, 13)
    batch = {"x": jnp.asarray(windows[:, :-1]), "y": jnp.asarray(windows[:, 1:])}
    model = rnn.CharLM(10, 8, 16, cell_type="gru", rngs=rngs())
    state = jdl.TrainState.create(model, optax.adam(3e-2))
    step = jax.jit(jdl.make_train_step(lm_loss))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_generate_samples_valid_ids_deterministically():
    model = rnn.CharLM(11, 8, 16, cell_type="lstm", dropout=0.5, rngs=rngs())
    prompt = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
    generate = nnx.jit(lambda m, key: m.generate(key, prompt, 9))
    key = jax.random.key(4, impl="rbg")
    tokens = generate(model, key)
    assert tokens.shape == (2, 9) and tokens.dtype == jnp.int32
    assert bool(jnp.all((tokens >= 0) & (tokens < 11)))
    np.testing.assert_array_equal(generate(model, key), tokens)  # same key, same tokens
    assert not np.array_equal(generate(model, jax.random.key(5, impl="rbg")), tokens)
    single = model.generate(key, prompt[0], 4)
    assert single.shape == (4,)


def test_greedy_generation_follows_the_model():
    model = rnn.CharLM(11, 8, 16, cell_type="gru", rngs=rngs())
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    tokens = model.generate(jax.random.key(0, impl="rbg"), prompt, 5, temperature=0.0)
    # Each greedy token is the argmax of the model's logits on everything before it.
    logits = model(jnp.concatenate([prompt, tokens], axis=1))  # (1, 8, V)
    np.testing.assert_array_equal(jnp.argmax(logits[:, 2:7], axis=-1), tokens)


def test_dropout_is_on_in_train_mode_and_off_in_eval_mode():
    model = rnn.RNN("lstm", 3, 8, num_layers=2, dropout=0.5, rngs=rngs())
    x = jax.random.normal(jax.random.key(6, impl="rbg"), (2, 4, 3))
    forward = nnx.jit(lambda m, x: (m(x)[0], m(x)[0], m(x, deterministic=True)[0]))
    first, second, deterministic = forward(model, x)
    assert not np.allclose(first, second)  # a fresh mask per call
    model.eval()
    first, second, _ = forward(model, x)
    np.testing.assert_array_equal(first, deterministic)
    np.testing.assert_array_equal(second, deterministic)


def test_invalid_cell_type_raises():
    with pytest.raises(ValueError, match="cell_type"):
        rnn.RNN("rnn", 3, 4, rngs=nnx.Rngs(0))
