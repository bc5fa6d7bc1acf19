"""Two processes on 127.0.0.1 (gloo collectives, 2 fake CPU devices each) train an
FSDP-sharded MLP exactly as one process on one device does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np

import jdl

sys.path.insert(0, os.path.dirname(__file__))
import multihost_worker as worker  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_processes(workdir: str, out: str) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(pid), "2", str(port), workdir, out],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for pid, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {pid} failed:\n{output[-4000:]}"
        assert f"process {pid}: 4 devices, done" in output


def test_two_processes_match_one_process(tmp_path):
    _run_two_processes(str(tmp_path / "multi"), str(tmp_path / "params.npz"))

    reference = jdl.fit(
        worker.make_state(),
        train_data=jdl.InMemoryData(worker.blobs(), batch_size=worker.BATCH_SIZE, seed=0),
        workdir=str(tmp_path / "single"),
        **worker.fit_kwargs(),
    )
    multi = jdl.read_metrics(str(tmp_path / "multi" / "metrics.jsonl"))
    single = jdl.read_metrics(str(tmp_path / "single" / "metrics.jsonl"))
    losses = [[r["train/loss"] for r in rs if "train/loss" in r] for rs in (multi, single)]
    assert len(losses[1]) == worker.NUM_STEPS
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)

    saved = np.load(tmp_path / "params.npz")
    want = [np.asarray(x) for x in jax.tree.leaves(reference.state.params)]
    assert len(saved.files) == len(want) + 1
    for i, leaf in enumerate(want):
        np.testing.assert_allclose(saved[f"arr_{i}"], leaf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        saved["eval_accuracy"], reference.eval_history[-1]["accuracy"], rtol=1e-6
    )
    # both processes wrote one checkpoint together; it restores onto one device
    checkpointer = jdl.Checkpointer(tmp_path / "multi" / "checkpoints")
    try:
        assert checkpointer.all_steps() == [worker.NUM_STEPS]
        restored = checkpointer.restore(worker.make_state()).state
    finally:
        checkpointer.close()
    for got, leaf in zip(jax.tree.leaves(restored.params), want, strict=True):
        np.testing.assert_allclose(np.asarray(got), leaf, rtol=1e-5, atol=1e-6)
