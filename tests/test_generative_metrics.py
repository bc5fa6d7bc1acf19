"""The metrics generative models are judged by, against external references.

The Frechet distance against scipy's `sqrtm`; classifier features against the
classifier's own logits; class accuracy and coverage, grids and PNGs against hand
computations and a real PNG decoder (Pillow).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from flax import nnx
from PIL import Image

import jdl.generative as gen
from jdl.errors import UserError
from jdl.metrics import FrechetInputError, feature_statistics, frechet_distance
from jdl.models import CNN


def _scipy_frechet(mu1, cov1, mu2, cov2) -> float:
    """The formula as the reference FID implementation writes it."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def _random_gaussian(rng, dim, num):
    mixing = rng.normal(size=(dim, dim))
    features = rng.normal(size=(num, dim)) @ mixing + rng.normal(size=dim)
    return feature_statistics(features)


@pytest.mark.parametrize("dim", [1, 2, 16, 64])
def test_frechet_distance_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    for _ in range(3):
        first = _random_gaussian(rng, dim, 4 * dim + 10)
        second = _random_gaussian(rng, dim, 4 * dim + 10)
        expected = _scipy_frechet(*first, *second)
        assert frechet_distance(*first, *second) == pytest.approx(expected, rel=1e-4)


def test_frechet_distance_of_known_gaussians():
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # Commuting diagonal covariances: sum (sqrt(a) - sqrt(b))^2.
    cov1, cov2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_distance(np.zeros(3), cov1, np.zeros(3), cov2) == pytest.approx(1 + 0 + 4)


def test_frechet_distance_is_zero_for_one_gaussian_and_finite_when_singular():
    rng = np.random.default_rng(0)
    mu, cov = feature_statistics(rng.normal(size=(5, 32)))  # rank 4 of 32
    # Zero up to rounding: the square roots of the null space's eigenvalues (~1e-16) remain.
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-6 * np.trace(cov)
    other = feature_statistics(rng.normal(size=(5, 32)))
    distance = frechet_distance(mu, cov, *other)
    assert np.isfinite(distance) and distance > 0


def test_frechet_distance_rejects_mismatched_shapes_with_one_line():
    with pytest.raises(FrechetInputError) as info:
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value) and "(3,)" in str(info.value)
    with pytest.raises(FrechetInputError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_feature_statistics_are_mean_and_unbiased_covariance():
    features = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, cov = feature_statistics(features)
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(cov, [[4.0, 7.0], [7.0, 13.0]])
    with pytest.raises(FrechetInputError):
        feature_statistics(np.zeros((1, 3)))


def _tiny_cnn():
    return CNN(1, 10, input_shape=(8, 8), conv_channels=(3,), dense_sizes=(5,), rngs=nnx.Rngs(0))


def test_head_features_are_the_input_of_the_classifiers_head():
    model = _tiny_cnn()
    images = np.random.default_rng(0).random((7, 8, 8, 1)).astype(np.float32)
    features = gen.head_features(model, images, batch_size=3)  # 3 batches, last padded
    assert features.shape == (7, 5)
    np.testing.assert_allclose(model.head(features), model(images), rtol=1e-5, atol=1e-5)
    assert isinstance(model.head, nnx.Linear)  # the model given is unchanged


def test_head_features_of_images_of_another_shape_is_one_clear_line():
    with pytest.raises(gen.GenerativeInputError) as info:
        gen.head_features(_tiny_cnn(), np.zeros((2, 12, 12, 1), np.float32))
    message = str(info.value)
    assert "\n" not in message and "(12, 12, 1)" in message and "trained on" in message


def test_head_features_needs_a_head():
    with pytest.raises(gen.GenerativeInputError, match="no `head` layer"):
        gen.head_features(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), np.zeros((2, 2), np.float32))


def test_classifier_fid_is_frechet_distance_of_head_features():
    model = _tiny_cnn()
    rng = np.random.default_rng(1)
    real = rng.random((40, 8, 8, 1)).astype(np.float32)
    fake = (rng.random((30, 8, 8, 1)) ** 3).astype(np.float32)
    expected = frechet_distance(
        *feature_statistics(gen.head_features(model, fake)),
        *feature_statistics(gen.head_features(model, real)),
    )
    assert gen.classifier_fid(model, fake, real) == pytest.approx(expected)
    assert abs(gen.classifier_fid(model, real, real)) < 1e-6
    with pytest.raises(gen.GenerativeInputError, match=r"\(8, 8, 2\).*\(8, 8, 1\)"):
        gen.classifier_fid(model, np.zeros((4, 8, 8, 2)), real)


def test_class_accuracy_and_coverage_by_hand():
    logits = np.eye(4)[[0, 1, 1, 3, 3, 3]] * 5.0  # predicts 0, 1, 1, 3, 3, 3
    assert gen.class_accuracy(logits, [0, 1, 2, 3, 3, 0]) == pytest.approx(4 / 6)
    np.testing.assert_allclose(gen.class_coverage(logits), [1 / 6, 2 / 6, 0.0, 3 / 6])
    np.testing.assert_allclose(gen.class_coverage(logits[:, :4], 5)[-1], 0.0)
    with pytest.raises(gen.GenerativeInputError):
        gen.class_accuracy(logits, [0, 1])


def test_image_grid_places_images_row_by_row_with_white_padding():
    images = np.stack([np.full((2, 3, 1), value, np.float32) for value in (0.0, 0.25, 0.5)])
    grid = gen.image_grid(images, cols=2, pad=1)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1)
    assert np.all(grid[1:3, 1:4] == 0.0) and np.all(grid[1:3, 5:8] == 0.25)
    assert np.all(grid[4:6, 1:4] == 0.5)
    assert np.all(grid[4:6, 5:8] == 1.0)  # the missing cell stays white
    assert np.all(grid[0] == 1.0) and np.all(grid[:, 4] == 1.0)
    assert gen.image_grid(np.zeros((9, 2, 2, 1))).shape == (10, 10, 1)  # 3 x 3 by default
    with pytest.raises(gen.GenerativeInputError):
        gen.image_grid(np.zeros((2, 2, 1)))


def test_write_png_is_read_back_by_pillow(tmp_path):
    image = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4, 1)
    path = gen.write_png(tmp_path / "sub" / "grid.png", image)
    with Image.open(path) as decoded:
        pixels = np.asarray(decoded)
    np.testing.assert_array_equal(pixels, np.rint(image[..., 0] * 255).astype(np.uint8))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]


def test_interpolate_includes_both_ends_on_a_straight_line():
    points = gen.interpolate(np.array([0.0, 2.0]), np.array([4.0, -2.0]), 5)
    np.testing.assert_allclose(points, [[0, 2], [1, 1], [2, 0], [3, -1], [4, -2]])
    with pytest.raises(ValueError):
        gen.interpolate(np.zeros(2), np.ones(2), 1)
