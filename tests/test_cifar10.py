"""Tests for the CIFAR-10 loader on small files written in the standard format.

The batches are pickled dicts with bytes keys at protocol 2, as the official files;
archives are tar.gz files with the official layout, served from a local HTTP server
when a download is tested. Nothing here reaches the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import socket
import tarfile
from pathlib import Path

import jax
import numpy as np
import pytest

from jdl import data
from jdl.data import cifar10

N_TRAIN_PER_BATCH = 3
N_TEST = 4
OFFICIAL_MIRRORS = cifar10.MIRRORS  # Read before any test replaces them.


def _unreachable_url() -> str:
    """A local URL nothing listens on: connecting fails at once, never leaving the host."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may reach the real server or the user's cache."""
    monkeypatch.setattr(cifar10, "MIRRORS", (_unreachable_url(),))
    monkeypatch.setattr(cifar10, "DOWNLOAD_TIMEOUT_S", 5.0)
    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "jdl_data_root"))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pickle_batch(batch: dict, *, protocol: int = 2) -> bytes:
    return pickle.dumps(batch, protocol=protocol)


def write_fake_cifar(
    directory: Path, n_per_batch: int = N_TRAIN_PER_BATCH, n_test: int = N_TEST, seed: int = 0
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Writes the seven files of `cifar-10-batches-py` into `directory`, as the originals.

    Returns:
      batch name -> (uint8 rows (N, 3072), labels) as written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in (*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH):
        n = n_test if name == cifar10.TEST_BATCH else n_per_batch
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (directory / name).write_bytes(_pickle_batch(batch))
        written[name] = (rows, labels)
    meta = {
        b"num_cases_per_batch": n_per_batch,
        b"label_names": [name.encode() for name in cifar10.CLASS_NAMES],
        b"num_vis": 3072,
    }
    (directory / cifar10.META).write_bytes(_pickle_batch(meta))
    return written


def write_archive(batches: Path, archive: Path, extra: dict[str, bytes] | None = None) -> str:
    """Packs `batches` as `cifar-10-batches-py/*` into a tar.gz; returns its MD5."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(batches.iterdir()):
            tar.add(path, arcname=f"{cifar10.BATCHES_DIR}/{path.name}")
        for name, payload in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return _md5(archive)


@pytest.fixture
def fake_root(tmp_path) -> tuple[Path, dict]:
    """A data directory holding extracted `cifar-10-batches-py/` files."""
    root = tmp_path / "root"
    return root, write_fake_cifar(root / cifar10.BATCHES_DIR)


@pytest.fixture
def fake_archive(tmp_path, monkeypatch) -> tuple[Path, dict]:
    """An official-layout archive (not extracted) whose MD5 the loader accepts.

    Returns (directory holding only the archive, batches as written).
    """
    written = write_fake_cifar(tmp_path / "source")
    root = tmp_path / "archived"
    md5 = write_archive(tmp_path / "source", root / cifar10.ARCHIVE)
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5)
    return root, written


def _expected_images(rows: np.ndarray) -> np.ndarray:
    """Hand decoding of the documented layout: value c * 1024 + i * 32 + j is pixel (i, j, c)."""
    images = np.empty((len(rows), 32, 32, 3), np.float32)
    for c in range(3):
        for i in range(32):
            images[:, i, :, c] = rows[:, c * 1024 + i * 32 : c * 1024 + (i + 1) * 32]
    return images / 255.0


def _leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


# ---------------------------------------------------------------------------- reading


def test_load_from_extracted_batches_matches_hand_decoding(fake_root):
    root, written = fake_root
    ds = data.load_cifar10(data_dir=root, download=False)
    train, test = ds["train"], ds["test"]
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert train["x"].shape == (5 * N_TRAIN_PER_BATCH, 32, 32, 3)
    assert train["x"].dtype == np.float32 and train["y"].dtype == np.int32
    train_rows = np.concatenate([written[name][0] for name in cifar10.TRAIN_BATCHES])
    train_labels = sum((written[name][1] for name in cifar10.TRAIN_BATCHES), [])
    np.testing.assert_array_equal(train["x"], _expected_images(train_rows))
    np.testing.assert_array_equal(train["y"], train_labels)
    test_rows, test_labels = written[cifar10.TEST_BATCH]
    np.testing.assert_array_equal(test["x"], _expected_images(test_rows))
    np.testing.assert_array_equal(test["y"], test_labels)
    assert 0.0 <= train["x"].min() and train["x"].max() <= 1.0


def test_normalize_uses_published_channel_statistics(fake_root):
    root, _ = fake_root
    plain = data.load_cifar10(data_dir=root, download=False)["test"]["x"]
    normed = data.load_cifar10(data_dir=root, download=False, normalize=True)["test"]["x"]
    for c, (mean, std) in enumerate(zip(cifar10.MEAN, cifar10.STD, strict=True)):
        np.testing.assert_allclose(normed[..., c], (plain[..., c] - mean) / std, rtol=1e-6)


def test_jdl_data_dir_is_discovered(fake_root, monkeypatch):
    root, _ = fake_root
    (root.parent / "env").mkdir()
    (root.parent / "env" / "cifar10").symlink_to(root)
    monkeypatch.setenv("JDL_DATA_DIR", str(root.parent / "env"))
    assert cifar10.default_data_dir() == root.parent / "env" / "cifar10"
    assert data.DATASETS["cifar10"](download=False).num_examples("test") == N_TEST


def test_files_written_by_numpy_1_and_python_2_load(fake_root):
    """The originals name numpy.core.multiarray, which NumPy 2 renamed numpy._core."""
    root, written = fake_root
    path = root / cifar10.BATCHES_DIR / cifar10.TEST_BATCH
    payload = path.read_bytes()
    assert b"numpy._core.multiarray" in payload
    path.write_bytes(payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    images, labels = cifar10.read_batch(path)
    np.testing.assert_array_equal(images / np.float32(255), _expected_images(written[path.name][0]))
    np.testing.assert_array_equal(labels, written[path.name][1])


def test_str_keys_and_protocol_4_also_load(tmp_path):
    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": rows, "labels": [3, 9]}, protocol=4))
    images, labels = cifar10.read_batch(path)
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [3, 9]
    assert images[1, 0, 1, 2] == rows[1, 2 * 1024 + 1]


# ---------------------------------------------------------------------------- bad files


def _rewrite_batch(root: Path, name: str, **changes) -> Path:
    path = root / cifar10.BATCHES_DIR / name
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch.update({key.encode(): value for key, value in changes.items()})
    path.write_bytes(_pickle_batch(batch))
    return path


def test_truncated_pickle_names_the_file(fake_root):
    root, _ = fake_root
    path = root / cifar10.BATCHES_DIR / "data_batch_3"
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(
        data.CifarFormatError, match=r"data_batch_3: truncated or corrupt pickle.*delete"
    ):
        data.load_cifar10(data_dir=root, download=False)


def test_garbage_file_is_a_format_error(fake_root):
    root, _ = fake_root
    (root / cifar10.BATCHES_DIR / cifar10.TEST_BATCH).write_bytes(b"<html>not found</html>")
    with pytest.raises(data.CifarFormatError, match=r"test_batch: truncated or corrupt pickle"):
        data.load_cifar10(data_dir=root, download=False)


def test_label_count_mismatch(fake_root):
    root, _ = fake_root
    _rewrite_batch(root, "data_batch_2", labels=[1, 2])
    with pytest.raises(
        data.CifarFormatError, match=rf"data_batch_2 holds 2 labels but {N_TRAIN_PER_BATCH} images"
    ):
        data.load_cifar10(data_dir=root, download=False)


@pytest.mark.parametrize(
    "bad_data, message",
    [
        (
            np.zeros((3, 3000), np.uint8),
            r"rows of 3072 = 3 \* 32 \* 32 values, got shape \(3, 3000\)",
        ),
        (np.zeros((3, 3, 32, 32), np.uint8), r"uint8 data of shape \(N, 3072\), got uint8 array"),
        (np.zeros((3, 3072), np.float32), r"uint8 data of shape \(N, 3072\), got float32 array"),
        ([[0] * 3072] * 3, r"uint8 data of shape \(N, 3072\), got list of length 3"),
    ],
)
def test_wrong_data_shape_or_dtype(fake_root, bad_data, message):
    root, _ = fake_root
    _rewrite_batch(root, cifar10.TEST_BATCH, data=bad_data, labels=[0, 1, 2])
    with pytest.raises(data.CifarFormatError, match=rf"test_batch: expected {message}"):
        data.load_cifar10(data_dir=root, download=False)


def test_label_out_of_range(fake_root):
    root, _ = fake_root
    _rewrite_batch(root, "data_batch_1", labels=[0, 10, 2])
    with pytest.raises(
        data.CifarFormatError, match=r"labels must lie in \[0, 10\), found \[0, 10\]"
    ):
        data.load_cifar10(data_dir=root, download=False)


def test_missing_key_is_named(fake_root):
    root, _ = fake_root
    path = root / cifar10.BATCHES_DIR / "data_batch_5"
    path.write_bytes(_pickle_batch({b"images": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(data.CifarFormatError, match=r"data_batch_5: expected a pickled dict with"):
        data.load_cifar10(data_dir=root, download=False)


def test_meta_with_wrong_class_count(fake_root):
    root, _ = fake_root
    path = root / cifar10.BATCHES_DIR / cifar10.META
    path.write_bytes(_pickle_batch({b"label_names": [b"cat", b"dog"]}))
    with pytest.raises(data.CifarFormatError, match=r"batches.meta: expected 10 label names"):
        data.load_cifar10(data_dir=root, download=False)


class _RunsCode:
    """Unpickling this object would call `Path.touch` on the given file."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_pickle_cannot_run_code(fake_root, tmp_path):
    root, _ = fake_root
    target = tmp_path / "pwned"
    path = root / cifar10.BATCHES_DIR / cifar10.TEST_BATCH
    path.write_bytes(_pickle_batch({b"data": _RunsCode(target), b"labels": []}))
    with pytest.raises(data.CifarFormatError, match=r"refusing to load global"):
        data.load_cifar10(data_dir=root, download=False)
    assert not target.exists()


# ---------------------------------------------------------------------------- the archive


def test_local_archive_is_verified_and_extracted(fake_archive):
    root, written = fake_archive
    ds = data.load_cifar10(data_dir=root, download=False)
    np.testing.assert_array_equal(ds["test"]["y"], written[cifar10.TEST_BATCH][1])
    assert _leftovers(root) == sorted([cifar10.ARCHIVE, cifar10.BATCHES_DIR])
    assert _leftovers(root / cifar10.BATCHES_DIR) == sorted(cifar10.FILES)
    # Later loads read the extracted files, even with the archive gone.
    (root / cifar10.ARCHIVE).unlink()
    again = data.load_cifar10(data_dir=root, download=False)
    np.testing.assert_array_equal(again["train"]["x"], ds["train"]["x"])


def test_only_missing_batches_are_extracted(fake_archive):
    root, _ = fake_archive
    data.load_cifar10(data_dir=root, download=False)
    kept = root / cifar10.BATCHES_DIR / "data_batch_1"
    before = kept.stat().st_mtime_ns
    (root / cifar10.BATCHES_DIR / "test_batch").unlink()
    data.load_cifar10(data_dir=root, download=False)
    assert kept.stat().st_mtime_ns == before
    assert (root / cifar10.BATCHES_DIR / "test_batch").is_file()


def test_local_archive_with_wrong_md5(fake_archive, monkeypatch):
    root, _ = fake_archive
    actual = _md5(root / cifar10.ARCHIVE)
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(
        data.ChecksumMismatchError,
        match=rf"cifar-10-python\.tar\.gz: md5 checksum mismatch: expected 0{{32}}, got {actual}",
    ):
        data.load_cifar10(data_dir=root, download=False)
    assert not (root / cifar10.BATCHES_DIR).exists()


def test_truncated_archive_is_a_format_error(fake_archive, monkeypatch):
    root, _ = fake_archive
    path = root / cifar10.ARCHIVE
    path.write_bytes(path.read_bytes()[:-100])
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", _md5(path))
    with pytest.raises(data.CifarFormatError, match=r"tar\.gz: truncated or corrupt archive"):
        data.load_cifar10(data_dir=root, download=False)
    assert _leftovers(root / cifar10.BATCHES_DIR) == []  # No partial file under a real name.


def test_archive_missing_a_batch(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_fake_cifar(source)
    (source / "data_batch_4").unlink()
    monkeypatch.setattr(
        cifar10, "ARCHIVE_MD5", write_archive(source, tmp_path / "root" / cifar10.ARCHIVE)
    )
    with pytest.raises(data.CifarFormatError, match=r"no regular file .*data_batch_4"):
        data.load_cifar10(data_dir=tmp_path / "root", download=False)


def test_archive_members_outside_the_batches_are_never_written(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_fake_cifar(source)
    root = tmp_path / "deep" / "root"
    extra = {"../escaped": b"x", "/tmp/absolute_escape_cifar_test": b"x", "readme.html": b"x"}
    monkeypatch.setattr(
        cifar10, "ARCHIVE_MD5", write_archive(source, root / cifar10.ARCHIVE, extra)
    )
    data.load_cifar10(data_dir=root, download=False)
    assert not (root.parent / "escaped").exists()
    assert not Path("/tmp/absolute_escape_cifar_test").exists()
    assert _leftovers(root) == sorted([cifar10.ARCHIVE, cifar10.BATCHES_DIR])


# ---------------------------------------------------------------------------- downloading


@pytest.fixture
def server(fake_archive, tmp_path, http_server) -> tuple[str, str]:
    """Serves the fake archive under good/ and a corrupted copy under bad/; returns both URLs."""
    root, _ = fake_archive
    payload = (root / cifar10.ARCHIVE).read_bytes()
    for kind, body in (("good", payload), ("bad", payload[:-1] + bytes([payload[-1] ^ 0xFF]))):
        (tmp_path / "served" / kind).mkdir(parents=True)
        (tmp_path / "served" / kind / cifar10.ARCHIVE).write_bytes(body)
    base = http_server(tmp_path / "served")
    return base + "good/", base + "bad/"


def test_download_skips_unreachable_mirror_and_extracts(server, tmp_path, monkeypatch):
    good, _ = server
    monkeypatch.setattr(cifar10, "MIRRORS", (_unreachable_url(), good))
    target = tmp_path / "downloaded"
    ds = data.load_cifar10(data_dir=target)
    assert ds.num_examples("train") == 5 * N_TRAIN_PER_BATCH
    assert _md5(target / cifar10.ARCHIVE) == cifar10.ARCHIVE_MD5
    assert _leftovers(target) == sorted([cifar10.ARCHIVE, cifar10.BATCHES_DIR])


def test_download_of_corrupted_archive_raises_and_keeps_nothing(server, tmp_path, monkeypatch):
    _, bad = server
    monkeypatch.setattr(cifar10, "MIRRORS", (bad,))
    target = tmp_path / "downloaded"
    with pytest.raises(
        data.ChecksumMismatchError,
        match=rf"cifar-10-python\.tar\.gz downloaded from {bad}.*md5 checksum mismatch",
    ):
        data.load_cifar10(data_dir=target)
    assert _leftovers(target) == []


def test_missing_offline_says_where_to_put_the_files(tmp_path):
    target = tmp_path / "empty"
    with pytest.raises(data.DatasetUnavailableError, match=r"download disabled") as info:
        data.load_cifar10(data_dir=target, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"Put cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) in {target}" in (
        message
    )
    assert "JDL_DATA_DIR" in message and "data_batch_1" in message
    assert isinstance(info.value, FileNotFoundError)


def test_unreachable_server_is_a_download_failure(tmp_path):
    with pytest.raises(data.DatasetUnavailableError, match=r"download failed.*Connection refused"):
        data.load_cifar10(data_dir=tmp_path / "empty")


def test_published_source():
    assert cifar10.ARCHIVE_MD5 == "c58f30108f718f92721af3b95e74349a"
    assert OFFICIAL_MIRRORS[0] + cifar10.ARCHIVE == (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    )


# ---------------------------------------------------------------------------- the experiment


def test_cifar10_resnet_experiment_two_step_smoke_run(tmp_path, monkeypatch, capsys):
    from experiments import cifar10_resnet

    root = tmp_path / "data_root"
    write_fake_cifar(root / "cifar10" / cifar10.BATCHES_DIR, n_per_batch=8, n_test=6)
    monkeypatch.setenv("JDL_DATA_DIR", str(root))
    assert "python -m experiments.cifar10_resnet" in cifar10_resnet.__doc__
    workdir = tmp_path / "run"
    argv = [
        "--config.duration=2",
        "--config.batch_size=8",
        "--config.progress=false",
        "--config.compilation_cache=false",
        "--config.steps_per_dispatch=1",
        "--config.download=false",
        "--workdir",
        str(workdir),
    ]
    final = cifar10_resnet.main(argv)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == "FINAL " + json.dumps(final)
    assert final["steps"] == 2 and 0.0 <= final["test_accuracy"] <= 1.0
    for produced in ("config.json", "metrics.jsonl", "final.json", "checkpoints"):
        assert (workdir / produced).exists(), produced


def test_cifar10_resnet_augmentation_crops_and_flips():
    from experiments import cifar10_resnet

    config = cifar10_resnet.get_config()
    images = jax.random.uniform(jax.random.key(0), (64, 8, 8, 3))  # small: a fast check
    batch = {"x": images, "y": np.zeros(64, np.int32)}
    out = np.asarray(cifar10_resnet.make_augment(config)(jax.random.key(1), batch)["x"])
    assert out.shape == images.shape
    # Each output is a (possibly mirrored) 8x8 window of the zero-padded image.
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
    flipped = 0
    for n in range(64):
        windows = [padded[n, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
        plain = any(np.array_equal(out[n], w) for w in windows)
        mirrored = any(np.array_equal(out[n], w[:, ::-1]) for w in windows)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 16 <= flipped <= 48  # about half are mirrored
    config.crop_padding, config.flip = 0, False
    assert cifar10_resnet.make_augment(config) is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model=resnet18", r"config.model='resnet18' must be one of"),
        ("--config.crop_padding=-1", r"config.crop_padding=-1 must be >= 0"),
        ("--config.augment_max_shift=2", r"augment_max_shift is not used"),
    ],
)
def test_cifar10_resnet_rejects_bad_config(override, message, tmp_path):
    from experiments import cifar10_resnet

    with pytest.raises(SystemExit, match=message):
        cifar10_resnet.main([override, "--workdir", str(tmp_path)])
    assert not (tmp_path / "config.json").exists()


def test_cifar10_resnet_without_data_is_one_clear_line(tmp_path, monkeypatch):
    from experiments import cifar10_resnet

    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "nothing"))
    with pytest.raises(SystemExit, match=r"^error: cifar10 files missing .*download disabled"):
        cifar10_resnet.main(
            ["--config.download=false", "--config.progress=false", "--workdir", str(tmp_path)]
        )
