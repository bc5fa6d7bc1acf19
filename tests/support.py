"""Data, states and servers that many tests build the same way.

Plain functions, so that module-level test code and the worker scripts that tests start
in subprocesses (`python tests/faults_worker.py ...`) can use them too; tests/conftest.py's
`http_server` fixture wraps `serve_directory`. Importing this module imports neither JAX
nor jdl, so a worker can still set up its environment first.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def blobs(n: int = 256, classes: int = 4, dim: int = 8, seed: int = 0) -> dict[str, Any]:
    """A small deterministic classification set: Gaussian blobs around fixed class centers.

    The centers do not depend on `seed`, so `blobs(seed=1)` is held-out data from the same
    distribution as `blobs()`, and every process of a multi-process run builds the same set.
    """
    import numpy as np

    centers = np.random.default_rng(1234).normal(0, 3, (classes, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.normal(0, 1, (n, dim))
    return {"x": x.astype(np.float32), "y": y.astype(np.int32)}


@functools.cache
def default_optimizer():
    """Adam at 1e-2 by `jdl.make_optimizer`; one object, so fits share compiled programs."""
    import jdl

    return jdl.make_optimizer("adam", learning_rate=1e-2)[0]


def mlp_state(
    in_features: int = 8,
    hidden: tuple[int, ...] = (32,),
    classes: int = 4,
    *,
    dropout: float = 0.1,
    tx: Any = None,
    seed: int = 0,
    **create_options: Any,
):
    """A `jdl.TrainState` of a `jdl.models.MLP` (params key `seed`, dropout key 1).

    `tx` defaults to `default_optimizer()`; `create_options` go to `TrainState.create`.
    """
    from flax import nnx

    import jdl

    model = jdl.models.MLP(
        in_features, hidden, classes, dropout=dropout, rngs=nnx.Rngs(params=seed, dropout=1)
    )
    tx = default_optimizer() if tx is None else tx
    return jdl.TrainState.create(model, tx, seed=seed, **create_options)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class.
        pass


@contextlib.contextmanager
def serve_directory(directory: str | Path) -> Iterator[str]:
    """Serves `directory` over HTTP on 127.0.0.1 from a daemon thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ----------------------------------------------------------------- experiments as commands

# Experiment flags for tests: nothing downloaded, no progress bars, no compilation cache.
OFFLINE = ["--config.download=false", "--config.progress=false", "--config.compilation_cache=false"]


def run_module(module: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a fresh process, offline data, without JDL_DEBUG."""
    environment = {k: v for k, v in os.environ.items() if k != "JDL_DEBUG"}
    environment["JDL_DATA_DIR"] = os.path.join(str(cwd or "."), "no-data")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=environment,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a command that refused its input (exit code 1, no
    traceback, no FINAL line), checked."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert "FINAL" not in result.stdout
    return errors[0]
