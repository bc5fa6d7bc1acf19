"""jdl.export: StableHLO and ONNX files that run without jdl, at any batch size, and
match the live model; the command line; int8 ONNX."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
import jdl.export
from jdl.deploy import ExportError, NoCheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT_FILE = os.path.join(REPO, "jdl", "export", "__init__.py")


def _cnn():
    return jdl.models.MODELS["mnist_cnn"](conv_channels=(4, 8), dense_sizes=(16,), rngs=nnx.Rngs(0))


def _images(n, seed=0):
    return np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """A workdir of a few real training steps of a small CNN named in its run_config."""
    workdir = tmp_path_factory.mktemp("cnn") / "run"
    data = {"x": _images(64), "y": np.arange(64, dtype=np.int32) % 10}
    result = jdl.fit(
        jdl.TrainState.create(_cnn(), optax.adam(1e-2), seed=0),
        train_step=jdl.make_train_step(jdl.classification_loss()),
        train_data=jdl.InMemoryData(data, batch_size=16, seed=0),
        num_steps=4,
        workdir=str(workdir),
        progress=False,
        log_every=0,
        run_config={
            "model": "mnist_cnn",
            "model_kwargs": {"conv_channels": [4, 8], "dense_sizes": [16]},
        },
    )
    return workdir, result


def _run_python(code, timeout=600):
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_stablehlo_runs_in_a_fresh_process_without_jdl(cnn_run, tmp_path):
    workdir, result = cnn_run
    path = jdl.export(workdir, tmp_path / "cnn.shlo", input_shape=(28, 28, 1))
    for batch in (1, 5):
        np.save(tmp_path / f"x{batch}.npy", _images(batch, seed=batch))
    # The serving process loads jdl/export/__init__.py as a file of its own: neither the
    # jdl package nor its models are imported.
    _run_python(f"""
        import importlib.util, sys
        import numpy as np
        spec = importlib.util.spec_from_file_location("serving", {EXPORT_FILE!r})
        serving = importlib.util.module_from_spec(spec)
        sys.modules["serving"] = serving
        spec.loader.exec_module(serving)
        run = serving.load({str(path)!r})
        for batch in (1, 5):
            x = np.load(f"{tmp_path}/x{{batch}}.npy")
            np.save(f"{tmp_path}/y{{batch}}.npy", run(x))
        assert "jdl" not in sys.modules and "jdl.models" not in sys.modules, sorted(sys.modules)
    """)
    model = result.model()
    for batch in (1, 5):
        live = np.asarray(model(_images(batch, seed=batch)))
        served = np.load(tmp_path / f"y{batch}.npy")
        assert served.shape == live.shape == (batch, 10)
        np.testing.assert_allclose(served, live, rtol=0, atol=1e-6)


def test_stablehlo_is_one_artifact_for_cpu_cuda_and_tpu_with_a_symbolic_batch(tmp_path):
    path = jdl.export(_cnn(), tmp_path / "cnn.shlo", input_shape=(28, 28, 1))
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    assert exported.platforms == ("cpu", "cuda", "tpu")
    (spec,) = exported.in_avals
    assert str(spec.shape[0]) == "batch" and spec.shape[1:] == (28, 28, 1)
    # jdl.export.load in this process, at a batch size not seen before.
    x = _images(3, seed=9)
    np.testing.assert_allclose(jdl.export.load(path)(x), _eval(_cnn())(x), rtol=0, atol=1e-6)


def _eval(model):
    model.eval()
    return lambda x: np.asarray(model(x))


ZOO = {
    "mlp": (lambda: jdl.models.MODELS["mnist_mlp"](rngs=nnx.Rngs(0)), (28, 28, 1), "float32"),
    "cnn": (_cnn, (28, 28, 1), "float32"),
    "resnet20": (lambda: jdl.models.resnet20(10, rngs=nnx.Rngs(0)), (32, 32, 3), "float32"),
    "vit": (lambda: jdl.models.vit_tiny(10, rngs=nnx.Rngs(0)), (28, 28, 1), "float32"),
    "gpt": (lambda: jdl.models.gpt_tiny(rngs=nnx.Rngs(0)), (32,), "int32"),
}


def _zoo_inputs(shape, dtype, batch, seed):
    rng = np.random.default_rng(seed)
    if dtype == "int32":
        return rng.integers(0, 64, (batch, *shape)).astype(np.int32)
    return rng.normal(size=(batch, *shape)).astype(np.float32)


def _check_onnx_parity(name, tmp_path):
    build, shape, dtype = ZOO[name]
    path = jdl.export(
        build(), tmp_path / f"{name}.onnx", format="onnx", input_shape=shape, input_dtype=dtype
    )
    run = jdl.export.load(path)
    live = _eval(build())
    for batch in (1, 4):  # one file, two batch sizes: the batch axis is dynamic
        x = _zoo_inputs(shape, dtype, batch, seed=batch)
        out = run(x)
        assert out.shape[0] == batch
        np.testing.assert_allclose(out, live(x), rtol=0, atol=1e-4)


# ONNX tests are slow: importing jax2onnx loads all its plugins (about 30 s on 2 cores).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_onnx_matches_the_live_model_at_two_batch_sizes(name, tmp_path):
    _check_onnx_parity(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "vit", "gpt"])
def test_onnx_matches_the_live_zoo_model_at_two_batch_sizes(name, tmp_path):
    _check_onnx_parity(name, tmp_path)


@pytest.mark.slow
def test_onnx_int8_is_smaller_and_agrees_with_the_float_model(tmp_path):
    model = jdl.models.MODELS["mnist_mlp"](rngs=nnx.Rngs(0))
    float_path = jdl.export(model, tmp_path / "f.onnx", format="onnx", input_shape=(784,))
    int8_path = jdl.export(model, tmp_path / "q.onnx", format="onnx-int8", input_shape=(784,))
    assert os.path.getsize(int8_path) < 0.4 * os.path.getsize(float_path)
    x = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    float_out, int8_out = jdl.export.load(float_path)(x), jdl.export.load(int8_path)(x)
    assert not np.array_equal(float_out, int8_out)  # the weights really are quantized
    np.testing.assert_allclose(int8_out, float_out, atol=0.05 * np.abs(float_out).max())


def test_command_line_writes_an_export_and_says_what_is_wrong_in_one_line(cnn_run, tmp_path):
    workdir, result = cnn_run
    output = tmp_path / "out" / "cnn.shlo"
    base = [sys.executable, "-m", "jdl.export", "--workdir", str(workdir), "--format"]
    done = subprocess.run(
        base + ["stablehlo", "--output", str(output), "--input-shape", "28,28,1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote" in done.stdout and "RuntimeWarning" not in done.stderr
    x = _images(2)
    np.testing.assert_allclose(jdl.export.load(output)(x), result.model()(x), atol=1e-6)
    errors = {"the input shape of one example is unknown": ["stablehlo", "--output", str(output)]}
    for message, args in errors.items():
        done = subprocess.run(base + args, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [done.stderr.strip()]
        assert done.stderr.startswith("error: ") and message in done.stderr


def test_api_errors(tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        jdl.export(_cnn(), tmp_path / "m", format="tflite", input_shape=(28, 28, 1))
    with pytest.raises(ExportError, match="input shape of one example is unknown"):
        jdl.export(_cnn(), tmp_path / "m")
    with pytest.raises(NoCheckpointError, match="no workdir"):
        jdl.export(tmp_path / "nothing", tmp_path / "m", input_shape=(28, 28, 1))
    with pytest.raises(FileNotFoundError, match="no exported model"):
        jdl.export.load(tmp_path / "missing.shlo")
    (tmp_path / "junk.shlo").write_bytes(b"not an export")
    with pytest.raises(ValueError, match="not a serialized jax.export model"):
        jdl.export.load(tmp_path / "junk.shlo")


def test_inference_benchmark_quick_run_reports_every_runtime_and_ratios(capsys):
    from benchmarks import inference

    results = inference.main(["--quick", "--formats=stablehlo"])
    output = capsys.readouterr().out
    for batch in inference.BATCH_SIZES:
        assert set(results["latency_ms"][batch]) == {"jdl jit", "stablehlo", "torch eager"}
        assert f"batch {batch}: median of 3 calls" in output
    assert output.count("x jdl jit") == 3 * len(inference.BATCH_SIZES)
    # The hand-written torch twin computes the same network with the copied weights.
    gaps = [float(line.split("=")[-1]) for line in output.splitlines() if "max |output" in line]
    assert len(gaps) == 3 and max(gaps) < 1e-4
