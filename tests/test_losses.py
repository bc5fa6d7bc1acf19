"""Tests for jdl.losses: agreement with PyTorch references and hand-written NumPy math,
numerical edge cases, trace-time validation and jit compatibility."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jdl import losses

RTOL = 1e-5
ATOL = 1e-5


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _logits(shape: tuple[int, ...], seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (scale * _rng(seed).standard_normal(shape)).astype(np.float32)


def _labels(shape: tuple[int, ...], num_classes: int, seed: int = 1) -> np.ndarray:
    return _rng(seed).integers(0, num_classes, size=shape).astype(np.int32)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _torch_xent(logits: np.ndarray, target: np.ndarray, **kwargs) -> np.ndarray:
    """torch cross_entropy (reduction='none') for any leading shape, via (N, C) flattening."""
    num_classes = logits.shape[-1]
    flat_logits = torch.tensor(logits.reshape(-1, num_classes))
    if target.ndim == logits.ndim:  # probability targets
        flat_target = torch.tensor(target.reshape(-1, num_classes))
    else:
        flat_target = torch.tensor(target.reshape(-1), dtype=torch.int64)
    out = F.cross_entropy(flat_logits, flat_target, reduction="none", **kwargs)
    return out.numpy().reshape(logits.shape[:-1])


# Numerical tests go through these jitted wrappers. That checks every loss compiles under jit,
# and it keeps the suite fast: one compilation per input shape, shared by all the parametrized
# cases (hyper-parameters are traced arguments), instead of op-by-op eager dispatch.
_softmax_xent = jax.jit(
    lambda logits, labels, ls: losses.softmax_xent(logits=logits, labels=labels, label_smoothing=ls)
)
_softmax_xent_plain = jax.jit(
    lambda logits, labels: losses.softmax_xent(logits=logits, labels=labels)
)
_soft_xent = jax.jit(lambda logits, targets: losses.soft_xent(logits=logits, targets=targets))
_binary_xent = jax.jit(lambda logits, labels: losses.binary_xent(logits=logits, labels=labels))
_mse = jax.jit(lambda p, t: losses.mse(predictions=p, targets=t))
_huber = jax.jit(lambda p, t, delta: losses.huber(predictions=p, targets=t, delta=delta))
_kl = jax.jit(
    lambda x, t, temperature: losses.kl_divergence(
        logits=x, target_logits=t, temperature=temperature
    )
)
_weighted_mean = jax.jit(losses.weighted_mean)


# ---------------------------------------------------------------------------------------------
# softmax_xent
# ---------------------------------------------------------------------------------------------

CLASSIFICATION_SHAPES = [(16, 5), (3, 4, 7), (6, 1000)]


@pytest.mark.parametrize("shape", CLASSIFICATION_SHAPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5, 1.0])
def test_softmax_xent_matches_torch(shape, label_smoothing):
    logits = _logits(shape)
    labels = _labels(shape[:-1], shape[-1])
    got = _softmax_xent(logits, labels, label_smoothing)
    want = _torch_xent(logits, labels, label_smoothing=label_smoothing)
    assert got.shape == labels.shape
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)
    if label_smoothing == 0.0:
        # The unsmoothed fast path (static zero) must agree as well.
        plain = _softmax_xent_plain(logits, labels)
        np.testing.assert_allclose(np.asarray(plain), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_softmax_xent_gradient_matches_torch(label_smoothing):
    logits, labels = _logits((16, 5), seed=3), _labels((16,), 5, seed=4)

    @jax.jit
    @jax.grad
    def grad_fn(x):
        return losses.weighted_mean(
            losses.softmax_xent(logits=x, labels=labels, label_smoothing=label_smoothing)
        )

    torch_logits = torch.tensor(logits, requires_grad=True)
    F.cross_entropy(
        torch_logits, torch.tensor(labels, dtype=torch.int64), label_smoothing=label_smoothing
    ).backward()
    np.testing.assert_allclose(
        np.asarray(grad_fn(logits)), torch_logits.grad.numpy(), rtol=RTOL, atol=1e-6
    )


def test_softmax_xent_hand_math():
    # Two classes with logits (0, log 3): p = (1/4, 3/4).
    logits = np.array([[0.0, np.log(3.0)], [0.0, np.log(3.0)]], np.float32)
    labels = np.array([0, 1], np.int32)
    got = _softmax_xent_plain(logits, labels)
    np.testing.assert_allclose(np.asarray(got), [np.log(4.0), np.log(4.0 / 3.0)], rtol=1e-6)
    # Smoothing 0.5 with C=2: the target for label 0 is (0.75, 0.25).
    smoothed = _softmax_xent(logits, labels, 0.5)
    want = -(0.75 * np.log([0.25, 0.75]) + 0.25 * np.log([0.75, 0.25]))
    np.testing.assert_allclose(np.asarray(smoothed), want, rtol=1e-6)


@pytest.mark.parametrize("magnitude", [1e4, 1e30])
def test_softmax_xent_huge_logits_stay_finite(magnitude):
    logits = np.tile(np.array([magnitude, -magnitude, 0.0], np.float32), (3, 1))
    labels = np.array([0, 1, 2], np.int32)
    assert np.all(np.isfinite(np.asarray(_softmax_xent(logits, labels, 0.1))))
    unsmoothed = np.asarray(_softmax_xent_plain(logits, labels))
    np.testing.assert_allclose(unsmoothed, [0.0, 2 * magnitude, magnitude], rtol=1e-6)


def test_softmax_xent_out_of_range_labels_are_nan():
    logits = _logits((16, 5))
    labels = _labels((16,), 5)
    bad = labels.copy()
    bad[[1, 2]] = [-1, 5]  # negative labels must not wrap around to class C-1
    got = np.asarray(_softmax_xent_plain(logits, bad))
    assert np.isnan(got[1]) and np.isnan(got[2])
    keep = np.ones(16, bool)
    keep[[1, 2]] = False
    np.testing.assert_allclose(got[keep], _torch_xent(logits, labels)[keep], rtol=RTOL)


def test_softmax_xent_low_precision_input_computes_in_float32():
    logits = jnp.asarray(_logits((16, 5)), jnp.bfloat16)
    labels = _labels((16,), 5)
    got = _softmax_xent_plain(logits, labels)
    assert got.dtype == jnp.float32
    rounded = np.asarray(logits.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got), _torch_xent(rounded, labels), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("logits_shape", "labels_shape"),
    [((4, 3), (5,)), ((4, 3), (4, 1)), ((2, 4, 3), (4, 2)), ((4, 3), ())],
)
def test_softmax_xent_shape_mismatch_raises(logits_shape, labels_shape):
    with pytest.raises(ValueError) as excinfo:
        losses.softmax_xent(
            logits=np.zeros(logits_shape, np.float32), labels=np.zeros(labels_shape, np.int32)
        )
    assert str(logits_shape) in str(excinfo.value)
    assert str(labels_shape) in str(excinfo.value)


def test_softmax_xent_validation_errors():
    logits, labels = np.zeros((2, 3), np.float32), np.zeros(2, np.int32)
    with pytest.raises(TypeError, match="integer"):
        losses.softmax_xent(logits=logits, labels=labels.astype(np.float32))
    with pytest.raises(TypeError, match="floating"):
        losses.softmax_xent(logits=logits.astype(np.int32), labels=labels)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.softmax_xent(logits=logits, labels=labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="class axis"):
        losses.softmax_xent(logits=np.zeros((2, 0), np.float32), labels=labels)
    with pytest.raises(TypeError):  # keyword-only: positional logits/labels are rejected
        losses.softmax_xent(logits, labels)  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# soft_xent
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", CLASSIFICATION_SHAPES[:2])
def test_soft_xent_matches_torch_probability_targets(shape):
    logits = _logits(shape)
    targets = _np_softmax(_logits(shape, seed=7))
    got = _soft_xent(logits, targets)
    assert got.shape == shape[:-1]
    np.testing.assert_allclose(np.asarray(got), _torch_xent(logits, targets), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_soft_xent_with_smoothed_onehot_equals_softmax_xent(label_smoothing):
    num_classes = 5
    logits, labels = _logits((16, num_classes)), _labels((16,), num_classes)
    targets = (1 - label_smoothing) * np.eye(num_classes, dtype=np.float32)[labels]
    targets = targets + np.float32(label_smoothing / num_classes)
    np.testing.assert_allclose(
        np.asarray(_soft_xent(logits, targets)),
        np.asarray(_softmax_xent(logits, labels, label_smoothing)),
        rtol=RTOL,
        atol=ATOL,
    )


def test_soft_xent_masked_classes_with_zero_target_are_finite():
    logits = np.array([[1.0, -np.inf, 0.0]], np.float32)
    targets = np.array([[0.5, 0.0, 0.5]], np.float32)
    got = np.asarray(_soft_xent(logits, targets))
    log_p = np.array([1.0, 0.0]) - np.log(np.exp(1.0) + 1.0)
    np.testing.assert_allclose(got, [-0.5 * log_p.sum()], rtol=1e-6)
    grad_fn = jax.jit(jax.grad(lambda x, t: _soft_xent(x, t).sum(), argnums=(0, 1)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grad_fn(logits, targets))


def test_soft_xent_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        losses.soft_xent(logits=np.zeros((4, 3), np.float32), targets=np.zeros((4, 2), np.float32))


# ---------------------------------------------------------------------------------------------
# binary_xent
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", CLASSIFICATION_SHAPES[:2])
@pytest.mark.parametrize("soft", [False, True])
def test_binary_xent_matches_torch(shape, soft):
    logits = _logits(shape, scale=5.0)
    rng = _rng(11)
    labels = (rng.uniform(size=shape) if soft else rng.integers(0, 2, size=shape)).astype(
        np.float32
    )
    got = _binary_xent(logits, labels)
    want = F.binary_cross_entropy_with_logits(
        torch.tensor(logits), torch.tensor(labels), reduction="none"
    ).numpy()
    assert got.shape == shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def test_binary_xent_huge_logits_stay_finite():
    logits = np.array([1e4, -1e4, 1e30, -1e30, 1e4, -1e4], np.float32)
    labels = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], np.float32)
    np.testing.assert_allclose(
        np.asarray(_binary_xent(logits, labels)), [0, 0, 0, 0, 1e4, 1e4], rtol=1e-6
    )
    grads = jax.jit(jax.grad(lambda x: _binary_xent(x, labels).sum()))(logits)
    # d/dx = sigmoid(x) - y.
    np.testing.assert_allclose(np.asarray(grads), [0, 0, 0, 0, 1, -1], atol=1e-6)


def test_binary_xent_accepts_integer_labels():
    logits = _logits((16, 5))
    int_labels = _labels((16, 5), 2)
    np.testing.assert_allclose(
        np.asarray(_binary_xent(logits, int_labels)),
        np.asarray(_binary_xent(logits, int_labels.astype(np.float32))),
    )


def test_binary_xent_shape_mismatch_raises():
    # (4,) vs (4, 1) would silently broadcast to (4, 4) without the check.
    with pytest.raises(ValueError, match=r"\(4,\).*\(4, 1\)"):
        losses.binary_xent(logits=np.zeros(4, np.float32), labels=np.zeros((4, 1), np.float32))


# ---------------------------------------------------------------------------------------------
# mse and huber
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", CLASSIFICATION_SHAPES[:2])
def test_mse_matches_torch(shape):
    predictions, targets = _logits(shape, seed=2), _logits(shape, seed=3)
    got = _mse(predictions, targets)
    want = F.mse_loss(torch.tensor(predictions), torch.tensor(targets), reduction="none")
    assert got.shape == shape
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("delta", [0.1, 0.5, 1.0, 2.5, 10.0])
def test_huber_matches_torch(delta):
    predictions, targets = _logits((16, 5), seed=4), _logits((16, 5), seed=5)
    got = _huber(predictions, targets, delta)
    want = F.huber_loss(
        torch.tensor(predictions), torch.tensor(targets), reduction="none", delta=delta
    ).numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("delta", [0.5, 2.0])
def test_huber_hand_math_and_gradient(delta):
    errors = np.array([0.0, 0.25 * delta, -0.5 * delta, delta, -3.0 * delta], np.float32)
    zeros = np.zeros_like(errors)
    abs_err = np.abs(errors)
    want = np.where(abs_err < delta, 0.5 * abs_err**2, delta * (abs_err - 0.5 * delta))
    np.testing.assert_allclose(np.asarray(_huber(errors, zeros, delta)), want, rtol=1e-6)
    # The gradient is the error itself inside the quadratic zone and +-delta outside it.
    grads = jax.jit(jax.grad(lambda p: _huber(p, zeros, delta).sum()))(errors)
    np.testing.assert_allclose(np.asarray(grads), np.clip(errors, -delta, delta), rtol=1e-6)


@pytest.mark.parametrize("delta", [0.0, -1.0])
def test_huber_rejects_non_positive_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        losses.huber(predictions=np.zeros(3, np.float32), targets=np.zeros(3), delta=delta)


@pytest.mark.parametrize("fn", [losses.mse, losses.huber])
def test_regression_shape_mismatch_raises(fn):
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(3,\)"):
        fn(predictions=np.zeros((3, 2), np.float32), targets=np.zeros(3, np.float32))


# ---------------------------------------------------------------------------------------------
# kl_divergence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("shape", CLASSIFICATION_SHAPES[:2])
def test_kl_divergence_matches_torch(temperature, shape):
    logits, target_logits = _logits(shape, seed=8), _logits(shape, seed=9)
    got = _kl(logits, target_logits, temperature)
    assert got.shape == shape[:-1]
    log_q = F.log_softmax(torch.tensor(logits) / temperature, dim=-1)
    log_p = F.log_softmax(torch.tensor(target_logits) / temperature, dim=-1)
    # Both torch forms: log-space targets, and probability targets.
    want_log_target = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    want_prob_target = F.kl_div(log_q, log_p.exp(), reduction="none").sum(-1)
    np.testing.assert_allclose(np.asarray(got), want_log_target.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(got), want_prob_target.numpy(), rtol=RTOL, atol=ATOL)


def test_kl_divergence_hand_math_and_properties():
    logits, target_logits = _logits((16, 5), seed=12), _logits((16, 5), seed=13)
    temperature = 3.0

    p = _np_softmax(target_logits.astype(np.float64) / temperature)
    q = _np_softmax(logits.astype(np.float64) / temperature)
    want = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
    got = np.asarray(_kl(logits, target_logits, temperature))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert np.all(got >= -1e-6)
    np.testing.assert_allclose(np.asarray(_kl(logits, logits, temperature)), 0.0, atol=1e-6)


def test_kl_divergence_masked_target_classes():
    # A -inf teacher logit means p = 0 there: it contributes 0, not NaN, in value and gradient.
    target_logits = np.array([[2.0, -np.inf, 0.0]], np.float32)
    logits = np.array([[0.5, 1.0, -1.0]], np.float32)
    p = np.array([np.exp(2.0), 0.0, 1.0]) / (np.exp(2.0) + 1.0)
    q = np.exp(logits[0]) / np.exp(logits[0]).sum()
    want = p[0] * np.log(p[0] / q[0]) + p[2] * np.log(p[2] / q[2])
    np.testing.assert_allclose(np.asarray(_kl(logits, target_logits, 1.0)), [want], rtol=1e-5)
    grad_fn = jax.jit(jax.grad(lambda x, t: _kl(x, t, 1.0).sum(), argnums=(0, 1)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grad_fn(logits, target_logits))


def test_kl_divergence_validation_errors():
    zeros = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        losses.kl_divergence(logits=zeros, target_logits=np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="temperature"):
        losses.kl_divergence(logits=zeros, target_logits=zeros, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# weighted_mean
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights_shape", [None, (16, 5), (16, 1), (5,)])
def test_weighted_mean_hand_math(weights_shape):
    values = _logits((16, 5), seed=14)
    if weights_shape is None:
        want, got = values.astype(np.float64).mean(), _weighted_mean(values)
    else:
        weights = _rng(15).uniform(0.0, 2.0, size=weights_shape).astype(np.float32)
        full = np.broadcast_to(weights, values.shape).astype(np.float64)
        want = np.sum(values * full) / np.sum(full)
        got = _weighted_mean(values, weights)
    assert got.shape == ()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


# Float weights matter here: under jit, XLA folds `x * float(bool_mask)` into a select, which
# would hide a NaN leak that float weights expose.
@pytest.mark.parametrize("mask_dtype", [np.float32, np.bool_])
def test_weighted_mean_mask_excludes_nan_and_all_zero_is_zero(mask_dtype):
    values = np.array([1.0, np.nan, 3.0, np.inf], np.float32)
    mask = np.array([1, 0, 1, 0], mask_dtype)
    np.testing.assert_allclose(np.asarray(_weighted_mean(values, mask)), 2.0)
    grads = jax.jit(jax.grad(_weighted_mean))(values, mask)
    np.testing.assert_allclose(np.asarray(grads), [0.5, 0.0, 0.5, 0.0])
    assert float(_weighted_mean(values, np.zeros(4, mask_dtype))) == 0.0


def test_weighted_mean_with_padded_labels_from_softmax_xent():
    logits = _logits((16, 5))
    labels = _labels((16,), 5)
    labels[10:] = -1  # padding
    got = _weighted_mean(_softmax_xent_plain(logits, labels), labels >= 0)
    want = np.mean(_torch_xent(logits[:10], labels[:10]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL)


@pytest.mark.parametrize("weights_shape", [(3,), (4, 5, 1), (2, 5)])
def test_weighted_mean_rejects_non_broadcastable_weights(weights_shape):
    with pytest.raises(ValueError, match="weights"):
        losses.weighted_mean(np.zeros((4, 5), np.float32), np.ones(weights_shape, np.float32))


def test_shape_errors_fire_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="labels.shape"):
        _softmax_xent(_logits((16, 5)), np.zeros(15, np.int32), 0.1)
    with pytest.raises(ValueError, match="targets"):
        _mse(np.zeros(3, np.float32), np.zeros(4, np.float32))
