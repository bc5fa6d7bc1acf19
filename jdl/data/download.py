"""Getting dataset files onto disk: the data directory, mirrors, checksums, atomic downloads.

Shared by the loaders of standard file-based datasets (MNIST, CIFAR-10). A file is
downloaded to a temporary name beside its destination, checked against its published
digest while it streams, and only then renamed into place, so a reader never sees a
partial or corrupt file under the real name.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

from jdl.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
_CHUNK_BYTES = 1 << 20


class DatasetUnavailableError(UserError, FileNotFoundError):
    """The dataset's files are missing and could not be downloaded."""


class ChecksumMismatchError(UserError, ValueError):
    """A dataset file's digest differs from the published one."""


def default_data_dir(name: str) -> Path:
    """Returns `$JDL_DATA_DIR/<name>` if the variable is set, else `~/.cache/jdl/<name>`."""
    root = os.environ.get("JDL_DATA_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "jdl"
    return base.expanduser() / name


def download_missing(
    missing: list[str],
    directory: Path,
    mirrors: tuple[str, ...],
    checksums: dict[str, str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[list[str], str]:
    """Downloads each missing file in turn into `directory`.

    Args:
      missing: file names; a file's URL is mirror + name.
      directory: destination, created if needed.
      mirrors: base URLs tried in order for each file.
      checksums: file name -> published hex digest (MD5 or SHA-256).
      timeout_s: socket timeout per request.

    Returns:
      (files still missing, why the first file no mirror could deliver failed).

    Raises:
      ChecksumMismatchError: see `download`.
    """
    still_missing = list(missing)
    for name in missing:
        failure = download(name, directory, mirrors, checksums[name], timeout_s=timeout_s)
        if failure:
            # Later files would hit the same mirrors; stop instead of waiting on each.
            return still_missing, failure
        still_missing.remove(name)
    return still_missing, ""


def download(
    name: str,
    directory: Path,
    mirrors: tuple[str, ...],
    expected: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> str:
    """Tries each mirror for one file; returns "" on success, else the reasons joined.

    Raises:
      ChecksumMismatchError: no mirror delivered the file and at least one
        delivered wrong bytes (which are deleted, never left under the real name).
    """
    reasons: list[str] = []
    mismatch: ChecksumMismatchError | None = None
    for mirror in mirrors:
        url = mirror + name
        try:
            fetch(url, directory / name, expected, timeout_s=timeout_s)
            return ""
        except ChecksumMismatchError as err:
            logger.warning("%s", err)
            mismatch = mismatch or err
            reasons.append(f"{url}: checksum mismatch")
        except (OSError, http.client.HTTPException) as err:  # Network, HTTP status, disk.
            reasons.append(f"{url}: {err}")
    if mismatch is not None:
        raise mismatch
    return "; ".join(reasons) or "no mirrors configured"


def fetch(
    url: str, destination: Path, expected: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Streams `url` to a temp file beside `destination`, verifies it, renames it into place.

    Raises:
      ChecksumMismatchError: the bytes received do not have digest `expected`.
      OSError, http.client.HTTPException: the transfer or the write failed.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = _new_hash(expected)
    # Same directory, so the final rename is atomic and readers never see a partial file.
    fd, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    temp = Path(temp_name)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=timeout_s) as r,
        ):
            while chunk := r.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
        _check_digest(digest.hexdigest(), expected, f"{destination.name} downloaded from {url}")
        os.replace(temp, destination)
    finally:
        temp.unlink(missing_ok=True)


def verify(path: Path, expected: str) -> None:
    """Raises ChecksumMismatchError unless the file at `path` has digest `expected`."""
    digest = _new_hash(expected)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    _check_digest(digest.hexdigest(), expected, str(path))


def _check_digest(actual: str, expected: str, what: str) -> None:
    if actual != expected.lower():
        algorithm = "md5" if len(expected) == 32 else "sha256"
        raise ChecksumMismatchError(
            f"{what}: {algorithm} checksum mismatch: expected {expected.lower()}, got {actual}; "
            "the file is corrupt or not the standard one -- delete it so it is downloaded again, "
            "or replace it with the official file"
        )


def _new_hash(expected: str) -> hashlib._Hash:
    if len(expected) == 32:
        return hashlib.md5(usedforsecurity=False)
    if len(expected) == 64:
        return hashlib.sha256()
    raise ValueError(
        f"checksum {expected!r} is neither MD5 (32 hex digits) nor SHA-256 (64 hex digits)"
    )
