"""Test setup: 8 fake CPU devices for sharding tests, quiet logs, parallel test workers,
a local HTTP server for download tests, and the MNIST classifier that scores generative
experiments."""

import contextlib
import os

import pytest
import support

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests must never reach a hub or the network for weights or data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Most of a test's time is single-threaded XLA compilation, so worker processes (pytest-xdist,
# `-n auto` in pyproject.toml) scale with the cores. Each worker holds its own JAX runtime and
# compiled programs (about 1-2 GiB), so more than four buys little and costs memory.
MAX_TEST_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    return max(1, min(os.cpu_count() or 1, MAX_TEST_WORKERS))


# --------------------------------------------------------------------------- fixtures
# Shared builders used at module level (data, train states) are plain functions in
# tests/support.py, which worker scripts import too.


@pytest.fixture
def http_server():
    """`serve(directory) -> base URL`: a local HTTP server, shut down after the test."""
    with contextlib.ExitStack() as servers:
        yield lambda directory: servers.enter_context(support.serve_directory(directory))


@pytest.fixture(scope="session")
def mnist_classifier(tmp_path_factory) -> str:
    """The workdir of a tiny MNIST classifier made the documented way (experiments.mnist_cnn,
    a few steps): what the generative experiments score their samples with. One per test
    worker."""
    workdir = str(tmp_path_factory.mktemp("classifier") / "mnist_cnn")
    result = support.run_module(
        "experiments.mnist_cnn",
        "--workdir",
        workdir,
        "--config.duration=3",
        "--config.conv_channels=(4, 8)",
        "--config.dense_sizes=(16,)",
        "--config.steps_per_dispatch=1",
        *support.OFFLINE,
        cwd=tmp_path_factory.getbasetemp(),
    )
    assert result.returncode == 0, result.stderr
    return workdir
