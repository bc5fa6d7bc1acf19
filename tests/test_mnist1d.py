"""MNIST-1D: the loader against the mnist1d package, its cache, the 1D augmentation and
a two-step smoke run of every MNIST-1D experiment."""

from __future__ import annotations

import importlib
import json
import os
import random
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdl.data import load_mnist1d
from jdl.data import mnist1d as mnist1d_lib

EXPERIMENTS = ["mnist1d_logreg", "mnist1d_mlp", "mnist1d_cnn", "mnist1d_gru", "mnist1d_resnet"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mnist1d-cache")


@pytest.fixture(scope="module")
def dataset(cache_dir):
    """Generated once (a few seconds) and cached for the other tests of this module."""
    return load_mnist1d(data_dir=cache_dir)


def test_splits_have_the_documented_shapes_dtypes_and_sizes(dataset):
    assert dataset.name == "mnist1d" and dataset.num_classes == 10
    assert set(dataset.splits) == {"train", "test"}
    for split, size in (("train", 4000), ("test", 1000)):
        x, y = dataset[split]["x"], dataset[split]["y"]
        assert x.shape == (size, 40, 1) and x.dtype == np.float32
        assert y.shape == (size,) and y.dtype == np.int32
        assert y.min() == 0 and y.max() == 9
        assert np.isfinite(x).all()
    # Every class is present in the usual proportions (500 examples per class overall).
    counts = np.bincount(np.concatenate([dataset["train"]["y"], dataset["test"]["y"]]))
    np.testing.assert_array_equal(counts, np.full(10, 500))
    # The package standardises the whole dataset.
    everything = np.concatenate([dataset["train"]["x"], dataset["test"]["x"]])
    assert abs(everything.mean()) < 1e-4 and abs(everything.std() - 1.0) < 1e-4


def test_matches_the_package_with_default_arguments_and_keeps_global_rng(dataset):
    from mnist1d.data import get_dataset_args, make_dataset

    random.seed(7)
    np.random.seed(7)
    expected_python, expected_numpy = random.random(), np.random.rand()
    random.seed(7)
    np.random.seed(7)
    fresh = load_mnist1d(cache=False)  # A second, independent generation.
    assert (random.random(), np.random.rand()) == (expected_python, expected_numpy)

    reference = make_dataset(get_dataset_args())
    for split, (x_key, y_key) in {"train": ("x", "y"), "test": ("x_test", "y_test")}.items():
        np.testing.assert_array_equal(
            fresh[split]["x"][..., 0], reference[x_key].astype(np.float32)
        )
        np.testing.assert_array_equal(fresh[split]["y"], reference[y_key])
        for key in ("x", "y"):  # Deterministic: the cached first generation is identical.
            np.testing.assert_array_equal(fresh[split][key], dataset[split][key])


def test_second_load_reads_the_cache_without_generating(dataset, cache_dir, monkeypatch):
    (cached,) = cache_dir.glob("mnist1d_*.npz")

    def must_not_generate(args):
        raise AssertionError("generated although a cache file exists")

    monkeypatch.setattr(mnist1d_lib, "generate_splits", must_not_generate)
    again = load_mnist1d(data_dir=cache_dir)
    for split in ("train", "test"):
        for key in ("x", "y"):
            np.testing.assert_array_equal(again[split][key], dataset[split][key])
    assert cached.is_file()


def test_unreadable_cache_is_regenerated_and_rewritten(dataset, tmp_path, monkeypatch):
    calls = []

    def generate(args):
        calls.append(args)
        return dataset.splits

    monkeypatch.setattr(mnist1d_lib, "generate_splits", generate)
    load_mnist1d(data_dir=tmp_path)  # Writes the cache file.
    (cached,) = tmp_path.glob("mnist1d_*.npz")
    cached.write_bytes(b"not a zip file")
    again = load_mnist1d(data_dir=tmp_path)
    assert len(calls) == 2 and calls[0]["seed"] == 42 and calls[0]["num_samples"] == 5000
    np.testing.assert_array_equal(again["test"]["x"], dataset["test"]["x"])
    assert load_mnist1d(data_dir=tmp_path)["train"]["x"].shape == (4000, 40, 1)
    assert len(calls) == 2  # The rewritten file is read back.


def test_random_roll_shifts_each_signal_circularly_in_train_mode_only():
    from experiments.mnist1d_common import RandomRoll

    x = jnp.arange(6 * 40, dtype=jnp.float32).reshape(6, 40, 1)
    layer = RandomRoll(3, rngs=nnx.Rngs(params=0, dropout=1))
    rolled = np.asarray(layer(x))
    shifts = []
    for row, out in zip(np.asarray(x), rolled, strict=True):
        matches = [s for s in range(-3, 4) if np.array_equal(np.roll(row, s, axis=0), out)]
        assert len(matches) == 1, "each output must be its input rolled by at most 3"
        shifts.append(matches[0])
    assert len(set(shifts)) > 1  # Examples get their own shifts.
    layer.eval()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_two_step_smoke_run(name, dataset, cache_dir, tmp_path, capsys):
    module = importlib.import_module(f"experiments.{name}")
    assert "python -m experiments." + name in module.__doc__  # the docstring is its README
    argv = [
        "--config.duration=2",
        "--config.progress=false",
        "--config.compilation_cache=false",
        "--config.steps_per_dispatch=1",
        f"--config.data_dir={cache_dir}",
        "--workdir",
        str(tmp_path / name),
    ]
    final = module.main(argv)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("FINAL ")
    assert json.loads(last_line[len("FINAL ") :]) == final
    assert final["steps"] == 2 and 0.0 <= final["test_accuracy"] <= 1.0
    assert os.path.exists(tmp_path / name / "final.json")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.augment_max_shift=2", "config.augment_max_shift=2 translates 2D images"),
        ("--config.roll_max_shift=40", "config.roll_max_shift=40 must be in [0, 40)"),
    ],
)
def test_settings_for_images_are_rejected_before_compiling(override, message, tmp_path):
    module = importlib.import_module("experiments.mnist1d_cnn")
    with pytest.raises(SystemExit, match=re.escape(message)):
        module.main([override, "--workdir", str(tmp_path)])
