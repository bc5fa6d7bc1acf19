"""python -m jdl.predict on .npy, .npz and PNG files of a real workdir, its one-line errors,
and `jdl.predict(...)` still being the function after `import jdl.predict`."""

import os
import subprocess
import sys
import types

import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

import jdl
import jdl.predict  # makes `jdl.predict` the module: it must still be callable
from jdl.deploy import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A trained small CNN's workdir whose records say its model and its input."""
    directory = tmp_path_factory.mktemp("cnn") / "run"
    model = jdl.models.MODELS["mnist_cnn"](conv_channels=(4,), dense_sizes=(8,), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    data = {"x": rng.random((64, 28, 28, 1), dtype=np.float32), "y": np.arange(64) % 10}
    jdl.fit(
        jdl.TrainState.create(model, optax.adam(1e-2), seed=0),
        train_step=jdl.make_train_step(jdl.classification_loss()),
        train_data=jdl.InMemoryData(data, batch_size=16, seed=0),
        num_steps=3,
        workdir=str(directory),
        progress=False,
        log_every=0,
        run_config={
            "model": "mnist_cnn",
            "model_kwargs": {"conv_channels": [4], "dense_sizes": [8]},
        },
    )
    # The input record the experiments write (summary.json), which images are read by.
    fresh = jdl.models.MODELS["mnist_cnn"](conv_channels=(4,), dense_sizes=(8,), rngs=nnx.Rngs(0))
    jdl.summary(fresh, np.zeros((1, 28, 28, 1), np.float32)).write(str(directory))
    return directory


def _predict_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jdl.predict", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_predict_is_still_the_function_after_importing_the_module():
    assert isinstance(jdl.predict, types.ModuleType) and callable(jdl.predict)
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    x = np.ones((5, 3), np.float32)
    out = jdl.predict(model, x, batch_size=2)
    np.testing.assert_array_equal(out, jdl.inference.predict(model, x, batch_size=2))


def _predict_main(*args):
    """`python -m jdl.predict`'s entry point in this process: the error line it would print."""
    from jdl.predict.__main__ import main

    try:
        main([str(arg) for arg in args])
    except SystemExit as stop:
        return str(stop.code)
    return None


def test_npy_in_a_subprocess_with_progress_and_npz_and_png_inputs(workdir, tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    x = pixels[..., None].astype(np.float32) / 255.0  # what the PNGs hold
    np.savez(tmp_path / "x.npz", x=x, y=np.zeros(3))
    pngs = []
    for i, image in enumerate(pixels):
        pngs.append(tmp_path / f"digit{i}.png")
        Image.fromarray(image).save(pngs[-1])
    expected = jdl.predict(load_model(workdir), x)
    for name, inputs in {"npz": [tmp_path / "x.npz"], "png": pngs}.items():
        output = tmp_path / f"out_{name}.npy"
        assert _predict_main("--workdir", workdir, "--input", *inputs, "--output", output) is None
        np.testing.assert_allclose(np.load(output), expected, rtol=0, atol=1e-6)
    # 600 examples in batches of 8 run in several parts, so the progress bar is drawn.
    many = rng.random((600, 28, 28, 1), dtype=np.float32)
    np.save(tmp_path / "many.npy", many)
    output = tmp_path / "out_many.npy"
    done = _predict_cli(
        "--workdir", workdir, "--input", tmp_path / "many.npy", "--output", output,
        "--batch-size", 8,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "600/600" in done.stderr  # tqdm's final count
    np.testing.assert_array_equal(np.load(output), jdl.predict(load_model(workdir), many))


def test_missing_or_odd_files_are_one_line_errors(workdir, tmp_path):
    done = _predict_cli(
        "--workdir", workdir, "--input", tmp_path / "absent.npy", "--output", tmp_path / "o.npy"
    )  # fmt: skip
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"error: no input file {tmp_path / 'absent.npy'}; give .npy, .npz or image files"
    )
    (tmp_path / "notes.txt").write_text("not an image")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 28, 28, 1)), b=np.zeros(2))
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "small.png")
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28, 1), np.float32))
    np.save(tmp_path / "flat.npy", np.zeros((2, 784), np.float32))
    out = ["--output", tmp_path / "o.npy"]
    cases = {
        "neither .npy/.npz nor a readable image": ["--input", tmp_path / "notes.txt", *out],
        "holds arrays ['a', 'b']; name the input with --key": [
            "--input", tmp_path / "two.npz", *out,
        ],
        "is 12x10 pixels but the model takes (28, 28, 1)": [
            "--input", tmp_path / "small.png", *out,
        ],
        "examples have shape (784,) but the model": ["--input", tmp_path / "flat.npy", *out],
        "the output is a .npy file": ["--input", tmp_path / "x.npy", "--output", "o.csv"],
        "no workdir": ["--input", tmp_path / "x.npy", *out],
    }  # fmt: skip
    for message, args in cases.items():
        where = tmp_path / "nowhere" if message == "no workdir" else workdir
        line = _predict_main("--workdir", where, *args)
        assert line is not None and line.startswith("error: ") and message in line, line
        assert "\n" not in line
    assert not (tmp_path / "o.npy").exists()
