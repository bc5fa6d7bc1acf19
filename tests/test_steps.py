"""The pure train and eval steps: gradients, modes, randomness, model state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl


class LinearRegression(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)[:, 0]


def mse_loss(model, batch):
    return {"loss": jdl.losses.mse(predictions=model(batch["x"]), targets=batch["y"])}


def test_sgd_step_matches_hand_computed_gradient():
    model = LinearRegression(nnx.Rngs(0))
    state = jdl.TrainState.create(model, optax.sgd(0.1), seed=0)
    x = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    y = jnp.array([1.0, -2.0])
    w = np.asarray(model.linear.kernel[...])[:, 0]
    b = float(model.linear.bias[0])
    residual = np.asarray(x) @ w + b - np.asarray(y)
    grad_w = 2 * np.asarray(x).T @ residual / len(y)
    grad_b = 2 * residual.mean()
    new_state, metrics = jax.jit(jdl.make_train_step(mse_loss))(state, {"x": x, "y": y})
    new_model = new_state.model()
    np.testing.assert_allclose(new_model.linear.kernel[...][:, 0], w - 0.1 * grad_w, rtol=1e-5)
    np.testing.assert_allclose(new_model.linear.bias[0], b - 0.1 * grad_b, rtol=1e-5)
    assert float(metrics["loss"]) == pytest.approx(np.mean(residual**2), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(
        np.sqrt(np.sum(grad_w**2) + grad_b**2), rel=1e-5
    )
    assert int(new_state.step) == 1


def test_norm_metrics_off_drops_the_norms_not_the_update():
    x = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    batch = {"x": x, "y": jnp.array([1.0, -2.0])}
    state = jdl.TrainState.create(LinearRegression(nnx.Rngs(0)), optax.sgd(0.1), seed=0)
    with_norms, full = jax.jit(jdl.make_train_step(mse_loss))(state, batch)
    without, lean = jax.jit(jdl.make_train_step(mse_loss, norm_metrics=False))(state, batch)
    assert {"grad_norm", "param_norm"} <= set(full) and not {"grad_norm", "param_norm"} & set(lean)
    for a, b in zip(jax.tree.leaves(with_norms), jax.tree.leaves(without), strict=True):
        np.testing.assert_array_equal(a, b)
    # Skipping non-finite steps still looks at the gradients without the metric.
    bad = {"x": x.at[0, 0].set(jnp.inf), "y": batch["y"]}
    step = jax.jit(jdl.make_train_step(mse_loss, norm_metrics=False, skip_nonfinite=True))
    skipped, metrics = step(state, bad)
    assert float(metrics["skipped_steps"]) == 1.0
    np.testing.assert_array_equal(
        skipped.params["linear"]["kernel"], state.params["linear"]["kernel"]
    )


class DropoutProbe(nnx.Module):
    def __init__(self, rngs):
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.scale = nnx.Param(jnp.ones(()))

    def __call__(self, x):
        return self.dropout(x) * self.scale


def _dropout_mask(state, x):
    def probe_loss(model, batch):
        out = model(batch["x"])
        return {"loss": jnp.mean(out, axis=-1), "kept": jnp.mean(out != 0, axis=-1)}

    step = jax.jit(jdl.make_train_step(probe_loss))
    new_state, metrics = step(state, {"x": x})
    return new_state, float(metrics["kept"])


def test_dropout_depends_only_on_seed_and_step():
    x = jnp.ones((4, 256))
    state = jdl.TrainState.create(DropoutProbe(nnx.Rngs(0, dropout=1)), optax.sgd(0.0), seed=7)
    probe = jax.jit(lambda s: s.model())
    s1, kept1 = _dropout_mask(state, x)
    _, kept1_again = _dropout_mask(state, x)
    _, kept2 = _dropout_mask(s1, x)
    other = jdl.TrainState.create(DropoutProbe(nnx.Rngs(0, dropout=99)), optax.sgd(0.0), seed=7)
    _, kept_other_init = _dropout_mask(other, x)
    assert 0.4 < kept1 < 0.6
    assert kept1 == kept1_again  # same seed, same step: same mask
    assert kept1 != kept2  # next step: new mask
    assert kept1 == kept_other_init  # the model's own stream seed does not matter
    assert probe(state) is not None


def test_eval_step_is_deterministic_and_uses_running_stats():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 4, rngs=rngs)
            self.norm = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.dropout(self.norm(self.linear(x)))

    def loss(model, batch):
        out = model(batch["x"])
        return {"loss": jnp.mean(out**2, axis=-1), "out0": out[:, 0]}

    state = jdl.TrainState.create(Net(nnx.Rngs(0)), optax.sgd(0.0), seed=0)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3)) * 3 + 1
    new_state, _ = jax.jit(jdl.make_train_step(loss))(state, {"x": x})
    mean_before = np.asarray(state.model().norm.mean[...])
    mean_after = np.asarray(new_state.model().norm.mean[...])
    assert not np.allclose(mean_before, mean_after), "train step must update batch statistics"
    eval_step = jax.jit(jdl.make_eval_step(loss))
    a, b = eval_step(new_state, {"x": x}), eval_step(new_state, {"x": x})
    np.testing.assert_array_equal(a["out0"], b["out0"])
    model = new_state.model()
    model.eval()
    np.testing.assert_allclose(a["out0"], model(x)[:, 0], rtol=1e-5)


def test_loss_fn_contract_errors():
    state = jdl.TrainState.create(LinearRegression(nnx.Rngs(0)), optax.sgd(0.1), seed=0)
    batch = {"x": jnp.ones((2, 3)), "y": jnp.ones(2)}
    with pytest.raises(ValueError, match="\"loss\" entry.*got a dict with entries \\['mse'\\]"):
        jdl.make_train_step(lambda m, b: {"mse": m(b["x"])})(state, batch)
    with pytest.raises(ValueError, match="per-example"):
        jdl.make_train_step(lambda m, b: {"loss": jnp.ones((2, 2))})(state, batch)


@pytest.mark.parametrize(
    "returns, got",
    [
        pytest.param(
            lambda m, b: jnp.mean((m(b["x"]) - b["y"]) ** 2),
            "got an array of shape () and dtype float32",
            id="scalar",
        ),
        pytest.param(
            lambda m, b: (m(b["x"]) - b["y"]) ** 2,
            "got an array of shape (2,) and dtype float32",
            id="per-example-array",
        ),
        pytest.param(lambda m, b: (jnp.mean(m(b["x"])), {}), "got a tuple", id="tuple"),
        pytest.param(lambda m, b: {"loss": "x"}, "entry 'loss' is a str", id="str-entry"),
    ],
)
def test_loss_fn_returning_no_dict_names_what_it_got(returns, got):
    # A scalar loss used to fail deep inside with "TypeError: Array.__contains__".
    state = jdl.TrainState.create(LinearRegression(nnx.Rngs(0)), optax.sgd(0.1), seed=0)
    batch = {"x": jnp.ones((2, 3)), "y": jnp.ones(2)}
    for step in (jax.jit(jdl.make_train_step(returns)), jax.jit(jdl.make_eval_step(returns))):
        with pytest.raises(jdl.steps.LossOutputError) as caught:
            step(state, batch)
        message = str(caught.value)
        assert isinstance(caught.value, jdl.errors.UserError)
        assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)
        assert 'a dict with a "loss" entry of per-example values, shape (B,)' in message
        assert got in message and "\n" not in message
        assert "Tracer" not in message


def test_train_step_carries_its_lr_schedule():
    tx, schedule = jdl.make_optimizer("sgd", learning_rate=0.1, schedule="cosine", total_steps=7)
    step = jdl.make_train_step(mse_loss, lr_schedule=schedule)
    assert step.lr_schedule is schedule and step.lr_schedule.total_steps == 7
    assert jdl.make_train_step(mse_loss).lr_schedule is None


def test_state_create_does_not_alias_the_model():
    model = LinearRegression(nnx.Rngs(0))
    state = jdl.TrainState.create(model, optax.sgd(0.1), seed=0)
    batch = {"x": jnp.ones((2, 3)), "y": jnp.zeros(2)}
    jax.jit(jdl.make_train_step(mse_loss), donate_argnums=0)(state, batch)
    # The donated state must not have invalidated the user's model arrays.
    assert np.isfinite(np.asarray(model.linear.kernel[...])).all()
    assert jdl.count_params(state.params) == 4


class DropoutNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(6, 16, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(jax.nn.relu(self.hidden(x))))


def _softmax_loss(model, batch):
    logits = model(batch["x"]).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return {"loss": loss, "accuracy": jnp.argmax(logits, -1) == batch["y"]}


def _reference_step(state, batch, *, micro_batches):
    """One bf16, micro-batched, non-finite-skipping step in plain jax/optax/nnx."""
    to_bf16 = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )

    def loss_of(params, model_state, micro_batch, key):
        model = nnx.merge(state.graphdef, to_bf16(params), model_state, copy=True)
        model.train()
        nnx.reseed(model, dropout=jax.random.fold_in(key, 0))  # the model's one stream
        values = _softmax_loss(model, to_bf16(micro_batch))
        means = {name: jnp.mean(jnp.asarray(v, jnp.float32)) for name, v in values.items()}
        return means["loss"], (means, nnx.split(model, nnx.Param, ...)[2])

    key = state.step_key("model")
    micro = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), batch)

    def one(carry, inputs):
        metric_sums, grad_sums, model_state = carry
        index, micro_batch = inputs
        (_, (metrics, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params, model_state, micro_batch, jax.random.fold_in(key, index)
        )
        add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
        return (add(metric_sums, metrics), add(grad_sums, grads), model_state), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    metric_zeros = {"loss": jnp.zeros(()), "accuracy": jnp.zeros(())}
    (metric_sums, grad_sums, model_state), _ = jax.lax.scan(
        one,
        (metric_zeros, zeros, state.model_state),
        (jnp.arange(micro_batches), micro),
    )
    metrics = jax.tree.map(lambda s: s / micro_batches, metric_sums)
    grads = jax.tree.map(lambda s: s / micro_batches, grad_sums)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    metrics["skipped_steps"] = 1.0 - finite.astype(jnp.float32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        model_state=keep(model_state, state.model_state),
    )
    return new_state, metrics


def _leaves(tree):
    return [
        np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for x in jax.tree.leaves(tree)
    ]


def test_named_parts_compose_to_a_plain_jax_reference_step_bitwise():
    # The composed step (batch_gradients -> accumulated_gradients -> apply_gradients ->
    # keep_if_finite) computes what a plain jax/optax step computes, bit for bit, over
    # several steps with dropout, two micro-batches, bf16 and a skipped non-finite batch.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-2))
    state = jdl.TrainState.create(DropoutNet(nnx.Rngs(0, dropout=1)), tx, seed=3)
    streams = {
        n.key.tag for _, n in nnx.graph.iter_graph(state.model()) if isinstance(n, nnx.RngStream)
    }
    assert streams == {"dropout"}  # the reference reseeds exactly these
    rng = np.random.default_rng(0)
    batches = [
        {
            "x": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 3, 8), jnp.int32),
        }
        for _ in range(5)
    ]
    batches[2]["x"] = batches[2]["x"].at[0, 0].set(jnp.nan)
    step = jax.jit(
        jdl.make_train_step(_softmax_loss, micro_batches=2, skip_nonfinite=True, precision="bf16")
    )
    reference = jax.jit(lambda s, b: _reference_step(s, b, micro_batches=2))
    ours, theirs = state, state
    for index, batch in enumerate(batches):
        ours, our_metrics = step(ours, batch)
        theirs, their_metrics = reference(theirs, batch)
        assert float(our_metrics["skipped_steps"]) == (1.0 if index == 2 else 0.0)
        assert our_metrics.keys() == their_metrics.keys()
        for name in our_metrics:
            np.testing.assert_array_equal(our_metrics[name], their_metrics[name], err_msg=name)
        for a, b in zip(_leaves(ours), _leaves(theirs), strict=True):
            np.testing.assert_array_equal(a, b)
    assert int(ours.step) == 5
    assert not np.array_equal(_leaves(ours.params)[0], _leaves(state.params)[0])


def test_apply_gradients_is_an_optax_update_plus_one_step():
    tx = optax.adam(0.1)
    state = jdl.TrainState.create(LinearRegression(nnx.Rngs(0)), tx, seed=0)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    expected = optax.apply_updates(state.params, updates)
    new = state.apply_gradients(grads)  # eagerly, as the expectation: the same roundings
    assert int(new.step) == 1 and new.ema is None
    for a, b in zip(
        jax.tree.leaves((new.params, new.opt_state)),
        jax.tree.leaves((expected, opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert new.model_state is state.model_state  # kept when none is given
    replacement = jax.tree.map(lambda x: x, state.model_state)
    assert state.apply_gradients(grads, model_state=replacement).model_state is replacement


def test_batch_gradients_match_jax_grad_of_the_mean_loss():
    state = jdl.TrainState.create(LinearRegression(nnx.Rngs(0)), optax.sgd(0.1), seed=0)
    batch = {"x": jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]), "y": jnp.array([1.0, -2.0])}

    def mean_loss(params):
        return jnp.mean(mse_loss(state.model(params), batch)["loss"])

    metrics, model_state, grads = jdl.steps.batch_gradients(
        mse_loss, state, batch, jax.random.PRNGKey(0)
    )
    for a, b in zip(
        jax.tree.leaves(grads), jax.tree.leaves(jax.grad(mean_loss)(state.params)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(mean_loss(state.params)), rel=1e-6)
    whole = jdl.steps.accumulated_gradients(mse_loss, state, batch)
    halves = jdl.steps.accumulated_gradients(mse_loss, state, batch, micro_batches=2)
    for a, b in zip(jax.tree.leaves(whole[2]), jax.tree.leaves(halves[2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
