"""A dependency-free writer of TensorBoard scalar event files.

TensorBoard reads TFRecord files of `Event` protocol buffers. Scalars need
only a handful of protobuf fields, encoded here by hand, so jdl writes them
without importing tensorboardX (which imports PyTorch when it is installed,
several seconds per process) or TensorFlow.

Record framing: uint64 length, masked CRC-32C of the length, payload, masked
CRC-32C of the payload (all little-endian).
"""

from __future__ import annotations

import os
import socket
import struct
import time

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


def _scalar_summary(tag: str, value: float) -> bytes:
    # Summary.value = 1 (Value: tag = 1, simple_value = 2 (float)).
    summary_value = _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value))
    return _length_delimited(5, _length_delimited(1, summary_value))


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

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)))
        self._file.write(record + struct.pack("<I", _masked_crc(record)))
