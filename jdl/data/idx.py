"""Reading and writing the IDX format used by MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number -- two zero bytes, a dtype code byte and
the number of dimensions -- then one big-endian uint32 size per dimension, then
the array's elements in C order, big-endian. Files may be gzip-compressed; the
reader recognises gzip by its own magic bytes, so the file name does not matter.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from jdl.errors import UserError

# IDX dtype code -> element type as stored on disk (big-endian).
_CODE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_KIND_SIZE_TO_CODE: dict[tuple[str, int], int] = {
    (dtype.kind, dtype.itemsize): code for code, dtype in _CODE_TO_DTYPE.items()
}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_NDIM = 255  # The dimension count is a single byte.


class IdxFormatError(UserError, ValueError):
    """An IDX file is malformed: bad magic, unknown dtype, truncated or oversized."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an IDX file, plain or gzip-compressed.

    Args:
      path: the file. Gzip is detected from the content, not the name.

    Returns:
      A writable array in native byte order with the shape and element type the
      header declares (uint8, int8, int16, int32, float32 or float64).

    Raises:
      FileNotFoundError: the file does not exist.
      IdxFormatError: wrong magic bytes, unknown dtype code, a truncated file or
        gzip stream, or bytes after the data the header describes.
    """
    path = Path(path)
    return _parse(path, _read_bytes(path))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Writes an array as an IDX file, gzip-compressed when the name ends in ".gz".

    The gzip header carries no timestamp, so equal arrays give byte-identical
    files (and therefore stable checksums).

    Args:
      path: destination file; its parent directory must exist.
      array: up to 255 dimensions, each < 2**32, of uint8, int8, int16, int32,
        float32 or float64 elements.

    Raises:
      ValueError: the dtype or shape cannot be represented in IDX.
    """
    array = np.asarray(array)
    code = _KIND_SIZE_TO_CODE.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        supported = ", ".join(str(dtype.newbyteorder("=")) for dtype in _CODE_TO_DTYPE.values())
        raise ValueError(f"IDX cannot store dtype {array.dtype}; convert to one of: {supported}")
    if array.ndim > _MAX_NDIM or any(size >= 2**32 for size in array.shape):
        raise ValueError(f"IDX cannot store shape {array.shape}: at most 255 dims, each < 2**32")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(_CODE_TO_DTYPE[code], copy=False).tobytes(order="C")
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    Path(path).write_bytes(payload)


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise IdxFormatError(
            f"{path}: truncated or corrupt gzip stream ({err}); "
            "delete the file and download or copy it again"
        ) from None


def _parse(path: Path, data: bytes) -> np.ndarray:
    if len(data) < 4:
        raise IdxFormatError(
            f"{path}: truncated IDX file: {len(data)} bytes, shorter than the 4-byte magic "
            "number; delete it and download or copy it again"
        )
    if data[0] != 0 or data[1] != 0:
        raise IdxFormatError(
            f"{path}: not an IDX file: magic bytes {data[:4].hex()} do not start with two zero "
            "bytes; check that the path points at an IDX (MNIST-style) file"
        )
    code, ndim = data[2], data[3]
    if code not in _CODE_TO_DTYPE:
        known = ", ".join(f"0x{known:02X}" for known in _CODE_TO_DTYPE)
        raise IdxFormatError(
            f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known}); "
            "the file is corrupt or not IDX"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise IdxFormatError(
            f"{path}: truncated IDX file: the header declares {ndim} dimensions but the file "
            f"ends after {len(data)} bytes; delete it and download or copy it again"
        )
    shape = tuple(int(size) for size in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = _CODE_TO_DTYPE[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_size
    if actual < expected:
        raise IdxFormatError(
            f"{path}: truncated IDX file: the header promises shape {shape} ({expected} data "
            f"bytes) but only {actual} are present; delete it and download or copy it again"
        )
    if actual > expected:
        raise IdxFormatError(
            f"{path}: {actual - expected} bytes of trailing garbage after the {expected} data "
            f"bytes that shape {shape} needs; the file is corrupt, replace it"
        )
    flat = np.frombuffer(data, dtype, offset=header_size)
    return flat.astype(dtype.newbyteorder("="), copy=True).reshape(shape)
