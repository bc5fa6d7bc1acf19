"""Tests for jdl.optim: torch.optim parity, schedules, decay mask, clipping, accumulation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from jdl.errors import UserError
from jdl.optim import (
    OPTIMIZERS,
    SCHEDULES,
    OptimizerConfigError,
    default_decay_mask,
    make_optimizer,
    make_schedule,
)

NUM_STEPS = 10


# ----------------------------------------------------------------------------- helpers


def _problem(
    seed: int = 0, dtype: type = np.float32
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A small linear least-squares problem: params, inputs (8, 5), targets (8, 3)."""
    rng = np.random.default_rng(seed)
    params = {
        "kernel": rng.normal(size=(5, 3)).astype(dtype),
        "bias": rng.normal(size=(3,)).astype(dtype),
    }
    x = rng.normal(size=(8, 5)).astype(dtype)
    y = rng.normal(size=(8, 3)).astype(dtype)
    return params, x, y


def _loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((x @ params["kernel"] + params["bias"] - y) ** 2)


def _train_jdl(tx: optax.GradientTransformation, params, x, y, steps: int = NUM_STEPS):
    @jax.jit
    def step(params, state):
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return jax.tree.map(np.asarray, params)


def _train_torch(make_opt, params, x, y, steps: int = NUM_STEPS, make_sched=None):
    kernel = torch.tensor(params["kernel"], requires_grad=True)
    bias = torch.tensor(params["bias"], requires_grad=True)
    opt = make_opt(kernel, bias)
    sched = make_sched(opt) if make_sched else None
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        torch.mean((xt @ kernel + bias - yt) ** 2).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {"kernel": kernel.detach().numpy(), "bias": bias.detach().numpy()}


def _decayed_groups(kernel, bias, weight_decay: float) -> list[dict]:
    """torch param groups matching default_decay_mask: decay the kernel only."""
    return [
        {"params": [kernel], "weight_decay": weight_decay},
        {"params": [bias], "weight_decay": 0.0},
    ]


# ----------------------------------------------------------------------------- torch parity

TORCH_CASES = [
    pytest.param(
        "sgd",
        dict(learning_rate=0.1),
        lambda k, b: torch.optim.SGD([k, b], lr=0.1),
        id="sgd",
    ),
    pytest.param(
        "sgd",
        dict(learning_rate=0.1, weight_decay=0.05),
        lambda k, b: torch.optim.SGD(_decayed_groups(k, b, 0.05), lr=0.1),
        id="sgd-weight-decay",
    ),
    pytest.param(
        "momentum",
        dict(learning_rate=0.05, momentum=0.8),
        lambda k, b: torch.optim.SGD([k, b], lr=0.05, momentum=0.8),
        id="momentum",
    ),
    pytest.param(
        "nesterov",
        dict(learning_rate=0.05, momentum=0.8),
        lambda k, b: torch.optim.SGD([k, b], lr=0.05, momentum=0.8, nesterov=True),
        id="nesterov",
    ),
    pytest.param(
        "momentum",
        dict(learning_rate=0.05, momentum=0.8, nesterov=True),
        lambda k, b: torch.optim.SGD([k, b], lr=0.05, momentum=0.8, nesterov=True),
        id="momentum-nesterov-flag",
    ),
    pytest.param(
        "adam",
        dict(learning_rate=0.05, b1=0.8, b2=0.95, eps=1e-6),
        lambda k, b: torch.optim.Adam([k, b], lr=0.05, betas=(0.8, 0.95), eps=1e-6),
        id="adam",
    ),
    pytest.param(
        "adamw",
        dict(learning_rate=0.05, weight_decay=0.1),
        lambda k, b: torch.optim.AdamW(_decayed_groups(k, b, 0.1), lr=0.05),
        id="adamw",
    ),
    pytest.param(
        "adamw",
        dict(learning_rate=0.05, weight_decay=0.1, decay_mask=None),
        lambda k, b: torch.optim.AdamW([k, b], lr=0.05, weight_decay=0.1),
        id="adamw-decay-all",
    ),
    pytest.param(
        "rmsprop",
        dict(learning_rate=0.01, alpha=0.9, eps=1e-6),
        lambda k, b: torch.optim.RMSprop([k, b], lr=0.01, alpha=0.9, eps=1e-6),
        id="rmsprop",
    ),
    pytest.param(
        "adagrad",
        dict(learning_rate=0.1, eps=1e-10),
        lambda k, b: torch.optim.Adagrad([k, b], lr=0.1, eps=1e-10),
        id="adagrad",
    ),
]


# Parity runs in float64 in both frameworks: in float32, Adam-like optimizers turn
# rounding noise in near-zero gradient entries into O(lr) step differences, which
# would hide the comparison of the update rules themselves.


@pytest.mark.parametrize("name, kwargs, make_torch_opt", TORCH_CASES)
def test_matches_torch_optim(name, kwargs, make_torch_opt):
    params, x, y = _problem(dtype=np.float64)
    tx, _ = make_optimizer(name, **kwargs)
    with jax.enable_x64(True):
        ours = _train_jdl(tx, params, x, y)
    theirs = _train_torch(make_torch_opt, params, x, y)
    for key in params:
        assert ours[key].dtype == theirs[key].dtype == np.float64
        assert not np.allclose(ours[key], params[key]), f"{key} did not move"
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_step_schedule_matches_torch_multistep_lr():
    params, x, y = _problem(dtype=np.float64)
    tx, _ = make_optimizer(
        "momentum",
        learning_rate=0.05,
        total_steps=NUM_STEPS,
        schedule="step",
        step_boundaries=(3, 6),
        decay_factor=0.5,
    )
    with jax.enable_x64(True):
        ours = _train_jdl(tx, params, x, y)
    theirs = _train_torch(
        lambda k, b: torch.optim.SGD([k, b], lr=0.05, momentum=0.9),
        params,
        x,
        y,
        make_sched=lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [3, 6], gamma=0.5),
    )
    for key in params:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-9, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("name", ["lamb"])
def test_optimizers_without_torch_counterpart_reduce_the_loss(name):
    params, x, y = _problem()
    tx, _ = make_optimizer(name, learning_rate=0.05, weight_decay=0.01)
    trained = _train_jdl(tx, params, x, y)
    assert _loss(trained, x, y) < _loss(params, x, y)


# ----------------------------------------------------------------------------- schedules


def _cos(lr: float, end: float, t: float, steps: float) -> float:
    """Reference cosine decay from lr to end over `steps`."""
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))


SCHEDULE_CASES = [
    pytest.param(
        "constant", dict(total_steps=100), [(0, 0.1), (50, 0.1), (99, 0.1)], id="constant"
    ),
    pytest.param(
        "constant",
        dict(total_steps=100, warmup_steps=10),
        [(0, 0.0), (5, 0.05), (10, 0.1), (99, 0.1)],
        id="constant-warmup",
    ),
    pytest.param(
        "step",
        dict(total_steps=100, step_boundaries=(30, 60)),
        [(0, 0.1), (29, 0.1), (30, 0.01), (59, 0.01), (60, 0.001), (99, 0.001)],
        id="step-ints",
    ),
    pytest.param(
        "step",
        dict(total_steps=200, step_boundaries=(0.5, 0.75), decay_factor=0.5),
        [(0, 0.1), (99, 0.1), (100, 0.05), (149, 0.05), (150, 0.025), (199, 0.025)],
        id="step-fractions",
    ),
    pytest.param(
        "step",
        dict(total_steps=100, warmup_steps=10, step_boundaries=(50,)),
        [(0, 0.0), (5, 0.05), (10, 0.1), (49, 0.1), (50, 0.01)],
        id="step-warmup-absolute-boundaries",
    ),
    pytest.param(
        "cosine",
        dict(total_steps=100, end_factor=0.1),
        [(0, 0.1), (25, _cos(0.1, 0.01, 25, 100)), (50, 0.055), (100, 0.01), (150, 0.01)],
        id="cosine",
    ),
    pytest.param(
        "warmup_cosine",
        dict(total_steps=110, warmup_steps=10),
        [(0, 0.0), (5, 0.05), (10, 0.1), (35, _cos(0.1, 0.0, 25, 100)), (60, 0.05), (110, 0.0)],
        id="warmup_cosine",
    ),
    pytest.param(
        "one_cycle",
        dict(total_steps=100),
        [(0, 0.1 / 25), (15, (0.1 / 25 + 0.1) / 2), (30, 0.1), (100, 0.1 / 25 / 1e4)],
        id="one_cycle",
    ),
    pytest.param(
        "linear",
        dict(total_steps=100),
        [(0, 0.1), (50, 0.05), (100, 0.0), (120, 0.0)],
        id="linear",
    ),
    pytest.param(
        "linear",
        dict(total_steps=100, warmup_steps=20, end_factor=0.1),
        [(0, 0.0), (10, 0.05), (20, 0.1), (60, 0.055), (100, 0.01)],
        id="linear-warmup",
    ),
]


def _evaluate(schedule: optax.Schedule, num_steps: int) -> np.ndarray:
    """schedule(0), ..., schedule(num_steps - 1) in one jitted call."""
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(num_steps)))


@pytest.mark.parametrize("name, kwargs, expected", SCHEDULE_CASES)
def test_schedule_values(name, kwargs, expected):
    schedule = make_schedule(name, learning_rate=0.1, **kwargs)
    values = _evaluate(schedule, max(step for step, _ in expected) + 1)
    for step, value in expected:
        assert values[step] == pytest.approx(value, rel=1e-5, abs=1e-8), f"step {step}"


def test_one_cycle_matches_optax_and_peaks_at_pct_start():
    schedule = make_schedule("one_cycle", learning_rate=0.1, total_steps=50)
    reference = optax.cosine_onecycle_schedule(50, 0.1)
    values = _evaluate(schedule, 60)
    np.testing.assert_allclose(values, _evaluate(reference, 60), rtol=1e-6)
    assert int(np.argmax(values)) == int(0.3 * 50)


def test_one_cycle_warmup_steps_moves_the_peak():
    schedule = make_schedule("one_cycle", learning_rate=0.1, total_steps=50, warmup_steps=7)
    values = _evaluate(schedule, 50)
    assert int(np.argmax(values)) == 7
    assert float(values[7]) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["constant", "step", "warmup_cosine", "linear"])
def test_warmup_is_linear_from_zero(name):
    kwargs = dict(step_boundaries=(50,)) if name == "step" else {}
    schedule = make_schedule(name, learning_rate=0.1, total_steps=100, warmup_steps=8, **kwargs)
    values = _evaluate(schedule, 9)
    np.testing.assert_allclose(values, 0.1 * np.arange(9) / 8, rtol=1e-6, atol=1e-9)


def test_schedule_is_jit_safe():
    schedule = make_schedule("warmup_cosine", learning_rate=0.1, total_steps=100, warmup_steps=10)
    assert float(jax.jit(schedule)(jnp.int32(60))) == pytest.approx(float(schedule(60)))


def test_learning_rate_schedule_is_returned_and_used():
    given = optax.linear_schedule(0.1, 0.0, 10)
    tx, schedule = make_optimizer("sgd", learning_rate=given)
    assert _evaluate(schedule, 12).tolist() == _evaluate(given, 12).tolist()
    assert schedule.total_steps is None  # an optax schedule does not say its horizon
    assert not hasattr(given, "total_steps")  # the caller's function is left alone
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    for step in range(3):
        updates, state = tx.update(params, state, params)
        np.testing.assert_allclose(updates["w"], -float(given(step)) * np.ones((2, 2)), rtol=1e-6)


# ----------------------------------------------------------------------------- weight decay


class _Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)


def _model_params() -> nnx.State:
    params = nnx.state(_Model(nnx.Rngs(0)), nnx.Param)
    # Non-zero biases so that decaying them would show.
    return jax.tree.map(lambda p: p + 0.5 if p.ndim < 2 else p, params)


def test_default_decay_mask_on_nnx_state():
    mask = default_decay_mask(_model_params())
    flat = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree.leaves_with_path(mask)}
    decayed = sorted(key for key, leaf in flat.items() if leaf)
    assert len(flat) == 4
    assert decayed == [key for key in flat if "kernel" in key]


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "lamb"])
def test_weight_decay_changes_only_kernels(name):
    params = _model_params()
    lr, weight_decay = 0.1, 0.5
    tx, _ = make_optimizer(name, learning_rate=lr, weight_decay=weight_decay)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    expected = jax.tree.map(lambda p: p * (1 - lr * weight_decay) if p.ndim >= 2 else p, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new, expected)


def test_weight_decay_is_decoupled_from_momentum():
    # With zero gradients, coupled (L2) decay would build momentum; decoupled decay
    # shrinks the kernel by the same factor every step.
    params = {"kernel": jnp.ones((2, 2))}
    tx, _ = make_optimizer("momentum", learning_rate=0.1, momentum=0.9, weight_decay=0.5)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["kernel"], 0.95**3 * np.ones((2, 2)), rtol=1e-6)


def test_works_inside_nnx_optimizer():
    # decay mask, clipping and accumulation on an nnx.State, through nnx.Optimizer.
    model = _Model(nnx.Rngs(0))
    tx, _ = make_optimizer(
        "adamw", learning_rate=0.1, weight_decay=0.1, clip_norm=1.0, accumulate_steps=2
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((2, 3))

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m.norm(m.linear(x)) ** 2))(model)
        optimizer.update(model, grads)

    def snapshot() -> dict[str, np.ndarray]:
        flat = jax.tree.leaves_with_path(nnx.state(model, nnx.Param))
        return {jax.tree_util.keystr(path): np.array(leaf) for path, leaf in flat}

    before = snapshot()
    train_step(model, optimizer)
    middle = snapshot()
    train_step(model, optimizer)
    after = snapshot()
    assert all(np.array_equal(middle[key], before[key]) for key in before)
    assert all(not np.allclose(after[key], before[key]) for key in before)


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("scale, expected_norm", [(1e6, 2.0), (1e-3, None)])
def test_clipping_bounds_the_global_norm(scale, expected_norm):
    rng = np.random.default_rng(1)
    grads = {
        "kernel": jnp.asarray(scale * rng.normal(size=(4, 3)), jnp.float32),
        "bias": jnp.asarray(scale * rng.normal(size=(3,)), jnp.float32),
    }
    tx, _ = make_optimizer("sgd", learning_rate=1.0, clip_norm=2.0)
    updates, _ = tx.update(grads, tx.init(grads))
    if expected_norm is None:  # below the bound: untouched
        jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6), updates, grads)
    else:
        assert float(optax.global_norm(updates)) == pytest.approx(expected_norm, rel=1e-5)


# ----------------------------------------------------------------------------- accumulation


def _run_updates(tx: optax.GradientTransformation, params, grads_seq: list) -> list:
    """The updates `tx` returns for each gradient in turn, params held fixed, in one jit."""

    @jax.jit
    def run(params, grads_seq):
        state = tx.init(params)
        updates_seq = []
        for grads in grads_seq:
            updates, state = tx.update(grads, state, params)
            updates_seq.append(updates)
        return updates_seq

    return run(params, grads_seq)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_accumulated_steps_equal_one_step_on_the_concatenated_batch(name):
    k, batch = 3, 4
    params, _, _ = _problem()
    params = jax.tree.map(jnp.asarray, params)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(k * batch, 5)).astype(np.float32)
    y = rng.normal(size=(k * batch, 3)).astype(np.float32)
    grad_fn = jax.jit(jax.grad(_loss))
    micro_grads = [
        grad_fn(params, x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch])
        for i in range(k)
    ]

    tx, _ = make_optimizer(name, learning_rate=0.1, accumulate_steps=k)
    updates_seq = _run_updates(tx, params, micro_grads)
    for call, updates in enumerate(updates_seq[:-1], start=1):
        assert not any(np.any(u) for u in jax.tree.leaves(updates)), f"update at call {call}"

    full_tx, _ = make_optimizer(name, learning_rate=0.1)
    (expected,) = _run_updates(full_tx, params, [grad_fn(params, x, y)])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        updates_seq[-1],
        expected,
    )


def test_accumulation_schedule_counts_applied_updates():
    params = {"w": jnp.ones((2,))}
    tx, _ = make_optimizer(
        "sgd",
        learning_rate=1.0,
        total_steps=4,
        schedule="step",
        step_boundaries=(1,),
        decay_factor=0.5,
        accumulate_steps=2,
    )
    updates_seq = _run_updates(tx, params, [params] * 4)
    assert [float(u["w"][0]) for u in updates_seq] == [0.0, -1.0, 0.0, -0.5]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "build, match",
    [
        pytest.param(
            lambda: make_schedule("bogus", learning_rate=0.1, total_steps=10),
            r"'bogus'.*cosine",
            id="unknown-schedule",
        ),
        pytest.param(
            lambda: make_optimizer("bogus", learning_rate=0.1), r"'bogus'.*adamw", id="unknown-opt"
        ),
        pytest.param(
            lambda: make_optimizer("sgd", learning_rate=0.1, schedule="bogus"),
            r"'bogus'.*one_cycle",
            id="unknown-schedule-in-optimizer",
        ),
        pytest.param(
            lambda: make_schedule("constant", learning_rate=-0.1, total_steps=10),
            "learning_rate",
            id="negative-lr",
        ),
        pytest.param(
            lambda: make_schedule("cosine", learning_rate=0.1, total_steps=0),
            "total_steps",
            id="zero-total-steps",
        ),
        pytest.param(
            lambda: make_schedule("cosine", learning_rate=0.1, total_steps=10, warmup_steps=11),
            "warmup_steps",
            id="warmup-beyond-total",
        ),
        pytest.param(
            lambda: make_schedule("linear", learning_rate=0.1, total_steps=10, warmup_steps=-1),
            "warmup_steps",
            id="negative-warmup",
        ),
        pytest.param(
            lambda: make_schedule(
                "step", learning_rate=0.1, total_steps=10, step_boundaries=(1.5,)
            ),
            "step_boundaries",
            id="bad-boundary",
        ),
        pytest.param(
            lambda: make_schedule(
                "step", learning_rate=0.1, total_steps=10, step_boundaries=(5, 3)
            ),
            "step_boundaries",
            id="unordered-boundaries",
        ),
        pytest.param(
            lambda: make_schedule("step", learning_rate=0.1, total_steps=10, step_boundaries=(50,)),
            "step_boundaries",
            id="boundary-beyond-total",
        ),
        pytest.param(
            lambda: make_schedule("cosine", learning_rate=0.1, total_steps=10, end_factor=-1.0),
            "end_factor",
            id="negative-end-factor",
        ),
        pytest.param(
            lambda: make_optimizer("sgd", learning_rate=-1.0), "learning_rate", id="opt-negative-lr"
        ),
        pytest.param(
            lambda: make_optimizer("adam", learning_rate=0.1, b1=1.0), "b1", id="b1-out-of-range"
        ),
        pytest.param(
            lambda: make_optimizer("adamw", learning_rate=0.1, weight_decay=-0.1),
            "weight_decay",
            id="negative-weight-decay",
        ),
        pytest.param(
            lambda: make_optimizer("sgd", learning_rate=0.1, clip_norm=0.0),
            "clip_norm",
            id="zero-clip-norm",
        ),
        pytest.param(
            lambda: make_optimizer("sgd", learning_rate=0.1, accumulate_steps=0),
            "accumulate_steps",
            id="zero-accumulate-steps",
        ),
        pytest.param(
            lambda: make_optimizer("nesterov", learning_rate=0.1, momentum=0.0),
            "momentum",
            id="nesterov-without-momentum",
        ),
        pytest.param(
            lambda: make_optimizer("adam", learning_rate=0.1, nesterov=True),
            "nesterov",
            id="nesterov-with-adam",
        ),
        pytest.param(
            lambda: make_optimizer(
                "sgd", learning_rate=optax.constant_schedule(0.1), schedule="cosine"
            ),
            "learning_rate",
            id="schedule-and-schedule-name",
        ),
    ],
)
def test_invalid_arguments_raise(build, match):
    with pytest.raises(OptimizerConfigError, match=match) as caught:
        build()
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)


def test_valid_names_are_all_buildable():
    for schedule in SCHEDULES:
        for name in OPTIMIZERS:
            tx, lr = make_optimizer(name, learning_rate=0.1, total_steps=10, schedule=schedule)
            assert callable(lr) and tx.init({"w": jnp.zeros((2, 2))}) is not None


# ----------------------------------------------------------------------------- horizons


DECAYING = [
    pytest.param("cosine", {}, id="cosine"),
    pytest.param("warmup_cosine", dict(warmup_steps=5), id="warmup_cosine"),
    pytest.param("linear", {}, id="linear"),
    pytest.param("one_cycle", {}, id="one_cycle"),
    pytest.param("step", dict(step_boundaries=(0.5, 0.75)), id="step-fractional"),
]


@pytest.mark.parametrize("name, kwargs", DECAYING)
def test_decaying_schedule_without_total_steps_raises(name, kwargs):
    # Without a horizon these used to decay over one step: the run trained at rate 0.
    for build in (make_schedule, lambda n, **kw: make_optimizer("sgd", schedule=n, **kw)):
        with pytest.raises(OptimizerConfigError, match="total_steps=") as caught:
            build(name, learning_rate=0.1, **kwargs)
        assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("name, kwargs", DECAYING)
def test_schedules_carry_their_horizon(name, kwargs):
    schedule = make_schedule(name, learning_rate=0.1, total_steps=40, **kwargs)
    assert schedule.total_steps == 40 and isinstance(schedule.total_steps, int)
    _, from_optimizer = make_optimizer(
        "adam", learning_rate=0.1, schedule=name, total_steps=40, **kwargs
    )
    assert from_optimizer.total_steps == 40
    np.testing.assert_array_equal(_evaluate(schedule, 45), _evaluate(from_optimizer, 45))


def test_schedules_without_an_end_have_no_horizon():
    assert make_schedule("constant", learning_rate=0.1).total_steps is None
    assert make_schedule("constant", learning_rate=0.1, total_steps=10).total_steps is None
    assert make_optimizer("sgd", learning_rate=0.1)[1].total_steps is None
    steps = make_schedule("step", learning_rate=0.1, step_boundaries=(5, 8), decay_factor=0.5)
    assert steps.total_steps is None
    assert _evaluate(steps, 10).tolist() == pytest.approx([0.1] * 5 + [0.05] * 3 + [0.025] * 2)


def test_ready_schedule_horizon():
    built = make_schedule("cosine", learning_rate=0.1, total_steps=30)
    assert make_optimizer("sgd", learning_rate=built)[1] is built
    _, told = make_optimizer(
        "sgd", learning_rate=optax.linear_schedule(0.1, 0.0, 30), total_steps=30
    )
    assert told.total_steps == 30
    with pytest.raises(OptimizerConfigError, match="total_steps"):
        make_optimizer("sgd", learning_rate=built, total_steps=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_non_finite_learning_rate_raises(value, schedule):
    with pytest.raises(OptimizerConfigError, match="learning_rate must be finite"):
        make_optimizer("adam", learning_rate=value, schedule=schedule, total_steps=10)


@pytest.mark.parametrize("name, kwargs", DECAYING)
def test_zero_learning_rate_with_a_decay_raises(name, kwargs):
    with pytest.raises(OptimizerConfigError, match="learning_rate is 0"):
        make_schedule(name, learning_rate=0.0, total_steps=40, **kwargs)


def test_zero_learning_rate_is_a_frozen_constant_run():
    tx, schedule = make_optimizer("adam", learning_rate=0.0)
    params = {"w": jnp.arange(4.0)}
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.ones(4)}, state, params)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["w"], params["w"])
    assert float(schedule(3)) == 0.0


def test_learning_rate_that_is_not_a_number_raises():
    with pytest.raises(OptimizerConfigError, match="learning_rate must be a number"):
        make_optimizer("adam", learning_rate="1e-3x")


@pytest.mark.parametrize(
    "build, suggestion",
    [
        (lambda: make_optimizer("adamm", learning_rate=0.1), "'adam'"),
        (lambda: make_optimizer("SGD", learning_rate=0.1), "'sgd'"),
        (lambda: make_schedule("cosin", learning_rate=0.1, total_steps=5), "'cosine'"),
        (lambda: make_optimizer("sgd", learning_rate=0.1, schedule="onecycle"), "'one_cycle'"),
    ],
)
def test_unknown_name_suggests_the_closest(build, suggestion):
    with pytest.raises(OptimizerConfigError) as caught:
        build()
    message = str(caught.value)
    assert f"did you mean {suggestion}?" in message and "valid names:" in message
    assert "\n" not in message


def test_unknown_name_without_a_close_one_lists_the_names():
    with pytest.raises(OptimizerConfigError) as caught:
        make_optimizer("xyzzy", learning_rate=0.1)
    assert "did you mean" not in str(caught.value)
    assert all(name in str(caught.value) for name in OPTIMIZERS)
