"""The Free Spoken Digit Dataset (FSDD): 3,000 real recordings of spoken digits.

Six speakers (george, jackson, lucas, nicolas, theo, yweweler) each say the digits 0-9
fifty times: mono 16-bit PCM WAV at 8 kHz, trimmed to near-minimal silence, in
`recordings/{digit}_{speaker}_{take}.wav` (release v1.0.10, CC BY-SA 4.0). The
recordings last 0.14-2.28 s (median 0.42 s).

Where the files are looked up, first match wins: `data_dir`; else
`$JDL_DATA_DIR/fsdd`; else the offline copy `shared/data/fsdd` beside this checkout;
else `~/.cache/jdl/fsdd`. When none holds `recordings/`, the release archive is
downloaded from the dataset's GitHub repository into `$JDL_DATA_DIR/fsdd` (or
`~/.cache/jdl/fsdd`). GitHub makes its source archives on request and publishes no
digest for them, so what is checked is the content: the SHA-256 of all 3,000
recordings' bytes in sorted name order (the same check runs on every load). The
archive is extracted into a temporary folder beside the destination and moved into
place only after the check passes, so `recordings/` is either complete or absent.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request
import wave
from pathlib import Path

import numpy as np

from jdl.data import download as downloads
from jdl.data.dataset import Dataset, Split
from jdl.data.download import ChecksumMismatchError, DatasetUnavailableError
from jdl.errors import UserError

RELEASE = "v1.0.10"
ARCHIVE_URLS: tuple[str, ...] = (
    "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz",
)
# SHA-256 of the concatenated bytes of every recording, in sorted file-name order.
RECORDINGS_SHA256 = "ddb17656a0bca4c5ddace082be188ca630516dc2ef1110afe3c4e9cc71173de4"
SPEAKERS: tuple[str, ...] = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
NUM_CLASSES = 10
NUM_TAKES = 50
TEST_TAKES = 5  # the official split: takes 0-4 are the test set, 5-49 the training set
SAMPLE_RATE = 8000
DEFAULT_LENGTH = 8000  # 1 s at 8 kHz: 20 of the 3,000 recordings (0.67%) are longer
SPLITS = ("official", "speaker")
DOWNLOAD_TIMEOUT_S = 60.0

_NAME = re.compile(r"(\d)_([a-z]+)_(\d+)\.wav")
# Archive members that may be extracted: <top folder>/recordings/<recording name>.
_MEMBER = re.compile(r"[^/]+/recordings/(\d_[a-z]+_\d+\.wav)")
_SHARED_COPY = Path(__file__).resolve().parents[3] / "shared" / "data" / "fsdd"


class FsddFormatError(UserError, ValueError):
    """A recording is not 8 kHz mono 16-bit PCM WAV, or the file set is not FSDD's."""


def default_data_dir() -> Path:
    """Where `load_fsdd` looks when no `data_dir` is given (see the module docstring).

    The first of `$JDL_DATA_DIR/fsdd`, the checkout's `shared/data/fsdd` and
    `~/.cache/jdl/fsdd` that holds `recordings/`; if none does, the download target
    `$JDL_DATA_DIR/fsdd` (or `~/.cache/jdl/fsdd`).
    """
    target = downloads.default_data_dir("fsdd")
    candidates = [target] if os.environ.get("JDL_DATA_DIR") else []
    candidates += [_SHARED_COPY, Path.home() / ".cache" / "jdl" / "fsdd"]
    for candidate in candidates:
        if (candidate / "recordings").is_dir():
            return candidate
    return target


def load_fsdd(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "official",
    heldout_speaker: str | int | None = None,
    length: int = DEFAULT_LENGTH,
    download: bool = True,
) -> Dataset:
    """Loads FSDD as fixed-length waveforms with "train" and "test" splits.

    Args:
      data_dir: folder holding `recordings/`; None means `default_data_dir()`.
      split: "official": takes 0-4 of every speaker and digit are "test" (300), takes
        5-49 "train" (2,700). "speaker": `heldout_speaker`'s 500 recordings are "test",
        the other five speakers' 2,500 "train".
      heldout_speaker: with split="speaker": a name from `SPEAKERS` or its index.
      length: samples per example. Shorter recordings are zero-padded at the end;
        longer ones keep their central `length` samples. The default, 1 s at 8 kHz,
        crops 20 of the 3,000 recordings.
      download: fetch the release archive when no folder holds `recordings/`.

    Returns:
      Splits {"x": float32 (N, length) in [-1, 1), "y": int32 (N,) digit,
      "speaker": int32 (N,) index into `SPEAKERS`}, ordered by speaker, digit, take.

    Raises:
      ValueError (a UserError): unknown split or speaker, or a bad length.
      DatasetUnavailableError: no recordings and none could be downloaded.
      FsddFormatError: a recording that is not 8 kHz mono 16-bit WAV, or missing or
        unexpected recordings.
      ChecksumMismatchError: the recordings are not the release's.
    """
    heldout = _check_arguments(split, heldout_speaker, length)
    raw = load_fsdd_recordings(data_dir=data_dir, download=download)
    recordings, count = raw["folder"], len(raw["waves"])
    x, cropped = _fix_length(raw["waves"], length)
    arrays = {"x": x, "y": raw["digit"], "speaker": raw["speaker"]}
    takes_arr = raw["take"]
    if split == "official":
        test = takes_arr < TEST_TAKES
        how = f"official split (takes 0-{TEST_TAKES - 1} test)"
    else:
        test = arrays["speaker"] == heldout
        how = f"speaker split (test: {SPEAKERS[heldout]}'s recordings)"
    splits: dict[str, Split] = {
        "train": {key: value[~test] for key, value in arrays.items()},
        "test": {key: value[test] for key, value in arrays.items()},
    }
    return Dataset(
        name="fsdd",
        splits=splits,
        num_classes=NUM_CLASSES,
        source=(
            f"fsdd {RELEASE}: {count} WAV recordings in {recordings}, checksum verified; "
            f"{how}; {length} samples at {SAMPLE_RATE} Hz, {cropped} recordings cropped "
            f"({cropped / count:.2%}), the rest zero-padded"
        ),
    )


def load_fsdd_recordings(
    *, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> dict:
    """Every FSDD recording at its own length, checked as `load_fsdd` checks them.

    Args:
      data_dir, download: as in `load_fsdd`.

    Returns:
      {"waves": list of 3,000 float32 1-D arrays in [-1, 1) (0.14-2.28 s at 8 kHz),
      "digit", "speaker" (index into `SPEAKERS`), "take": int32 (3000,) each,
      "folder": the `recordings/` folder read}, ordered by speaker, digit, take.

    Raises:
      As `load_fsdd` (except its argument errors).
    """
    directory = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    recordings = directory / "recordings"
    if not recordings.is_dir():
        if not download:
            raise _unavailable(directory, "download disabled")
        failure = _download(directory)
        if failure:
            raise _unavailable(directory, f"download failed ({failure})")
    paths = _check_file_set(recordings)
    _verify(paths, recordings)
    keys = np.asarray(list(paths), np.int32).reshape(-1, 3)  # (digit, speaker, take) rows
    return {
        "waves": [_read_wav(path) for path in paths.values()],
        "digit": keys[:, 0].copy(),
        "speaker": keys[:, 1].copy(),
        "take": keys[:, 2].copy(),
        "folder": recordings,
    }


def _check_arguments(split: str, heldout_speaker: str | int | None, length: int) -> int | None:
    if split not in SPLITS:
        raise FsddFormatError(f"split={split!r} is not one of {SPLITS}; pick one of them")
    if not isinstance(length, int) or length < 1:
        raise FsddFormatError(f"length={length!r} must be a positive number of samples")
    if split == "official":
        if heldout_speaker is not None:
            raise FsddFormatError(
                "heldout_speaker is only for split='speaker'; drop it or pass split='speaker'"
            )
        return None
    if isinstance(heldout_speaker, int) and 0 <= heldout_speaker < len(SPEAKERS):
        return heldout_speaker
    if isinstance(heldout_speaker, str) and heldout_speaker in SPEAKERS:
        return SPEAKERS.index(heldout_speaker)
    raise FsddFormatError(
        f"split='speaker' needs heldout_speaker, one of {SPEAKERS} or an index in "
        f"[0, {len(SPEAKERS)}), got {heldout_speaker!r}"
    )


def _check_file_set(recordings: Path) -> dict[tuple[int, int, int], Path]:
    """(digit, speaker index, take) -> path, sorted; raises unless it is exactly FSDD's set."""
    found: dict[tuple[int, int, int], Path] = {}
    unexpected = []
    for path in recordings.iterdir():
        if path.suffix.lower() != ".wav":
            continue  # a README or a checksum list beside the recordings is fine
        match = _NAME.fullmatch(path.name)
        speaker = match and match.group(2)
        if not match or speaker not in SPEAKERS or int(match.group(3)) >= NUM_TAKES:
            unexpected.append(path.name)
            continue
        found[int(match.group(1)), SPEAKERS.index(speaker), int(match.group(3))] = path
    if unexpected:
        raise FsddFormatError(
            f"{recordings}: {len(unexpected)} WAV files not named {{digit}}_{{speaker}}_{{take}}"
            f".wav with a known speaker and a take below {NUM_TAKES} (e.g. "
            f"{sorted(unexpected)[0]}); remove them or replace the folder with the release's"
        )
    expected = len(SPEAKERS) * NUM_CLASSES * NUM_TAKES
    if len(found) != expected:
        missing = [
            f"{digit}_{SPEAKERS[speaker]}_{take}.wav"
            for speaker in range(len(SPEAKERS))
            for digit in range(NUM_CLASSES)
            for take in range(NUM_TAKES)
            if (digit, speaker, take) not in found
        ]
        raise FsddFormatError(
            f"{recordings}: {len(found)} of the {expected} recordings are there, "
            f"{len(missing)} missing (e.g. {missing[0]}); delete the folder so it is "
            "downloaded again, or copy in the complete release"
        )
    return {key: found[key] for key in sorted(found, key=lambda k: (k[1], k[0], k[2]))}


def _verify(paths: dict[tuple[int, int, int], Path], recordings: Path) -> None:
    digest = hashlib.sha256()
    for path in sorted(paths.values(), key=lambda p: p.name):
        digest.update(path.read_bytes())
    if digest.hexdigest() != RECORDINGS_SHA256:
        raise ChecksumMismatchError(
            f"{recordings}: the recordings' sha256 is {digest.hexdigest()}, expected "
            f"{RECORDINGS_SHA256} (FSDD {RELEASE}); a file is corrupt or from another release "
            "-- delete the folder so it is downloaded again, or copy in the release's"
        )


def _read_wav(path: Path) -> np.ndarray:
    try:
        with wave.open(str(path), "rb") as f:
            layout = (f.getframerate(), f.getnchannels(), f.getsampwidth())
            frames = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as error:
        raise FsddFormatError(
            f"{path}: not a readable WAV file ({error}); replace it with the release's"
        ) from None
    if layout != (SAMPLE_RATE, 1, 2):
        raise FsddFormatError(
            f"{path}: {layout[0]} Hz, {layout[1]} channel(s), {8 * layout[2]}-bit; FSDD "
            f"recordings are {SAMPLE_RATE} Hz mono 16-bit PCM -- replace it with the release's"
        )
    return np.frombuffer(frames, "<i2").astype(np.float32) / 32768.0


def _fix_length(waves: list[np.ndarray], length: int) -> tuple[np.ndarray, int]:
    """(N, length) float32: zero-padded at the end or centre-cropped; and how many were cropped."""
    out = np.zeros((len(waves), length), np.float32)
    cropped = 0
    for row, y in zip(out, waves, strict=True):
        if len(y) > length:
            start = (len(y) - length) // 2
            y = y[start : start + length]
            cropped += 1
        row[: len(y)] = y
    return out, cropped


def _download(directory: Path) -> str:
    """Fetches and extracts the release into `directory/recordings`; "" or why it failed.

    Raises:
      ChecksumMismatchError, FsddFormatError: an archive arrived but its recordings are
        not the release's (nothing is left under `directory`).
    """
    reasons = []
    for url in ARCHIVE_URLS:
        directory.mkdir(parents=True, exist_ok=True)
        # Beside the destination, so the final rename is atomic.
        work = Path(tempfile.mkdtemp(dir=directory, prefix=".download-"))
        try:
            archive = work / "release.tar.gz"
            try:
                _fetch(url, archive)
            except (OSError, http.client.HTTPException) as error:
                reasons.append(f"{url}: {error}")
                continue
            staged = work / "recordings"
            _extract_recordings(archive, staged, url)
            _verify(_check_file_set(staged), staged)
            os.replace(staged, directory / "recordings")
            return ""
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return "; ".join(reasons) or "no archive URL configured"


def _fetch(url: str, path: Path) -> None:
    with (
        urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
        path.open("wb") as out,
    ):
        shutil.copyfileobj(response, out, 1 << 20)


def _extract_recordings(archive: Path, destination: Path, url: str) -> None:
    """Writes the archive's `*/recordings/*.wav` regular files, by base name only."""
    destination.mkdir()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                match = _MEMBER.fullmatch(member.name)
                if not match or not member.isfile():
                    continue  # code, docs, links: never extracted
                source = tar.extractfile(member)
                (destination / match.group(1)).write_bytes(source.read())
    except (tarfile.TarError, EOFError) as error:
        raise FsddFormatError(
            f"{url} is not a readable tar.gz archive ({error}); check ARCHIVE_URLS"
        ) from None


def _unavailable(directory: Path, why: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"FSDD recordings not found in {directory / 'recordings'} ({why}); put the release's "
        f"recordings/ folder ({{digit}}_{{speaker}}_{{take}}.wav) there from "
        "github.com/Jakobovski/free-spoken-digit-dataset, pass data_dir=..., or set "
        "JDL_DATA_DIR to a directory whose fsdd/ holds it"
    )


__all__ = [
    "ChecksumMismatchError",
    "DatasetUnavailableError",
    "FsddFormatError",
    "SAMPLE_RATE",
    "SPEAKERS",
    "default_data_dir",
    "load_fsdd",
    "load_fsdd_recordings",
]
