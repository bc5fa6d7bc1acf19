"""Exported models: `jdl.export(...)` writes one, `jdl.export.load(path)` runs one.

    python -m jdl.export --workdir workdirs/mnist_cnn --format stablehlo --output cnn.shlo
    python -m jdl.export --workdir workdirs/mnist_cnn --format onnx --output cnn.onnx
    python -m jdl.export --workdir workdirs/mnist_cnn --format onnx-int8 --output cnn8.onnx

Options: --step latest|best|N (default latest), --input-shape 28,28,1 and --input-dtype
float32|int32 (default: what the run recorded in summary.json).

This module is callable: ``jdl.export(workdir_or_model, path, format=...)`` is
`jdl.deploy.export`. `load` and the rest of this file import only the standard library,
NumPy, JAX (StableHLO) and onnxruntime (ONNX) — never jdl's models — so a serving
program may copy this one file, or use the plain calls shown in `load`.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable
from typing import Any

ONNX_SUFFIX = ".onnx"


def load(path: str | os.PathLike) -> Callable[[Any], Any]:
    """A function running an exported model: ``f(x) -> NumPy outputs``.

    `x` is a batch (B, ...) of the exported example shape and dtype, any B >= 1. A path
    ending in ".onnx" runs on onnxruntime's CPU provider; any other is a serialized
    `jax.export` artifact (StableHLO), run by JAX on its default device (CPU, CUDA or
    TPU), which is the same as
    ``jax.export.deserialize(open(path, "rb").read()).call(x)``.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: the file is not an artifact of that kind.
    """
    import numpy as np

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported model at {path}")
    if path.endswith(ONNX_SUFFIX):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # the converter's shape notes are not the user's concern
        try:
            session = onnxruntime.InferenceSession(
                path, options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own classes, not ValueError
            raise ValueError(f"{path} is not a readable ONNX model ({error})") from None
        name = session.get_inputs()[0].name

        def run_onnx(x: Any) -> Any:
            outputs = session.run(None, {name: np.asarray(x)})
            return outputs[0] if len(outputs) == 1 else outputs

        return run_onnx

    import jax

    with open(path, "rb") as f:
        data = f.read()
    try:
        exported = jax.export.deserialize(bytearray(data))
    except Exception as error:  # a flatbuffer parse error of any kind means "not ours"
        raise ValueError(f"{path} is not a serialized jax.export model ({error})") from None
    call = jax.jit(exported.call)

    def run_stablehlo(x: Any) -> Any:
        return jax.tree.map(np.asarray, call(x))

    return run_stablehlo


class _CallableModule(types.ModuleType):
    """`jdl.export(...)` calls `jdl.deploy.export`, while `jdl.export.load` stays here."""

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        from jdl.deploy import export

        return export(*args, **kwargs)


if __name__ in sys.modules:  # also when a serving program loads this file on its own
    sys.modules[__name__].__class__ = _CallableModule
