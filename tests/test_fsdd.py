"""jdl.data.load_fsdd: the real recordings (shared copy), the WAV format checks, the download."""

from __future__ import annotations

import hashlib
import io
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest
from support import serve_directory

import jdl
from jdl.data import fsdd

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"
TINY_SPEAKERS = ("alice", "bob")
TINY_TAKES = 6


# ------------------------------------------------------------------------------- helpers


def _wav_bytes(samples: np.ndarray, rate: int = 8000, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.repeat(samples, channels).astype("<i2").tobytes())
    return buffer.getvalue()


def _tiny_recordings() -> dict[str, bytes]:
    """2 speakers x 10 digits x 6 takes of short tones; take 5 of digit 9 is 1.5 s long."""
    files = {}
    for speaker_index, speaker in enumerate(TINY_SPEAKERS):
        for digit in range(10):
            for take in range(TINY_TAKES):
                n = 12000 if (digit, take) == (9, 5) else 2000 + 100 * take
                t = np.arange(n) / 8000
                tone = 8000 * np.sin(2 * np.pi * (200 + 50 * digit + 10 * speaker_index) * t)
                files[f"{digit}_{speaker}_{take}.wav"] = _wav_bytes(tone)
    return files


def _digest(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(files[name])
    return digest.hexdigest()


@pytest.fixture
def tiny(monkeypatch) -> dict[str, bytes]:
    """The loader expects the tiny release: its speakers, takes and checksum."""
    files = _tiny_recordings()
    monkeypatch.setattr(fsdd, "SPEAKERS", TINY_SPEAKERS)
    monkeypatch.setattr(fsdd, "NUM_TAKES", TINY_TAKES)
    monkeypatch.setattr(fsdd, "RECORDINGS_SHA256", _digest(files))
    return files


def _write(directory: Path, files: dict[str, bytes]) -> Path:
    (directory / "recordings").mkdir(parents=True)
    for name, payload in files.items():
        (directory / "recordings" / name).write_bytes(payload)
    return directory


def _archive(files: dict[str, bytes], extra: dict[str, bytes] | None = None) -> bytes:
    """A release-shaped tar.gz: free-spoken-digit-dataset-1.0.10/recordings/*.wav and more."""
    members = {f"free-spoken-digit-dataset-1.0.10/recordings/{n}": b for n, b in files.items()}
    members["free-spoken-digit-dataset-1.0.10/README.md"] = b"# FSDD\n"
    members.update(extra or {})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


# ------------------------------------------------------------------- the real recordings


@pytest.fixture(scope="module")
def official() -> jdl.data.Dataset:
    return jdl.data.load_fsdd(data_dir=SHARED)


def test_official_split_of_the_real_recordings(official):
    train, test = official["train"], official["test"]
    assert train["x"].shape == (2700, fsdd.DEFAULT_LENGTH) and train["x"].dtype == np.float32
    assert test["x"].shape == (300, fsdd.DEFAULT_LENGTH)
    assert official.num_classes == 10
    for split, per_cell in ((train, 45), (test, 5)):
        assert split["y"].dtype == np.int32 and split["speaker"].dtype == np.int32
        cells = np.bincount(split["speaker"] * 10 + split["y"], minlength=60)
        assert (cells == per_cell).all()  # every speaker x digit: 45 train takes, 5 test
        assert -1.0 <= split["x"].min() and split["x"].max() < 1.0
    assert "20 recordings cropped (0.67%)" in official.source


def test_examples_are_the_wav_samples_zero_padded(official):
    """Test example 0 is 0_george_0.wav (order: speaker, digit, take), padded with zeros."""
    with wave.open(str(SHARED / "recordings" / "0_george_0.wav")) as f:
        samples = np.frombuffer(f.readframes(f.getnframes()), "<i2") / 32768.0
    assert len(samples) < fsdd.DEFAULT_LENGTH
    x = official["test"]["x"][0]
    np.testing.assert_array_equal(x[: len(samples)], samples.astype(np.float32))
    assert not x[len(samples) :].any()
    assert official["test"]["y"][0] == 0 and official["test"]["speaker"][0] == 0


@pytest.mark.parametrize("heldout", ["theo", 4])
def test_speaker_split_holds_out_every_recording_of_one_speaker(heldout):
    data = jdl.data.load_fsdd(data_dir=SHARED, split="speaker", heldout_speaker=heldout)
    assert (data["test"]["speaker"] == 4).all() and len(data["test"]["y"]) == 500
    assert (data["train"]["speaker"] != 4).all() and len(data["train"]["y"]) == 2500
    assert np.bincount(data["test"]["y"]).tolist() == [50] * 10
    assert "theo" in data.source


def test_default_directory_is_the_shared_copy(monkeypatch):
    monkeypatch.delenv("JDL_DATA_DIR", raising=False)
    assert fsdd.default_data_dir() == SHARED


def test_jdl_data_dir_takes_precedence_when_it_holds_the_recordings(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path))
    _write(tmp_path / "fsdd", tiny)
    assert fsdd.default_data_dir() == tmp_path / "fsdd"
    data = jdl.data.load_fsdd(download=False)
    assert len(data["train"]["y"]) + len(data["test"]["y"]) == len(tiny)
    # Without recordings there it falls back to the shared copy.
    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "empty"))
    assert fsdd.default_data_dir() == SHARED


# ------------------------------------------------------------------ format and file set


def test_small_wav_files_load_with_crop_and_pad(tmp_path, tiny):
    data = jdl.data.load_fsdd(data_dir=_write(tmp_path, tiny), length=4000)
    assert data["test"]["x"].shape == (2 * 10 * 5, 4000)  # takes 0-4
    assert data["train"]["x"].shape == (2 * 10 * 1, 4000)  # take 5
    assert "2 recordings cropped (1.67%)" in data.source
    # The 1.5 s recording (digit 9, take 5) keeps its central 4000 samples.
    long_one = np.frombuffer(tiny["9_alice_5.wav"][44:], "<i2") / 32768.0
    row = np.flatnonzero((data["train"]["y"] == 9) & (data["train"]["speaker"] == 0))[0]
    np.testing.assert_array_equal(data["train"]["x"][row], long_one[4000:8000].astype(np.float32))


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda d: (d / "0_alice_0.wav").unlink(), fsdd.FsddFormatError, "1 missing"),
        (lambda d: (d / "0_carol_0.wav").write_bytes(b""), fsdd.FsddFormatError, "not named"),
        (lambda d: (d / "0_alice_9.wav").write_bytes(b""), fsdd.FsddFormatError, "take below"),
        (
            lambda d: (d / "3_bob_2.wav").write_bytes(_wav_bytes(np.zeros(100), rate=16000)),
            fsdd.ChecksumMismatchError,
            "sha256",
        ),
    ],
)
def test_a_wrong_file_set_is_refused(tmp_path, tiny, change, error, message):
    directory = _write(tmp_path, tiny)
    change(directory / "recordings")
    with pytest.raises(error, match=message) as info:
        jdl.data.load_fsdd(data_dir=directory)
    assert isinstance(info.value, jdl.UserError) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "payload,message",
    [
        (_wav_bytes(np.zeros(100), rate=16000), "16000 Hz"),
        (_wav_bytes(np.zeros(100), channels=2), "2 channel"),
        (b"RIFF....not a wav", "not a readable WAV"),
    ],
)
def test_a_recording_in_another_format_is_refused(tmp_path, monkeypatch, tiny, payload, message):
    files = {**tiny, "3_bob_2.wav": payload}
    monkeypatch.setattr(fsdd, "RECORDINGS_SHA256", _digest(files))
    with pytest.raises(fsdd.FsddFormatError, match=message) as info:
        jdl.data.load_fsdd(data_dir=_write(tmp_path, files))
    assert "3_bob_2.wav" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(split="random"), "split='random'"),
        (dict(split="speaker"), "needs heldout_speaker"),
        (dict(split="speaker", heldout_speaker="zoe"), "needs heldout_speaker"),
        (dict(split="speaker", heldout_speaker=6), "needs heldout_speaker"),
        (dict(heldout_speaker="theo"), "only for split='speaker'"),
        (dict(length=0), "length=0"),
    ],
)
def test_bad_arguments_raise_one_line_user_errors(kwargs, message):
    with pytest.raises(fsdd.FsddFormatError, match=message) as info:
        jdl.data.load_fsdd(data_dir=SHARED, **kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- download


def test_download_extracts_only_the_recordings_atomically(tmp_path, monkeypatch, tiny):
    served = tmp_path / "served"
    served.mkdir()
    evil = {"free-spoken-digit-dataset-1.0.10/recordings/../../evil.wav": b"x"}
    (served / "release.tar.gz").write_bytes(_archive(tiny, evil))
    target = tmp_path / "data" / "fsdd"
    with serve_directory(served) as base:
        monkeypatch.setattr(
            fsdd, "ARCHIVE_URLS", (base + "missing.tar.gz", base + "release.tar.gz")
        )
        data = jdl.data.load_fsdd(data_dir=target)
    assert len(data["test"]["y"]) == 100
    assert sorted(p.name for p in target.iterdir()) == ["recordings"]  # no temporary left
    assert sorted(p.name for p in (target / "recordings").iterdir()) == sorted(tiny)
    assert not list(tmp_path.rglob("evil.wav"))
    # A second load reads the files without a server.
    monkeypatch.setattr(fsdd, "ARCHIVE_URLS", ())
    assert len(jdl.data.load_fsdd(data_dir=target)["train"]["y"]) == 20


def test_a_corrupt_download_leaves_nothing_behind(tmp_path, monkeypatch, tiny):
    served = tmp_path / "served"
    served.mkdir()
    corrupt = {**tiny, "4_alice_3.wav": tiny["4_alice_3.wav"][:-2] + b"\x00\x01"}
    (served / "release.tar.gz").write_bytes(_archive(corrupt))
    target = tmp_path / "fsdd"
    with serve_directory(served) as base:
        monkeypatch.setattr(fsdd, "ARCHIVE_URLS", (base + "release.tar.gz",))
        with pytest.raises(fsdd.ChecksumMismatchError, match="sha256"):
            jdl.data.load_fsdd(data_dir=target)
    assert list(target.iterdir()) == []


def test_offline_says_in_one_line_where_to_put_the_files(tmp_path, monkeypatch):
    with serve_directory(tmp_path) as base:
        closed = base  # the server stops when the block ends: nothing listens any more
    monkeypatch.setattr(fsdd, "ARCHIVE_URLS", (closed + "release.tar.gz",))
    for download in (True, False):
        with pytest.raises(fsdd.DatasetUnavailableError) as info:
            jdl.data.load_fsdd(data_dir=tmp_path / "nowhere", download=download)
        message = str(info.value)
        assert "\n" not in message and str(tmp_path / "nowhere" / "recordings") in message
        assert "JDL_DATA_DIR" in message and isinstance(info.value, jdl.UserError)
        assert ("download failed" if download else "download disabled") in message
