"""predict and TrainState.eval_model: eval mode, fixed-size batches, one compile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdl
from jdl import inference
from jdl.errors import UserError
from jdl.inference import PredictInputError, predict

BATCH = 8


class Net(nnx.Module):
    """Dense -> batch norm -> dropout: eval mode changes both the norm and the dropout."""

    def __init__(self, rngs, features=5):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(4, features, rngs=rngs)

    def __call__(self, x):
        return self.head(self.dropout(self.norm(self.linear(x))))  # (B, features)


def _loss(model, batch):
    return {"loss": jnp.mean(model(batch["x"]) ** 2, axis=-1)}


def _inputs(n, seed=1):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, 3)) * 3 + 1, np.float32)


@pytest.fixture(scope="module")
def trained_state():
    """A state whose batch-norm statistics and weights moved away from their initial values."""
    tx, _ = jdl.make_optimizer("sgd", learning_rate=0.1)
    state = jdl.TrainState.create(Net(nnx.Rngs(0, dropout=1)), tx, seed=0)
    step = jax.jit(jdl.make_train_step(_loss))
    for i in range(3):
        state, _ = step(state, {"x": jnp.asarray(_inputs(16, seed=10 + i))})
    return state


def _eval_forward(state, x):
    model = state.model()
    model.eval()
    return model(x)


def _hand_loop(forward, state, x, batch_size):
    return np.concatenate(
        [np.asarray(forward(state, x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    )


def test_equals_a_hand_loop_in_eval_mode(trained_state):
    x = _inputs(3 * BATCH)
    out = predict(trained_state, x, batch_size=BATCH)
    # The same program, compiled by hand: bit for bit.
    np.testing.assert_array_equal(out, _hand_loop(jax.jit(_eval_forward), trained_state, x, BATCH))
    # Op by op: XLA fuses the batch-norm arithmetic, so the last bit may differ.
    np.testing.assert_allclose(
        out, _hand_loop(_eval_forward, trained_state, x, BATCH), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("n", [1, BATCH - 1, BATCH, BATCH + 1, 3 * BATCH + 5])
def test_every_tail_size_gives_each_example_its_own_output(trained_state, n):
    x = _inputs(n, seed=n)
    out = predict(trained_state, x, batch_size=BATCH)
    assert isinstance(out, np.ndarray) and out.shape == (n, 5) and out.dtype == np.float32
    model = trained_state.eval_model()
    # In eval mode each example's output depends on that example only, so one call on
    # all of them is the reference, in input order, whatever the padding was.
    np.testing.assert_allclose(out, np.asarray(model(x)), rtol=1e-6, atol=1e-6)


def test_one_compile_serves_every_length_and_new_weights(trained_state):
    x = _inputs(40)
    predict(trained_state, x[:1], batch_size=BATCH + 3)  # compiles for this batch size
    before = inference._forward._cache_size()
    for n in (1, 2, BATCH + 2, BATCH + 3, BATCH + 4, 40):
        predict(trained_state, x[:n], batch_size=BATCH + 3)
    # Other weights of the same model (one more train step): same graph, no compile.
    moved, _ = jax.jit(jdl.make_train_step(_loss))(trained_state, {"x": jnp.asarray(x[:16])})
    predict(moved, x, batch_size=BATCH + 3)
    assert inference._forward._cache_size() == before
    predict(trained_state, x, batch_size=BATCH + 4)  # another batch size: one more program
    assert inference._forward._cache_size() == before + 1


def _host_state(model):
    """Every variable of `model` (weights, statistics, RNG keys and counts) on the host."""

    def host(value):
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        return np.asarray(value)

    return jax.tree.map(host, nnx.state(model))


def test_dropout_model_gives_deterministic_output_and_is_left_in_train_mode():
    model = Net(nnx.Rngs(0, dropout=1))
    x = _inputs(20)
    params_before = _host_state(model)
    first = predict(model, x, batch_size=BATCH)
    second = predict(model, x, batch_size=BATCH)
    np.testing.assert_array_equal(first, second)
    # The caller's model is untouched: still in train mode, same arrays, same RNG counts.
    assert model.dropout.deterministic is False and model.norm.use_running_average is False
    jax.tree.map(np.testing.assert_array_equal, params_before, _host_state(model))
    reference = nnx.merge(*nnx.split(model), copy=True)
    reference.eval()
    np.testing.assert_allclose(first, np.asarray(reference(jnp.asarray(x))), rtol=1e-6, atol=1e-6)
    # ... and its dropout is still on: two train-mode calls draw two masks.
    train_mode = [np.asarray(model(jnp.asarray(x))) for _ in range(2)]
    assert not np.allclose(train_mode[0], train_mode[1])


def test_eval_model_is_in_eval_mode_and_model_in_train_mode(trained_state):
    x = jnp.asarray(_inputs(32))
    train_model = trained_state.model()
    assert train_model.dropout.deterministic is False
    evaluated = trained_state.eval_model()
    assert evaluated.dropout.deterministic is True and evaluated.norm.use_running_average
    np.testing.assert_array_equal(np.asarray(evaluated(x)), np.asarray(evaluated(x)))
    # A copy: switching it back to training does not reach the state.
    evaluated.train()
    assert trained_state.eval_model().dropout.deterministic is True


class DictModel(nnx.Module):
    """Takes a dict of inputs and returns a dict and a tuple: predict keeps the structure."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.linear = nnx.Linear(2, 4, rngs=rngs)

    def __call__(self, batch):
        hidden = self.embed(batch["tokens"]).mean(axis=1) + self.linear(batch["features"])
        return {"hidden": hidden, "parts": (hidden.sum(-1), batch["tokens"][:, 0])}


def test_dict_inputs_and_pytree_outputs():
    model = DictModel(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = {
        "tokens": rng.integers(0, 10, (11, 6)).astype(np.int32),
        "features": rng.normal(size=(11, 2)).astype(np.float32),
    }
    out = predict(model, x, batch_size=4)
    reference = model({name: jnp.asarray(value) for name, value in x.items()})
    assert set(out) == {"hidden", "parts"} and isinstance(out["parts"], tuple)
    assert out["hidden"].shape == (11, 4) and isinstance(out["parts"][1], np.ndarray)
    np.testing.assert_allclose(out["hidden"], reference["hidden"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["parts"][1], x["tokens"][:, 0])


def test_bf16_precision_returns_float32_close_to_fp32(trained_state):
    x = _inputs(13)
    full = predict(trained_state, x, batch_size=BATCH)
    half = predict(trained_state, x, batch_size=BATCH, precision="bf16")
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, rtol=0.05, atol=0.05)
    assert not np.array_equal(half, full)  # it did run in bfloat16


@pytest.mark.parametrize(
    "x, match",
    [
        pytest.param(np.zeros((0, 3), np.float32), "0 examples", id="empty"),
        pytest.param({}, "no input arrays", id="no-arrays"),
        pytest.param(np.float32(1.0), "scalar.*x\\[None\\]", id="scalar"),
        pytest.param(
            {"a": np.zeros((3, 3)), "b": np.zeros((4, 3))}, "disagree", id="unequal-lengths"
        ),
    ],
)
def test_bad_inputs_raise_one_clear_error(trained_state, x, match):
    with pytest.raises(PredictInputError, match=match) as caught:
        predict(trained_state, x)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)


def test_bad_arguments_raise():
    with pytest.raises(PredictInputError, match="batch_size must be >= 1"):
        predict(Net(nnx.Rngs(0)), _inputs(2), batch_size=0)
    with pytest.raises(TypeError, match="NNX module or a jdl.TrainState"):
        predict(lambda x: x, _inputs(2))


def test_output_without_batch_axis_raises():
    class Total(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 1, rngs=rngs)

        def __call__(self, x):
            return self.linear(x).sum()

    with pytest.raises(PredictInputError, match="leading batch axis of 4"):
        predict(Total(nnx.Rngs(0)), _inputs(6), batch_size=4)


def test_a_donated_state_is_consumed_and_the_new_one_predicts(trained_state):
    # fit donates the state it is given to the compiled step, as this jit does.
    step = jax.jit(jdl.make_train_step(_loss), donate_argnums=0)
    given = jax.tree.map(jnp.copy, trained_state)
    new_state, _ = step(given, {"x": jnp.asarray(_inputs(16))})
    with pytest.raises(RuntimeError, match="deleted"):
        predict(given, _inputs(4))
    assert predict(new_state, _inputs(4)).shape == (4, 5)
