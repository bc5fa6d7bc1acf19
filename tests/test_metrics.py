"""Tests for jdl.metrics: agreement with scikit-learn and hand-written NumPy math, tie and
padding conventions, jit compatibility, and the host-side MetricAverager."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import top_k_accuracy_score

from jdl import metrics

# Numerical tests go through jitted wrappers: that checks the metrics compile, and one
# compilation per input shape is much cheaper than op-by-op eager dispatch.
_accuracy = jax.jit(lambda logits, labels: metrics.accuracy(logits=logits, labels=labels))
_topk = jax.jit(
    lambda logits, labels, k: metrics.topk_accuracy(logits=logits, labels=labels, k=k),
    static_argnums=2,
)
_confusion = jax.jit(
    lambda logits, labels, n: metrics.confusion_matrix(logits=logits, labels=labels, num_classes=n),
    static_argnums=2,
)

SHAPES = [(64, 5), (3, 8, 7)]


def _logits(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _labels(shape: tuple[int, ...], num_classes: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=shape).astype(np.int32)


# Integer-valued logits with only 3 distinct values per row: ties everywhere.
TIED_LOGITS = np.random.default_rng(5).integers(0, 3, size=(64, 5)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_accuracy_matches_numpy(shape):
    logits, labels = _logits(shape), _labels(shape[:-1], shape[-1])
    got = _accuracy(logits, labels)
    assert got.shape == labels.shape
    assert got.dtype == jnp.float32
    want = (np.argmax(logits, axis=-1) == labels).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(got), want)
    # Random logits, 5-7 classes: some but not all examples are correct.
    assert 0.0 < want.mean() < 1.0


def test_accuracy_ties_go_to_lowest_index_and_bad_labels_are_wrong():
    logits = np.zeros((4, 3), np.float32)  # all tied: predicts class 0
    labels = np.array([0, 1, -3, 3], np.int32)
    np.testing.assert_array_equal(np.asarray(_accuracy(logits, labels)), [1, 0, 0, 0])


# ---------------------------------------------------------------------------------------------
# topk_accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_topk_accuracy_matches_sklearn(k):
    logits, labels = _logits((64, 5)), _labels((64,), 5)
    got = _topk(logits, labels, k)
    assert got.shape == (64,)
    assert got.dtype == jnp.float32
    want = top_k_accuracy_score(labels, logits, k=k, labels=np.arange(5))
    np.testing.assert_allclose(float(np.mean(np.asarray(got))), want, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_accuracy_per_example_matches_argsort(k):
    logits, labels = _logits((3, 8, 7), seed=2), _labels((3, 8), 7, seed=3)
    top = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    want = np.any(top == labels[..., None], axis=-1).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_topk(logits, labels, k)), want)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_accuracy_ties_match_lax_top_k(k):
    labels = _labels((64,), 5, seed=6)
    _, top_indices = jax.lax.top_k(TIED_LOGITS, k)
    want = np.any(np.asarray(top_indices) == labels[:, None], axis=-1).astype(np.float32)
    got = np.asarray(_topk(TIED_LOGITS, labels, k))
    np.testing.assert_array_equal(got, want)
    assert 0.0 < got.mean() < 1.0  # ties must not make every example correct


def test_topk_accuracy_k1_equals_accuracy_even_with_ties():
    labels = _labels((64,), 5, seed=7)
    np.testing.assert_array_equal(
        np.asarray(_topk(TIED_LOGITS, labels, 1)), np.asarray(_accuracy(TIED_LOGITS, labels))
    )


def test_topk_accuracy_k_equal_classes_and_bad_labels():
    logits = _logits((64, 5))
    labels = _labels((64,), 5)
    labels[:2] = [-1, 5]
    got = np.asarray(_topk(logits, labels, 5))
    np.testing.assert_array_equal(got, np.r_[0.0, 0.0, np.ones(62, np.float32)])


@pytest.mark.parametrize(("k", "error"), [(0, ValueError), (6, ValueError), (2.0, TypeError)])
def test_topk_accuracy_rejects_bad_k(k, error):
    with pytest.raises(error, match="k"):
        metrics.topk_accuracy(
            logits=np.zeros((2, 5), np.float32), labels=np.zeros(2, np.int32), k=k
        )


# ---------------------------------------------------------------------------------------------
# confusion_matrix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_confusion_matrix_matches_sklearn(shape):
    num_classes = shape[-1]
    logits, labels = _logits(shape, seed=8), _labels(shape[:-1], num_classes, seed=9)
    got = _confusion(logits, labels, num_classes)
    assert got.shape == (num_classes, num_classes)
    assert got.dtype == jnp.int32
    want = sk_confusion_matrix(
        labels.reshape(-1), np.argmax(logits, -1).reshape(-1), labels=np.arange(num_classes)
    )
    np.testing.assert_array_equal(np.asarray(got), want)
    assert np.asarray(got).sum() == labels.size


def test_confusion_matrix_hand_example():
    # true 0 -> pred 1, true 1 -> pred 1, true 2 -> pred 0 (twice).
    logits = np.eye(3, dtype=np.float32)[[1, 1, 0, 0]]
    labels = np.array([0, 1, 2, 2], np.int32)
    want = np.array([[0, 1, 0], [0, 1, 0], [2, 0, 0]])
    np.testing.assert_array_equal(np.asarray(_confusion(logits, labels, 3)), want)


def test_confusion_matrix_skips_out_of_range_labels():
    logits, labels = _logits((64, 5), seed=10), _labels((64,), 5, seed=11)
    padded = labels.copy()
    padded[[0, 1, 2]] = [-1, -5, 5]  # negative labels must not wrap into the last row
    keep = np.ones(64, bool)
    keep[:3] = False
    want = sk_confusion_matrix(labels[keep], np.argmax(logits[keep], -1), labels=np.arange(5))
    got = np.asarray(_confusion(logits, padded, 5))
    np.testing.assert_array_equal(got, want)
    assert got.sum() == 61


def test_confusion_matrix_is_additive_over_batches():
    logits, labels = _logits((64, 5), seed=12), _labels((64,), 5, seed=13)
    whole = _confusion(np.concatenate([logits, logits]), np.concatenate([labels, labels]), 5)
    np.testing.assert_array_equal(np.asarray(whole), 2 * np.asarray(_confusion(logits, labels, 5)))


def test_confusion_matrix_rejects_wrong_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        metrics.confusion_matrix(
            logits=np.zeros((4, 3), np.float32), labels=np.zeros(4, np.int32), num_classes=4
        )


# ---------------------------------------------------------------------------------------------
# Shared validation
# ---------------------------------------------------------------------------------------------

METRIC_CALLS = {
    "accuracy": lambda logits, labels: metrics.accuracy(logits=logits, labels=labels),
    "topk_accuracy": lambda logits, labels: metrics.topk_accuracy(
        logits=logits, labels=labels, k=1
    ),
    "confusion_matrix": lambda logits, labels: metrics.confusion_matrix(
        logits=logits, labels=labels, num_classes=3
    ),
}


@pytest.mark.parametrize("name", sorted(METRIC_CALLS))
def test_metrics_shape_mismatch_raises(name):
    with pytest.raises(ValueError) as excinfo:
        METRIC_CALLS[name](np.zeros((4, 3), np.float32), np.zeros((5,), np.int32))
    assert "(4, 3)" in str(excinfo.value) and "(5,)" in str(excinfo.value)


@pytest.mark.parametrize("name", sorted(METRIC_CALLS))
def test_metrics_reject_float_labels(name):
    with pytest.raises(TypeError, match="integer"):
        METRIC_CALLS[name](np.zeros((4, 3), np.float32), np.zeros((4,), np.float32))


# ---------------------------------------------------------------------------------------------
# MetricAverager
# ---------------------------------------------------------------------------------------------


def test_metric_averager_weighted_average_by_hand():
    averager = metrics.MetricAverager()
    averager.add({"loss": 2.0, "accuracy": np.float32(0.5)}, weight=1.0)
    averager.add({"loss": jnp.array(4.0), "accuracy": jnp.array([0.75])}, weight=3.0)
    result = averager.result()
    assert set(result) == {"loss", "accuracy"}
    assert all(type(v) is float for v in result.values())
    assert result["loss"] == pytest.approx((1 * 2.0 + 3 * 4.0) / 4)  # 3.5
    assert result["accuracy"] == pytest.approx((1 * 0.5 + 3 * 0.75) / 4)  # 0.6875


def test_metric_averager_default_weight_is_plain_mean():
    averager = metrics.MetricAverager()
    for value in [1.0, 2.0, 6.0]:
        averager.add({"x": value})
    assert averager.result() == {"x": pytest.approx(3.0)}


def test_metric_averager_keys_are_averaged_over_their_own_batches():
    averager = metrics.MetricAverager()
    averager.add({"loss": 1.0, "extra": 10.0}, weight=2.0)
    averager.add({"loss": 4.0}, weight=1.0)
    result = averager.result()
    assert result["loss"] == pytest.approx(2.0)  # (2 * 1 + 1 * 4) / 3
    assert result["extra"] == pytest.approx(10.0)


def test_metric_averager_zero_weight_and_reset():
    averager = metrics.MetricAverager()
    averager.add({"loss": float("nan")}, weight=0.0)  # e.g. an empty final batch
    assert math.isnan(averager.result()["loss"])
    averager.add({"loss": 5.0}, weight=2.0)
    assert averager.result() == {"loss": pytest.approx(5.0)}  # the NaN did not leak in
    averager.reset()
    assert averager.result() == {}
    averager.add({"loss": 1.0})
    assert averager.result() == {"loss": pytest.approx(1.0)}


@pytest.mark.parametrize(
    ("batch", "weight"),
    [({"loss": 1.0, "bad": np.ones(3)}, 1.0), ({"loss": 1.0}, -1.0), ({"loss": 1.0}, math.inf)],
)
def test_metric_averager_rejects_bad_input_without_changing_state(batch, weight):
    averager = metrics.MetricAverager()
    averager.add({"loss": 2.0}, weight=1.0)
    with pytest.raises(ValueError):
        averager.add(batch, weight=weight)
    assert averager.result() == {"loss": pytest.approx(2.0)}


def test_metric_averager_over_eval_batches_matches_full_dataset_mean():
    # Weighting per-batch means by batch size reproduces the dataset-level accuracy, even
    # with a ragged last batch.
    logits, labels = _logits((64, 5), seed=14), _labels((64,), 5, seed=15)
    averager = metrics.MetricAverager()
    for start in range(0, 64, 24):  # batches of 24, 24, 16
        batch_logits, batch_labels = logits[start : start + 24], labels[start : start + 24]
        correct = np.argmax(batch_logits, -1) == batch_labels
        averager.add({"accuracy": correct.mean()}, weight=len(batch_labels))
    want = np.mean(np.argmax(logits, -1) == labels)
    assert averager.result()["accuracy"] == pytest.approx(want)
