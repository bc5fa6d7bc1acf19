"""Tests for the on-device image augmentations in jdl.data.augment."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdl.data import random_crop, random_flip_left_right, random_translate, translate


def _distinct_images(n: int, height: int, width: int, channels: int = 1) -> np.ndarray:
    """Images whose every pixel value is unique and non-zero, so moves can be traced."""
    return np.arange(1, n * height * width * channels + 1, dtype=np.float32).reshape(
        n, height, width, channels
    )


def _shift_by_hand(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Reference: out[i, j] = image[i - dy, j - dx], zero where that falls outside."""
    out = np.zeros_like(image)
    height, width = image.shape[:2]
    for i in range(height):
        for j in range(width):
            if 0 <= i - dy < height and 0 <= j - dx < width:
                out[i, j] = image[i - dy, j - dx]
    return out


def _traced_shift(original: np.ndarray, moved: np.ndarray) -> tuple[int, int]:
    """Reads the (dy, dx) off any surviving pixel of a distinct-valued image."""
    i, j = np.argwhere(moved[..., 0] != 0)[0]
    r, c = np.argwhere(original[..., 0] == moved[i, j, 0])[0]
    return int(i - r), int(j - c)


def test_translate_matches_hand_checked_example():
    image = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.float32)[None, :, :, None]
    down_right = translate(jnp.asarray(image), jnp.array([[1, 1]]))
    np.testing.assert_array_equal(down_right[0, :, :, 0], [[0, 0, 0], [0, 1, 2], [0, 4, 5]])
    up_left = translate(jnp.asarray(image), jnp.array([[-1, -2]]))
    np.testing.assert_array_equal(up_left[0, :, :, 0], [[6, 0, 0], [9, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("shift", [(0, 0), (2, -1), (-3, 4), (5, 0), (-9, 2)])
def test_translate_matches_reference(shift):
    images = _distinct_images(2, 5, 6, channels=3)
    shifts = np.array([shift, (-shift[0], 1)], np.int32)
    out = np.asarray(translate(jnp.asarray(images), jnp.asarray(shifts)))
    for n in range(2):
        np.testing.assert_array_equal(out[n], _shift_by_hand(images[n], *shifts[n]))


# One batch shape and one max_shift throughout, so each function compiles once.
SHAPE = (32, 6, 6, 2)
MAX_SHIFT = 2


def test_random_translate_moves_content_by_the_drawn_shift():
    images = _distinct_images(*SHAPE)
    out = np.asarray(random_translate(jax.random.key(0), jnp.asarray(images), max_shift=MAX_SHIFT))
    assert out.shape == images.shape and out.dtype == np.float32
    drawn = set()
    for n in range(len(images)):
        dy, dx = _traced_shift(images[n], out[n])
        assert -MAX_SHIFT <= dy <= MAX_SHIFT and -MAX_SHIFT <= dx <= MAX_SHIFT
        np.testing.assert_array_equal(out[n], _shift_by_hand(images[n], dy, dx))
        drawn.add((dy, dx))
    # 32 independent per-example draws from 25 shifts cover many of them.
    assert len(drawn) >= 10
    assert {dy for dy, _ in drawn} == {-2, -1, 0, 1, 2}


def test_random_translate_zero_fills_the_uncovered_border():
    out = np.asarray(random_translate(jax.random.key(3), jnp.ones(SHAPE), max_shift=MAX_SHIFT))
    for n in range(SHAPE[0]):
        rows = np.flatnonzero(out[n, :, :, 0].any(axis=1))
        cols = np.flatnonzero(out[n, :, :, 0].any(axis=0))
        assert len(rows) >= SHAPE[1] - MAX_SHIFT and len(cols) >= SHAPE[2] - MAX_SHIFT
        covered = out[n, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (covered == 1).all()
        assert out[n].sum() == covered.sum()  # Everything else is exactly zero.
    assert (out == 0).any()


def test_random_translate_zero_max_shift_is_identity_and_key_fixes_result():
    images = jnp.asarray(_distinct_images(*SHAPE))
    np.testing.assert_array_equal(random_translate(jax.random.key(0), images, max_shift=0), images)
    a = random_translate(jax.random.key(7), images, max_shift=MAX_SHIFT)
    b = random_translate(jax.random.key(7), images, max_shift=MAX_SHIFT)
    c = random_translate(jax.random.key(8), images, max_shift=MAX_SHIFT)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_translate_shift_larger_than_image():
    images = jnp.asarray(_distinct_images(40, 2, 2))
    out = np.asarray(random_translate(jax.random.key(1), images, max_shift=5))
    assert out.shape == (40, 2, 2, 1)
    blank = (out == 0).all(axis=(1, 2, 3))
    assert blank.any()  # Most draws push everything out ...
    assert not blank.all()  # ... small ones keep content, which is still a pure shift.
    for n in np.flatnonzero(~blank):
        dy, dx = _traced_shift(np.asarray(images[n]), out[n])
        np.testing.assert_array_equal(out[n], _shift_by_hand(np.asarray(images[n]), dy, dx))


def test_random_crop_keeps_shape_and_is_a_shifted_window():
    images = _distinct_images(*SHAPE)
    out = np.asarray(random_crop(jax.random.key(0), jnp.asarray(images), padding=MAX_SHIFT))
    assert out.shape == images.shape and out.dtype == images.dtype
    shifts = set()
    for n in range(SHAPE[0]):
        dy, dx = _traced_shift(images[n], out[n])
        assert max(abs(dy), abs(dx)) <= MAX_SHIFT
        np.testing.assert_array_equal(out[n], _shift_by_hand(images[n], dy, dx))
        shifts.add((dy, dx))
    assert len(shifts) >= 10


def test_random_crop_reflect_padding_has_no_zeros():
    images = jnp.asarray(_distinct_images(*SHAPE))
    out = np.asarray(random_crop(jax.random.key(2), images, padding=MAX_SHIFT, pad_mode="reflect"))
    assert out.shape == SHAPE
    assert (out != 0).all()
    assert not np.array_equal(out, np.asarray(images))
    for n in range(SHAPE[0]):  # Each output only holds its own image's pixels.
        assert set(np.unique(out[n])) <= set(np.unique(np.asarray(images[n])))


def test_flip_twice_with_same_key_is_identity_and_flips_some_examples():
    images = jnp.asarray(_distinct_images(*SHAPE))
    key = jax.random.key(4)
    once = np.asarray(random_flip_left_right(key, images))
    twice = random_flip_left_right(key, jnp.asarray(once))
    np.testing.assert_array_equal(twice, images)
    mirrored = [np.array_equal(once[n], images[n, :, ::-1]) for n in range(SHAPE[0])]
    unchanged = [np.array_equal(once[n], images[n]) for n in range(SHAPE[0])]
    assert all(m != u for m, u in zip(mirrored, unchanged, strict=True))  # One or the other.
    assert 4 <= sum(mirrored) <= 28  # Per-example coin flips, not one for the batch.


def test_augmentations_jit_compile_inside_a_step_and_match_eager():
    images = jnp.asarray(_distinct_images(*SHAPE))
    key = jax.random.key(5)

    @jax.jit
    def pipeline(key, images):
        k1, k2, k3 = jax.random.split(key, 3)
        images = random_crop(k1, images, padding=MAX_SHIFT)
        images = random_translate(k2, images, max_shift=MAX_SHIFT)
        return random_flip_left_right(k3, images)

    out = pipeline(key, images)
    assert out.shape == images.shape and out.dtype == images.dtype
    k1, k2, k3 = jax.random.split(key, 3)
    eager = random_flip_left_right(
        k3, random_translate(k2, random_crop(k1, images, padding=MAX_SHIFT), max_shift=MAX_SHIFT)
    )
    np.testing.assert_array_equal(out, eager)
    assert not np.array_equal(out, images)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: random_translate(jax.random.key(0), x[0], max_shift=1), "must be NHWC"),
        (lambda x: random_translate(jax.random.key(0), x, max_shift=-1), "max_shift must be"),
        (lambda x: random_crop(jax.random.key(0), x, padding=1.5), "padding must be"),
        (lambda x: translate(x, jnp.zeros((3, 2), jnp.int32)), r"shifts must be integer \(N, 2\)"),
        (lambda x: translate(x, jnp.zeros((2, 2))), "shifts must be integer"),
    ],
)
def test_invalid_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(jnp.zeros((2, 4, 4, 1)))


def test_cutout_zeroes_one_clipped_square_per_image():
    from jdl.data import cutout

    images = jnp.ones((64, 10, 12, 2))
    out = np.asarray(cutout(jax.random.key(3), images, size=4))
    assert out.shape == images.shape
    for image in out:
        zero = image[..., 0] == 0
        assert np.array_equal(zero, image[..., 1] == 0)  # all channels of the hole
        rows, cols = np.nonzero(zero)
        assert 1 <= zero.sum() <= 16
        # One axis-aligned rectangle, at most 4 x 4 (smaller where a border clips it).
        assert zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4
    sizes = [(img[..., 0] == 0).sum() for img in out]
    assert max(sizes) == 16 and min(sizes) < 16  # whole squares inside, clipped at borders
    np.testing.assert_array_equal(cutout(jax.random.key(3), images, size=0), images)


def test_mixup_mixes_inputs_and_targets_with_the_same_weight():
    from jdl.data import mixup

    images = jnp.arange(8, dtype=jnp.float32)[:, None, None, None] * jnp.ones((8, 2, 2, 1))
    labels = jnp.arange(8) % 4
    mixed, targets = mixup(jax.random.key(0), images, labels, num_classes=4, alpha=0.4)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
    # Each mixed image is lam * x_i + (1 - lam) * x_j: with x_i = i everywhere, its
    # value v and the targets must tell the same story.
    values = np.asarray(mixed)[:, 0, 0, 0]
    lam_from_targets = []
    for i, v in enumerate(values):
        t = np.asarray(targets[i])
        own = t[int(labels[i])]
        lam_from_targets.append(own)
        partner_values = [j for j in range(8) if abs(own * i + (1 - own) * j - v) < 1e-4]
        if own < 1 - 1e-6:  # the partner has the other label share
            assert partner_values, (i, v, own)
    assert any(0.01 < lam < 0.99 for lam in lam_from_targets)


def test_classification_loss_uses_soft_targets_when_given():
    import jdl

    class Fixed:
        def __call__(self, x):
            return x

    logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    targets = jnp.array([[0.7, 0.3], [0.5, 0.5]])
    out = jdl.classification_loss()(
        Fixed(), {"x": logits, "y": jnp.array([0, 0]), "targets": targets}
    )
    log_p = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(out["loss"], -(targets * log_p).sum(-1), rtol=1e-6)
    np.testing.assert_array_equal(out["accuracy"], [1.0, 0.0])
