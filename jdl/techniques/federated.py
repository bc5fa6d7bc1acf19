"""Federated averaging (McMahan et al., 2017) over simulated clients, one compiled round.

Clients are simulated on one machine: their data is stacked into padded arrays
(`stack_clients`), and one call of the round function trains every participating
client for its local epochs *in parallel* with `jax.vmap` (no Python loop over clients)
and averages the results weighted by the clients' data sizes:

    params <- params - server_tx(params - sum_k (n_k / n) * params_k)

With `server_optimizer=optax.sgd(1.0)` this is exactly FedAvg (the new global model is the
weighted average); other optax optimizers give FedAdam / FedAvgM (Reddi et al., 2021).
The global model is a `jdl.TrainState` whose `step` counts rounds and whose `tx` is the
server optimizer, so it checkpoints like any other run.

    data = stack_clients(train["x"], train["y"], dirichlet_split(train["y"], 20, alpha=0.3))
    state = jdl.TrainState.create(model, optax.sgd(1.0), seed=0)
    run_round = jax.jit(make_fedavg_round(jdl.classification_loss(), local_optimizer=
        optax.sgd(0.05), local_epochs=1, batch_size=20, clients_per_round=10), donate_argnums=0)
    for _ in range(rounds):
        state, metrics = run_round(state, data)

Randomness: round r draws its participants from `fold_in(state.step_key("clients"), 0)`
and client k trains with key `fold_in(state.step_key("local"), k)`, epoch e of it shuffling
with `epoch_order(fold_in(that key, e), n_k, capacity)`; everything depends only on the
seed and the round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdl.state import TrainState
from jdl.steps import LossFn, reseed_all_streams

# ----------------------------------------------------------------------------- data splits


def iid_split(labels: np.ndarray, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Shuffles the examples and deals them into `num_clients` near-equal parts.

    Args:
      labels: int (N,) labels (only their number matters here).
      num_clients: K >= 1, at most N.
      seed: shuffle seed.

    Returns:
      K int64 index arrays, disjoint, together covering 0..N-1 exactly once; sizes differ
      by at most one.
    """
    n = _check_split_args(labels, num_clients)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def shard_split(
    labels: np.ndarray, num_clients: int, *, classes_per_client: int = 2, seed: int
) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: each client gets a few label shards.

    The examples are sorted by label and cut into `num_clients * classes_per_client`
    equal shards; each client receives `classes_per_client` random shards, so most
    clients see only that many classes.

    Returns:
      K index arrays covering every example exactly once.
    """
    n = _check_split_args(labels, num_clients)
    if classes_per_client < 1 or num_clients * classes_per_client > n:
        raise ValueError(
            f"classes_per_client must be >= 1 with num_clients * classes_per_client <= {n}, "
            f"got {classes_per_client}"
        )
    rng = np.random.default_rng(seed)
    by_label = np.lexsort((rng.permutation(n), np.asarray(labels)))  # shuffled within a label
    shards = np.array_split(by_label, num_clients * classes_per_client)
    shard_order = rng.permutation(len(shards)).reshape(num_clients, classes_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in shard_order]


def dirichlet_split(
    labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among clients in Dirichlet(alpha) shares.

    Small `alpha` (e.g. 0.1) gives clients dominated by one or two classes; large `alpha`
    approaches an IID split (Hsu et al., 2019). Draws are repeated until every client
    holds at least `min_size` examples.

    Returns:
      K index arrays covering every example exactly once.

    Raises:
      ValueError: alpha <= 0, or no draw met `min_size` in `max_tries` tries.
    """
    n = _check_split_args(labels, num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_size:
            return result
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n} examples gave all {num_clients} clients "
        f"at least {min_size} examples in {max_tries} tries; raise alpha or lower min_size"
    )


def _check_split_args(labels: np.ndarray, num_clients: int) -> int:
    n = len(labels)
    if not 1 <= num_clients <= n:
        raise ValueError(
            f"num_clients must be in [1, {n}] (the number of examples), got {num_clients}"
        )
    return n


# ----------------------------------------------------------------------------- client data


class ClientData(NamedTuple):
    """All clients' examples, padded to one capacity so that they can be vmapped.

    Attributes:
      x: (K, capacity, ...) inputs; rows past a client's size are zeros.
      y: (K, capacity) int32 labels; rows past a client's size are 0.
      sizes: (K,) int32 number of real examples per client (n_k).
    """

    x: jax.Array
    y: jax.Array
    sizes: jax.Array

    @property
    def num_clients(self) -> int:
        return self.sizes.shape[0]

    @property
    def capacity(self) -> int:
        return self.x.shape[1]


def stack_clients(x: np.ndarray, y: np.ndarray, client_indices: Sequence[np.ndarray]) -> ClientData:
    """Gathers each client's examples and pads them to the largest client's size.

    Args:
      x: (N, ...) inputs; y: (N,) int labels.
      client_indices: one index array per client (e.g. from `dirichlet_split`); none empty.

    Returns:
      `ClientData` on the default device.
    """
    if any(len(idx) == 0 for idx in client_indices):
        raise ValueError("every client needs at least one example")
    sizes = np.array([len(idx) for idx in client_indices], np.int32)
    capacity = int(sizes.max())
    xs = np.zeros((len(sizes), capacity, *np.shape(x)[1:]), np.asarray(x).dtype)
    ys = np.zeros((len(sizes), capacity), np.int32)
    for k, idx in enumerate(client_indices):
        xs[k, : len(idx)] = np.asarray(x)[idx]
        ys[k, : len(idx)] = np.asarray(y)[idx]
    return ClientData(jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(sizes))


def epoch_order(key: jax.Array, size: jax.Array, capacity: int) -> jax.Array:
    """A client's example order for one epoch: a permutation of 0..size-1, then padding.

    Args:
      key: the epoch's key.
      size: int32 scalar, the client's number of examples (may be traced).
      capacity: static length of the result.

    Returns:
      int32 (capacity,): entries [0, size) are a random permutation of range(size);
      entries [size, capacity) are size, size+1, ... (padding rows, masked out by callers).
    """
    position = jnp.arange(capacity)
    scores = jnp.where(position < size, jax.random.uniform(key, (capacity,)), 2.0 + position)
    return jnp.argsort(scores).astype(jnp.int32)


# ----------------------------------------------------------------------------- averaging


def weighted_average(stacked: Any, weights: jax.Array) -> Any:
    """`sum_k weights[k] * stacked[k]` for every leaf of a pytree stacked on axis 0.

    Args:
      stacked: pytree whose leaves have a leading client axis (K, ...).
      weights: (K,) float weights (FedAvg: n_k / sum of n over the participants).

    Returns:
      A pytree like one client's slice, in each leaf's dtype.
    """
    return jax.tree.map(
        lambda leaf: jnp.tensordot(weights.astype(jnp.float32), leaf, axes=1).astype(leaf.dtype),
        stacked,
    )


# ----------------------------------------------------------------------------- the round


def make_fedavg_round(
    loss_fn: LossFn,
    *,
    local_optimizer: optax.GradientTransformation,
    local_epochs: int,
    batch_size: int,
    clients_per_round: int,
):
    """Builds one FedAvg communication round: `(state, clients) -> (state, metrics)`.

    Each round samples `clients_per_round` distinct clients (uniformly, from the round's
    key), trains each from the global params for `local_epochs` epochs of mini-batch
    `local_optimizer` steps over its own data (a fresh optimizer state every round; the
    last batch of an epoch may be smaller, its padding rows are masked out of the loss),
    and lets the server optimizer `state.tx` apply the pseudo-gradient
    `params - weighted_average(client params, n_k / sum n)`. Non-parameter model state
    (e.g. batch-norm statistics) is kept from the server, not averaged.

    Args:
      loss_fn: the usual jdl loss function, per-example "loss" (see `jdl.steps`).
      local_optimizer: the clients' optimizer (McMahan et al.: plain SGD).
      local_epochs: E >= 1 passes over each client's data per round.
      batch_size: B >= 1 local mini-batch size.
      clients_per_round: number of participants m, 1 <= m <= K (checked when called).

    Returns:
      round_fn (Callable): pure `(state, clients) -> (state, metrics)`; jit it once (donating
        the state). `state.step` is the round count. Metrics: "loss" (participants' mean local
        training loss, weighted by n_k), "examples" (examples held by the participants).
    """
    if local_epochs < 1 or batch_size < 1 or clients_per_round < 1:
        raise ValueError(
            "local_epochs, batch_size and clients_per_round must be >= 1, got "
            f"{local_epochs}, {batch_size}, {clients_per_round}"
        )

    def round_fn(state: TrainState, clients: ClientData):
        if clients_per_round > clients.num_clients:
            raise ValueError(
                f"clients_per_round={clients_per_round} exceeds the {clients.num_clients} clients"
            )
        chosen = participants(state, clients.num_clients, clients_per_round)
        local_keys = jax.vmap(lambda k: jax.random.fold_in(state.step_key("local"), k))(chosen)
        train_client = make_local_training(
            loss_fn,
            state.graphdef,
            local_optimizer,
            local_epochs=local_epochs,
            batch_size=batch_size,
        )
        client_params, client_loss = jax.vmap(train_client, in_axes=(None, None, 0, 0, 0, 0))(
            state.params,
            state.model_state,
            clients.x[chosen],
            clients.y[chosen],
            clients.sizes[chosen],
            local_keys,
        )
        sizes = clients.sizes[chosen].astype(jnp.float32)
        weights = sizes / jnp.sum(sizes)
        average = weighted_average(client_params, weights)
        pseudo_grad = jax.tree.map(jnp.subtract, state.params, average)
        updates, opt_state = state.tx.update(pseudo_grad, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        metrics = {"loss": jnp.sum(weights * client_loss), "examples": jnp.sum(sizes)}
        return new_state, metrics

    return round_fn


def participants(state: TrainState, num_clients: int, clients_per_round: int) -> jax.Array:
    """The sorted int32 ids of this round's clients (distinct; fixed by seed and round)."""
    key = jax.random.fold_in(state.step_key("clients"), 0)
    chosen = jax.random.choice(key, num_clients, (clients_per_round,), replace=False)
    return jnp.sort(chosen).astype(jnp.int32)


def make_local_training(
    loss_fn: LossFn,
    graphdef: nnx.GraphDef,
    local_optimizer: optax.GradientTransformation,
    *,
    local_epochs: int,
    batch_size: int,
):
    """One client's local training: `(params, model_state, x, y, size, key) -> (params, loss)`.

    Runs `local_epochs` epochs; epoch e visits the examples in `epoch_order(fold_in(key, e),
    size, capacity)` in batches of `batch_size` (`ceil(size / batch_size)` steps, the last
    one possibly partial and averaged over its real rows only). Steps past a client's own
    count (clients differ in size, the program has one shape) change nothing.

    Returns the trained params and the mean training loss over its steps.
    """

    def train(params, model_state, x, y, size, key):
        capacity = x.shape[0]
        max_steps = math.ceil(capacity / batch_size)
        steps = (size + batch_size - 1) // batch_size  # this client's steps per epoch
        padded = max_steps * batch_size

        def loss_of(p, batch, valid, step_key):
            model = nnx.merge(graphdef, p, model_state, copy=True)
            model.train()
            reseed_all_streams(model, step_key)
            per_example = loss_fn(model, batch)["loss"]
            return jnp.sum(jnp.where(valid, per_example, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

        def one_epoch(carry, epoch):
            epoch_key = jax.random.fold_in(key, epoch)
            order = epoch_order(epoch_key, size, capacity)
            order = jnp.concatenate([order, jnp.full(padded - capacity, capacity, jnp.int32)])

            def one_step(carry, step):
                p, opt_state, loss_sum = carry
                rows = jax.lax.dynamic_slice(order, (step * batch_size,), (batch_size,))
                valid = rows < size
                rows = jnp.minimum(rows, capacity - 1)
                batch = {"x": x[rows], "y": y[rows]}
                loss, grads = jax.value_and_grad(loss_of)(
                    p, batch, valid, jax.random.fold_in(epoch_key, step)
                )
                updates, new_opt = local_optimizer.update(grads, opt_state, p)
                new = (optax.apply_updates(p, updates), new_opt, loss_sum + loss)
                active = step < steps
                return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, carry), None

            carry, _ = jax.lax.scan(one_step, carry, jnp.arange(max_steps))
            return carry, None

        init = (params, local_optimizer.init(params), jnp.zeros((), jnp.float32))
        (params, _, loss_sum), _ = jax.lax.scan(one_epoch, init, jnp.arange(local_epochs))
        return params, loss_sum / jnp.maximum(local_epochs * steps, 1)

    return train
