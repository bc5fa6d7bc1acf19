"""Images and histograms in TensorBoard event files, read back by TensorBoard itself."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

import jdl
from jdl.metric_log import MetricLogger
from jdl.tensorboard import EventWriter, TensorBoardValueError, encode_png


def _accumulator(logdir) -> EventAccumulator:
    accumulator = EventAccumulator(str(logdir), size_guidance={"images": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


RNG = np.random.default_rng(0)
PIXELS = {
    "grey": RNG.integers(0, 256, (5, 7), dtype=np.uint8),
    "grey_alpha": RNG.integers(0, 256, (4, 3, 2), dtype=np.uint8),
    "rgb": RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8),
    "rgba": RNG.integers(0, 256, (3, 8, 4), dtype=np.uint8),
}


@pytest.mark.parametrize("kind", sorted(PIXELS))
def test_image_decodes_to_the_same_pixels(tmp_path, kind):
    pixels = PIXELS[kind]
    logger = MetricLogger(str(tmp_path), total_steps=10, progress=False)
    logger.image(f"samples/{kind}", pixels, step=3)
    logger.close()
    [event] = _accumulator(tmp_path / "tensorboard").Images(f"samples/{kind}")
    assert event.step == 3
    assert (event.height, event.width) == pixels.shape[:2]
    decoded = _decode(event.encoded_image_string)
    np.testing.assert_array_equal(decoded, pixels)


def test_float_bool_and_integer_images(tmp_path):
    writer = EventWriter(str(tmp_path))
    ramp = np.linspace(-0.5, 1.5, 12).reshape(3, 4)
    writer.image("float", ramp, 1)  # read as [0, 1], clipped
    writer.image("bool", ramp > 0.5, 1)
    writer.image("int", np.arange(12, dtype=np.int64).reshape(3, 4) * 20, 1)
    heat = np.array([[-3.0, 1.0], [5.0, 1.0]])
    writer.image("heatmap", heat, 1, rescale=True)  # its own range -> [0, 255]
    writer.close()
    accumulator = _accumulator(tmp_path)
    tags = ("float", "bool", "int", "heatmap")
    decoded = {tag: _decode(accumulator.Images(tag)[0].encoded_image_string) for tag in tags}
    np.testing.assert_array_equal(decoded["float"], np.rint(np.clip(ramp, 0, 1) * 255))
    np.testing.assert_array_equal(decoded["bool"], (ramp > 0.5) * 255)
    np.testing.assert_array_equal(decoded["int"], np.arange(12).reshape(3, 4) * 20)
    np.testing.assert_array_equal(decoded["heatmap"], [[0, 128], [255, 128]])


def test_images_reach_tensorboards_image_plugin(tmp_path):
    # What the TensorBoard server reads: summaries migrated to the image plugin's tensors.
    writer = EventWriter(str(tmp_path))
    writer.image("grid", PIXELS["rgb"], 7)
    writer.close()
    accumulator = plugin_event_accumulator.EventAccumulator(str(tmp_path))
    accumulator.Reload()
    assert "grid" in accumulator.PluginTagToContent("images")
    [event] = accumulator.Tensors("grid")
    width, height, png = tensor_util.make_ndarray(event.tensor_proto)
    assert (int(width), int(height), event.step) == (9, 6, 7)
    np.testing.assert_array_equal(_decode(png), PIXELS["rgb"])


def test_histogram_statistics_and_buckets(tmp_path):
    values = RNG.normal(1.0, 2.0, size=(40, 25))
    with_nonfinite = np.concatenate([values.ravel(), [np.nan, np.inf, -np.inf]])
    logger = MetricLogger(str(tmp_path), total_steps=10, progress=False)
    logger.histogram("params/kernel", with_nonfinite, step=5, bins=20)
    logger.close()
    [event] = _accumulator(tmp_path / "tensorboard").Histograms("params/kernel")
    histo = event.histogram_value
    assert event.step == 5
    assert histo.num == values.size  # the non-finite entries are left out
    assert histo.min == values.min() and histo.max == values.max()
    assert histo.sum == pytest.approx(values.sum(), rel=1e-12)
    assert histo.sum_squares == pytest.approx((values**2).sum(), rel=1e-12)
    counts, edges = np.histogram(values, bins=20)
    assert histo.bucket == counts.tolist()
    np.testing.assert_allclose(histo.bucket_limit, edges[1:])


def test_histograms_reach_tensorboards_histogram_plugin(tmp_path):
    values = np.array([0.0, 0.1, 0.2, 0.2, 0.9, 1.0])
    writer = EventWriter(str(tmp_path))
    writer.histogram("h", values, 2, bins=2)
    writer.histogram("constant", np.full(7, 3.5), 2)
    writer.close()
    accumulator = plugin_event_accumulator.EventAccumulator(str(tmp_path))
    accumulator.Reload()
    assert {"h", "constant"} <= set(accumulator.PluginTagToContent("histograms"))
    buckets = tensor_util.make_ndarray(accumulator.Tensors("h")[0].tensor_proto)
    np.testing.assert_allclose(buckets, [[0.0, 0.5, 4], [0.5, 1.0, 2]])  # (left, right, count)
    constant = tensor_util.make_ndarray(accumulator.Tensors("constant")[0].tensor_proto)
    np.testing.assert_allclose(constant, [[3.5, 3.5, 7]])


def test_histogram_of_no_finite_value_writes_nothing(tmp_path):
    writer = EventWriter(str(tmp_path))
    writer.histogram("empty", np.array([np.nan, np.inf]), 1)
    writer.histogram("kept", np.arange(4.0), 1)
    writer.close()
    assert _accumulator(tmp_path).Tags()["histograms"] == ["kept"]


def test_scalars_images_and_histograms_side_by_side(tmp_path):
    logger = MetricLogger(str(tmp_path), total_steps=30, progress=False)
    for step in (10, 20, 30):
        logger.write(step, {"train/loss": 1.0 / step})
        logger.image("eval/confusion", np.eye(3) * step, step, rescale=True)
        logger.histogram("params/w", np.arange(step, dtype=np.float32), step)
    logger.close()
    accumulator = _accumulator(tmp_path / "tensorboard")
    tags = accumulator.Tags()
    assert tags["scalars"] == ["train/loss"]
    assert tags["images"] == ["eval/confusion"] and tags["histograms"] == ["params/w"]
    assert [e.value for e in accumulator.Scalars("train/loss")] == pytest.approx(
        [0.1, 0.05, 1 / 30]
    )
    assert [e.step for e in accumulator.Images("eval/confusion")] == [10, 20, 30]
    assert [e.histogram_value.num for e in accumulator.Histograms("params/w")] == [10, 20, 30]


@pytest.mark.parametrize(
    ("image", "words"),
    [
        (np.zeros((2, 3, 5)), "shape (H, W) or (H, W, C)"),
        (np.zeros((4, 2, 3, 3)), "shape (H, W) or (H, W, C)"),
        (np.zeros((0, 3)), "shape (H, W) or (H, W, C)"),
        (np.array([[0, 256]]), "rescale=True"),
        (np.array([[0.5, np.nan]]), "NaN"),
        (np.array([["a", "b"]]), "numbers"),
    ],
)
def test_bad_images_are_one_line_user_errors(tmp_path, image, words):
    logger = MetricLogger(str(tmp_path), total_steps=1, progress=False)
    with pytest.raises(TensorBoardValueError) as info:
        logger.image("bad", image, 1)
    logger.close()
    assert isinstance(info.value, jdl.UserError) and isinstance(info.value, ValueError)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_disabled_or_tensorboard_free_loggers_write_no_image(tmp_path):
    for kwargs in ({"enabled": False}, {"tensorboard": False}):
        logger = MetricLogger(str(tmp_path / "run"), total_steps=1, progress=False, **kwargs)
        logger.image("x", np.zeros((2, 2)), 1)
        logger.histogram("h", np.zeros(3), 1)
        logger.close()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_png_encoder_is_read_by_pillow_for_a_large_image():
    pixels = RNG.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    png = encode_png(pixels)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(_decode(png), pixels)


def test_import_jdl_loads_no_tensorboard_tensorflow_or_torch():
    code = (
        "import sys, jdl, jdl.tensorboard, jdl.metric_log; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'tensorboard', 'tensorflow', 'tensorboardX', 'torch', 'PIL'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.strip() == "[]"
