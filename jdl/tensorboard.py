"""A dependency-free writer of TensorBoard event files: scalars, images, histograms.

TensorBoard reads TFRecord files of `Event` protocol buffers. Scalars, images
and histograms need only a handful of protobuf fields, encoded here by hand, so
jdl writes them without importing tensorboardX (which imports PyTorch when it is
installed, several seconds per process), TensorFlow, or the `tensorboard`
package (not a dependency of jdl). Images are PNG-encoded here too (zlib only).

The image and histogram values are the classic `Summary.Value.image` and
`Summary.Value.histo` fields, which TensorBoard's image and histogram dashboards
read (through `tensorboard.data_compat`) as they read TensorFlow 1's summaries.

Record framing: uint64 length, masked CRC-32C of the length, payload, masked
CRC-32C of the payload (all little-endian).
"""

from __future__ import annotations

import os
import socket
import struct
import time
import zlib

import numpy as np
from numpy.typing import ArrayLike

from jdl.errors import UserError

_CRC32C_TABLE = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ 0x82F63B78 if _crc & 1 else _crc >> 1
    _CRC32C_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    # Event: wall_time = 1 (double), step = 2 (int64), then file_version = 3 or summary = 5.
    return _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step)) + body


def _double(number: int, value: float) -> bytes:
    return _field(number, 1, struct.pack("<d", value))


def _summary(tag: str, value_fields: bytes) -> bytes:
    # Event.summary = 5 (Summary.value = 1 (Value: tag = 1, then the value's own field)).
    value = _length_delimited(1, tag.encode()) + value_fields
    return _length_delimited(5, _length_delimited(1, value))


def _scalar_summary(tag: str, value: float) -> bytes:
    # Value.simple_value = 2 (float).
    return _summary(tag, _field(2, 5, struct.pack("<f", value)))


def _image_summary(tag: str, pixels: np.ndarray) -> bytes:
    # Value.image = 4 (Image: height = 1, width = 2, colorspace = 3 (channels),
    # encoded_image_string = 4 (PNG bytes)).
    height, width, channels = pixels.shape
    image = (
        _field(1, 0, _varint(height))
        + _field(2, 0, _varint(width))
        + _field(3, 0, _varint(channels))
        + _length_delimited(4, encode_png(pixels))
    )
    return _summary(tag, _length_delimited(4, image))


def _histogram_summary(tag: str, histogram: Histogram) -> bytes:
    # Value.histo = 5 (HistogramProto: min = 1, max = 2, num = 3, sum = 4, sum_squares = 5,
    # all doubles; bucket_limit = 6 and bucket = 7, packed repeated doubles). bucket[i]
    # counts the values up to bucket_limit[i], above bucket_limit[i - 1] (or `min`).
    limits = np.asarray(histogram.bucket_limit, "<f8").tobytes()
    counts = np.asarray(histogram.bucket, "<f8").tobytes()
    proto = (
        _double(1, histogram.min)
        + _double(2, histogram.max)
        + _double(3, histogram.num)
        + _double(4, histogram.sum)
        + _double(5, histogram.sum_squares)
        + _length_delimited(6, limits)
        + _length_delimited(7, counts)
    )
    return _summary(tag, _length_delimited(5, proto))


class TensorBoardValueError(UserError, ValueError):
    """An image or histogram that cannot be written (wrong shape, dtype or values)."""


def image_pixels(image: ArrayLike, *, rescale: bool = False) -> np.ndarray:
    """`image` as uint8 pixels of shape (H, W, C), C = 1 (grey), 2 (grey, alpha), 3 (RGB)
    or 4 (RGBA).

    Args:
      image: an array of shape (H, W) or (H, W, C). uint8 is taken as it is; bool as
        0/255; floats are read as [0, 1] (values outside are clipped); other integers
        must lie in [0, 255].
      rescale: map the array's own range [min, max] to [0, 255] instead (heatmaps,
        confusion-matrix counts); a constant array becomes black.

    Raises:
      TensorBoardValueError: another shape, a non-numeric dtype, integers outside
        [0, 255] without `rescale`, or non-finite values.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or 0 in array.shape:
        raise TensorBoardValueError(
            f"an image must have shape (H, W) or (H, W, C) with C in 1..4, not {array.shape}; "
            "arrange several images in one grid first"
        )
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TensorBoardValueError(f"an image must hold numbers, not {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise TensorBoardValueError("an image holds NaN or infinite values; replace them first")
    if rescale:
        low, high = array.min(), array.max()
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    elif np.issubdtype(np.asarray(image).dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise TensorBoardValueError(
                f"integer image values must lie in [0, 255], not [{array.min():g}, "
                f"{array.max():g}]; pass rescale=True to map their range to [0, 255]"
            )
        return array.astype(np.uint8)
    return np.rint(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of uint8 `pixels` of shape (H, W, C), C in 1..4 (8 bits per channel)."""
    height, width, channels = pixels.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]  # grey, grey+alpha, RGB, RGBA

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = np.ascontiguousarray(pixels, np.uint8).reshape(height, width * channels)
    # Each scanline starts with its filter type; 0 (none) keeps the encoder trivial.
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


class Histogram:
    """The statistics and buckets of a histogram of the finite entries of an array.

    Attributes:
      min, max, num, sum, sum_squares: of the finite values (num counts them).
      bucket_limit: right edge of each bucket (the first starts at `min`).
      bucket: count of each bucket.
    """

    def __init__(self, values: ArrayLike, *, bins: int | str = 30):
        array = np.asarray(values, dtype=np.float64).ravel()
        array = array[np.isfinite(array)]  # NaN and +-inf have no place on the axis
        self.num = float(array.size)
        if not array.size:
            self.min = self.max = self.sum = self.sum_squares = 0.0
            self.bucket_limit, self.bucket = [], []
            return
        self.min, self.max = float(array.min()), float(array.max())
        self.sum, self.sum_squares = float(array.sum()), float(np.dot(array, array))
        if self.min == self.max:
            self.bucket_limit, self.bucket = [self.max], [self.num]
            return
        counts, edges = np.histogram(array, bins=bins, range=(self.min, self.max))
        self.bucket_limit = [float(edge) for edge in edges[1:]]
        self.bucket = [float(count) for count in counts]


class EventWriter:
    """Appends scalar summaries to a new `events.out.tfevents.*` file in `logdir`.

    Args:
      logdir: directory of the event files (created if missing).
      purge_step: when resuming, the step the run restarts from: TensorBoard then
        discards the earlier run's events from this step on.
    """

    def __init__(self, logdir: str, *, purge_step: int | None = None):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._write(_event(time.time(), 0, _length_delimited(3, b"brain.Event:2")))
        if purge_step is not None:
            # SessionLog(status=START) at a step makes TensorBoard drop the events at and
            # after that step left by an earlier, interrupted run (Event.session_log = 7).
            self._write(
                _event(time.time(), purge_step, _length_delimited(7, _field(1, 0, b"\x01")))
            )

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._write(_event(time.time(), int(step), _scalar_summary(tag, float(value))))

    def image(self, tag: str, image: ArrayLike, step: int, *, rescale: bool = False) -> None:
        """Writes `image` (see `image_pixels` for the shapes and dtypes) as a PNG."""
        pixels = image_pixels(image, rescale=rescale)
        self._write(_event(time.time(), int(step), _image_summary(tag, pixels)))

    def histogram(self, tag: str, values: ArrayLike, step: int, *, bins: int | str = 30) -> None:
        """Writes a histogram of the finite entries of `values` (`bins` as `np.histogram`'s).

        Nothing is written when no entry is finite.
        """
        histogram = Histogram(values, bins=bins)
        if histogram.num:
            self._write(_event(time.time(), int(step), _histogram_summary(tag, histogram)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)))
        self._file.write(record + struct.pack("<I", _masked_crc(record)))
