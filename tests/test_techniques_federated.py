"""FedAvg: splits, weighted averaging, equivalence with local training, participation."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl.techniques import federated

LABELS = np.repeat(np.arange(10), 30)[np.random.default_rng(0).permutation(300)]


def _assert_partition(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize(
    "split",
    [
        lambda: federated.iid_split(LABELS, 7, seed=0),
        lambda: federated.shard_split(LABELS, 10, classes_per_client=2, seed=0),
        lambda: federated.dirichlet_split(LABELS, 6, alpha=0.2, seed=0),
        lambda: federated.dirichlet_split(LABELS, 6, alpha=100.0, seed=1),
    ],
)
def test_splits_cover_every_example_exactly_once(split):
    _assert_partition(split(), len(LABELS))


def test_iid_split_is_balanced_and_deterministic():
    parts = federated.iid_split(LABELS, 7, seed=3)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    again = federated.iid_split(LABELS, 7, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def _classes_per_client(parts):
    return [len(np.unique(LABELS[p])) for p in parts]


def test_shard_split_gives_each_client_about_two_classes():
    parts = federated.shard_split(LABELS, 10, classes_per_client=2, seed=0)
    assert all(len(p) == 30 for p in parts)
    # 20 shards of 15 examples over classes of 30: a client holds 1 or 2 classes
    assert max(_classes_per_client(parts)) <= 2


def test_dirichlet_split_skews_labels_more_for_small_alpha():
    def dominant_share(parts):  # mean share of each client's most common label
        return np.mean([np.bincount(LABELS[p]).max() / len(p) for p in parts])

    skewed = federated.dirichlet_split(LABELS, 6, alpha=0.1, seed=0, min_size=5)
    even = federated.dirichlet_split(LABELS, 6, alpha=1000.0, seed=0, min_size=5)
    assert dominant_share(skewed) > 0.4
    assert dominant_share(even) < 0.2  # IID-like: about 1/10 each
    assert all(len(p) >= 5 for p in skewed)


def test_split_errors_are_clear():
    with pytest.raises(ValueError, match="num_clients"):
        federated.iid_split(LABELS, 0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        federated.dirichlet_split(LABELS, 3, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="min_size"):
        federated.dirichlet_split(LABELS, 30, alpha=0.01, seed=0, min_size=10, max_tries=3)


def test_weighted_average_by_hand():
    stacked = {
        "w": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
        "b": jnp.array([1.0, 2.0, 4.0]),
    }
    sizes = jnp.array([10.0, 30.0, 60.0])
    average = federated.weighted_average(stacked, sizes / sizes.sum())
    np.testing.assert_allclose(
        average["w"], [0.1 * 1 + 0.3 * 3 + 0.6 * 5, 0.1 * 2 + 0.3 * 4 + 0.6 * 6]
    )
    np.testing.assert_allclose(average["b"], 0.1 * 1 + 0.3 * 2 + 0.6 * 4, rtol=1e-6)


def test_epoch_order_permutes_the_real_rows_first():
    order = np.asarray(federated.epoch_order(jax.random.PRNGKey(0), jnp.int32(5), 8))
    assert sorted(order[:5]) == list(range(5))
    np.testing.assert_array_equal(order[5:], [5, 6, 7])


def _model():
    return jdl.models.MLP(6, (8,), 3, rngs=nnx.Rngs(0))


def _data(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def _reference_local_training(state, x, y, key, *, lr, epochs, batch_size):
    """Plain mini-batch SGD with the documented batch order, one Python step at a time."""
    loss_fn = jdl.classification_loss()
    params = state.params

    def mean_loss(p, xb, yb):
        return jnp.mean(
            loss_fn(nnx.merge(state.graphdef, p, state.model_state), {"x": xb, "y": yb})["loss"]
        )

    grad_fn = jax.jit(jax.grad(mean_loss))
    for epoch in range(epochs):
        order = np.asarray(federated.epoch_order(jax.random.fold_in(key, epoch), len(y), len(y)))
        for start in range(0, len(y), batch_size):
            rows = order[start : start + batch_size]
            grads = grad_fn(params, x[rows], y[rows])
            params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    return params


def test_one_client_full_participation_equals_local_training():
    x, y = _data()
    clients = federated.stack_clients(x, y, [np.arange(len(y))])
    state = jdl.TrainState.create(_model(), optax.sgd(1.0), seed=4)
    round_fn = jax.jit(
        federated.make_fedavg_round(
            jdl.classification_loss(),
            local_optimizer=optax.sgd(0.3),
            local_epochs=2,
            batch_size=5,  # 23 = 4 full batches + a partial one
            clients_per_round=1,
        )
    )
    key = jax.random.fold_in(state.step_key("local"), 0)
    expected = _reference_local_training(state, x, y, key, lr=0.3, epochs=2, batch_size=5)
    new_state, metrics = round_fn(state, clients)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert int(new_state.step) == 1 and float(metrics["examples"]) == 23


def test_round_averages_client_models_weighted_by_size():
    x, y = _data(40)
    parts = [np.arange(0, 5), np.arange(5, 20), np.arange(20, 40)]
    clients = federated.stack_clients(x, y, parts)
    state = jdl.TrainState.create(_model(), optax.sgd(1.0), seed=0)
    kwargs = dict(local_optimizer=optax.sgd(0.1), local_epochs=1, batch_size=4)
    round_fn = jax.jit(
        federated.make_fedavg_round(jdl.classification_loss(), clients_per_round=3, **kwargs)
    )
    new_state, _ = round_fn(state, clients)
    # each client alone, trained by the same code with its own key, then averaged by hand
    train = jax.jit(
        federated.make_local_training(
            jdl.classification_loss(),
            state.graphdef,
            kwargs["local_optimizer"],
            local_epochs=1,
            batch_size=4,
        )
    )
    locals_ = [
        train(
            state.params,
            state.model_state,
            clients.x[k],
            clients.y[k],
            clients.sizes[k],
            jax.random.fold_in(state.step_key("local"), k),
        )[0]
        for k in range(3)
    ]
    expected = jax.tree.map(lambda a, b, c: (5 * a + 15 * b + 20 * c) / 40, *locals_)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_partial_participation_is_deterministic_by_seed_and_round():
    def chosen(seed, rounds):
        state = jdl.TrainState.create(_model(), optax.sgd(1.0), seed=seed)
        picks = []
        for r in range(rounds):
            state = state.replace(step=jnp.int32(r))
            picks.append(tuple(np.asarray(federated.participants(state, 10, 3))))
        return picks

    first = chosen(0, 6)
    assert first == chosen(0, 6)
    assert first != chosen(1, 6)
    assert len(set(first)) > 1  # a new sample every round
    assert all(len(set(p)) == 3 and all(0 <= c < 10 for c in p) for p in first)


def test_too_many_clients_per_round_is_a_clear_error():
    x, y = _data()
    clients = federated.stack_clients(x, y, federated.iid_split(y, 2, seed=0))
    state = jdl.TrainState.create(_model(), optax.sgd(1.0), seed=0)
    round_fn = federated.make_fedavg_round(
        jdl.classification_loss(),
        local_optimizer=optax.sgd(0.1),
        local_epochs=1,
        batch_size=4,
        clients_per_round=3,
    )
    with pytest.raises(ValueError, match="clients_per_round=3 exceeds the 2 clients"):
        round_fn(state, clients)


def test_experiment_smoke(tmp_path, capsys, monkeypatch):
    from experiments import federated_mnist

    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "no-data"))
    assert "python -m experiments.federated_mnist" in federated_mnist.__doc__
    final = federated_mnist.main(
        [
            "--config.rounds=2",
            "--config.report_rounds=(1, 2)",
            "--config.splits=('shards',)",
            "--config.num_clients=4",
            "--config.local_batch_size=200",
            "--config.hidden_sizes=(16,)",
            "--config.compilation_cache=false",
            "--config.download=false",
            "--workdir",
            str(tmp_path / "run"),
        ]
    )
    out = capsys.readouterr().out
    assert "| round | shards |" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("FINAL ") and json.loads(last[6:]) == final
    assert final["rounds"] == [1, 2] and len(final["shards"]) == 2
    assert all(0 <= a <= 1 and not math.isnan(a) for a in final["shards"])


def test_experiment_rejects_unknown_split(tmp_path):
    from experiments import federated_mnist

    with pytest.raises(SystemExit, match="config.splits"):
        federated_mnist.main(["--config.splits=('iid', 'noniid')", "--workdir", str(tmp_path)])
