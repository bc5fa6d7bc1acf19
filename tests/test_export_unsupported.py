"""ONNX export of a model with an operation the converter cannot express: one error line that
names the operation, from the Python API and from `python -m jdl.export`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdl
from jdl.deploy import ExportError
from jdl.errors import UserError
from jdl.export.unsupported import UnsupportedOperationError, converter_error, operation_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A real model module: min-pooling (lax.reduce_window with lax.min, a primitive jax2onnx
# 0.12.5 has no rule for) before a dense layer; `build_model` is what jdl.deploy rebuilds a
# run's model from, and `python -m minpool_net WORKDIR` trains one for a few steps.
MINPOOL_MODULE = textwrap.dedent(
    """
    import sys

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import jdl


    class MinPoolNet(nnx.Module):
        def __init__(self, num_classes, rngs):
            self.dense = nnx.Linear(8, num_classes, rngs=rngs)

        def __call__(self, x):  # (B, 16) -> (B, num_classes)
            pooled = jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (1, 2), (1, 2), "VALID")
            return self.dense(pooled)


    def build_model(config, num_classes, rngs):
        return MinPoolNet(int(num_classes), rngs)


    if __name__ == "__main__":
        rng = np.random.default_rng(0)
        data = {"x": rng.random((32, 16), dtype=np.float32), "y": np.arange(32) % 3}
        jdl.fit(
            jdl.TrainState.create(build_model(None, 3, nnx.Rngs(0)), optax.adam(1e-2)),
            train_step=jdl.make_train_step(jdl.classification_loss()),
            train_data=jdl.InMemoryData(data, batch_size=8, seed=0),
            num_steps=2,
            workdir=sys.argv[1],
            progress=False,
            log_every=0,
            run_config={"seed": 0},
        )
    """
)


def _min_pool(x):
    return jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (1, 2), (1, 2), "VALID")


def _batched_eigenvalues(x):
    # eigh has a converter rule, which refuses batches of matrices (rank > 2).
    return jnp.linalg.eigh(x[:, :4].reshape(-1, 2, 2))[0].reshape(x.shape[0], -1)


class Net(nnx.Module):
    def __init__(self, op):
        self.dense = nnx.Linear(16, 16, rngs=nnx.Rngs(0))
        self.op = op

    def __call__(self, x):
        return self.op(self.dense(x))


def test_converter_errors_name_the_operation_or_keep_the_converter_s_words():
    no_rule = NotImplementedError(
        "[converter] No plugins registered for primitive 'reduce_window_min'"
    )
    error = converter_error(no_rule, "Net")
    assert isinstance(error, UnsupportedOperationError) and error.operation == "reduce_window_min"
    assert isinstance(error, ExportError) and isinstance(error, UserError)
    assert isinstance(error, ValueError)
    assert str(error) == (
        "the ONNX converter cannot express the operation 'reduce_window_min' used by Net; "
        "export with format 'stablehlo' instead (--format stablehlo)"
    )
    # Raised outside any conversion: no operation to name, the converter's first line kept.
    other = converter_error(ValueError("bad input names\nmore detail"), "Net")
    assert type(other) is ExportError and "\n" not in str(other)
    assert "(ValueError: bad input names)" in str(other) and "stablehlo" in str(other)
    assert operation_of(ValueError("no primitive here")) is None


@pytest.mark.slow  # importing jax2onnx loads all its plugins (about 30 s on 2 cores)
def test_python_api_raises_one_line_naming_the_operation(tmp_path):
    for fmt in ("onnx", "onnx-int8"):
        path = tmp_path / f"net.{fmt}"
        with pytest.raises(UnsupportedOperationError) as raised:
            jdl.export(Net(_min_pool), path, format=fmt, input_shape=(16,))
        assert raised.value.operation == "reduce_window_min"
        assert str(raised.value) == (
            "the ONNX converter cannot express the operation 'reduce_window_min' used by Net; "
            "export with format 'stablehlo' instead (--format stablehlo)"
        )
        assert not path.exists()
    # A rule that refuses its arguments: the operation found in the conversion, with why.
    with pytest.raises(UnsupportedOperationError) as raised:
        jdl.export(Net(_batched_eigenvalues), tmp_path / "e.onnx", format="onnx", input_shape=(16,))
    assert raised.value.operation == "eigh" and "\n" not in str(raised.value)
    assert "operation 'eigh' used by Net (eigh currently supports rank-2" in str(raised.value)
    # What the message advises works: StableHLO expresses the same model.
    model = Net(_min_pool)
    path = jdl.export(model, tmp_path / "net.shlo", format="stablehlo", input_shape=(16,))
    x = np.random.default_rng(0).random((3, 16), dtype=np.float32)
    np.testing.assert_allclose(jdl.export.load(path)(x), model(x), atol=1e-6)


@pytest.mark.slow  # a training process, then an export process importing jax2onnx
def test_command_line_prints_one_error_line_naming_the_operation(tmp_path):
    (tmp_path / "minpool_net.py").write_text(MINPOOL_MODULE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO]),
        "JAX_PLATFORMS": "cpu",
    }
    workdir = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "minpool_net", str(workdir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    output = tmp_path / "out" / "net.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "jdl.export", "--workdir", str(workdir), "--format", "onnx"]
        + ["--output", str(output), "--input-shape", "16"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # jdl.cli's status for a user error
    assert done.stderr.strip() == (
        "error: the ONNX converter cannot express the operation 'reduce_window_min' used by "
        "MinPoolNet; export with format 'stablehlo' instead (--format stablehlo)"
    )
    assert "Traceback" not in done.stderr and not output.exists()
