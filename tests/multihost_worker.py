"""One process of a two-process CPU training run, started by tests/test_multihost.py.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT.npz

Each process fakes 2 CPU devices, joins JAX's distributed runtime on 127.0.0.1:PORT,
loads only its own rows of the data and trains an FSDP-sharded MLP on a mesh spanning
both processes. Process 0 writes the final parameters to OUT.npz; the train losses are
in WORKDIR/metrics.jsonl (written by process 0 only).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from support import blobs as _blobs
from support import mlp_state

NUM_STEPS = 4
BATCH_SIZE = 32
MESH_SHAPE = "data:2,fsdp:-1"


def blobs(n: int = 256, seed: int = 0) -> dict:
    """The run's data set, the same in every process (its class centers do not depend on seed)."""
    return _blobs(n, dim=16, seed=seed)


def make_state():
    return mlp_state(16, (64, 64), 4)


def fit_kwargs() -> dict:
    import jdl

    loss = jdl.classification_loss()
    return dict(
        train_step=jdl.make_train_step(loss),
        num_steps=NUM_STEPS,
        eval_step=jdl.make_eval_step(loss),
        eval_data=blobs(n=64, seed=1),
        log_every=1,
        steps_per_dispatch=2,
        progress=False,
    )


def main(process_id: int, num_processes: int, port: int, workdir: str, out: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jdl import parallel

    parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    import jax
    from jax.experimental import multihost_utils

    import jdl

    mesh = parallel.make_mesh(MESH_SHAPE)
    data = blobs()
    rows = parallel.process_rows(len(data["y"]), mesh)  # this process's share only
    arrays = parallel.global_arrays({k: v[rows] for k, v in data.items()}, mesh)
    result = jdl.fit(
        make_state(),
        train_data=jdl.InMemoryData(arrays, batch_size=BATCH_SIZE, seed=0),
        workdir=workdir,
        mesh=mesh,
        sharding_rules=parallel.ShardingRules(min_size=256),
        **fit_kwargs(),
    )
    params = multihost_utils.process_allgather(result.state.params, tiled=True)
    if jax.process_index() == 0:
        leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
        np.savez(out, *leaves, eval_accuracy=result.eval_history[-1]["accuracy"])
    print(f"process {process_id}: {jax.device_count()} devices, done", flush=True)


if __name__ == "__main__":
    pid, count, port_number, run_dir, out_path = sys.argv[1:6]
    main(int(pid), int(count), int(port_number), run_dir, out_path)
