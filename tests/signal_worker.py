"""A training run slowed to ~2 ms a step, for the signal tests:
`python tests/signal_worker.py WORKDIR STEPS CACHE`.

Trains the small MLP of `faults_worker` with `jdl.fit`, checkpointing only at the end
(so a checkpoint in between can only come from a signal), four steps per dispatch,
logging every 20 steps, then writes the final parameters to WORKDIR/final_params.npz.
A host callback in the step sleeps, so a test has time to signal the run mid-way.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import faults_worker  # noqa: E402

LOG_EVERY = 20


def main(workdir: str, num_steps: int, cache: str) -> None:
    import jax
    import numpy as np
    from flax import nnx

    import jdl

    jdl.enable_compilation_cache(cache)
    model = jdl.models.MLP(8, (32,), 4, dropout=0.1, rngs=nnx.Rngs(params=0, dropout=1))
    tx, _ = jdl.make_optimizer("adam", learning_rate=1e-2)
    state = jdl.TrainState.create(model, tx, seed=0)
    step = jdl.make_train_step(jdl.classification_loss())

    def slow_step(state, batch):
        jax.debug.callback(lambda: time.sleep(0.002), ordered=True)
        return step(state, batch)

    result = jdl.fit(
        state,
        train_step=slow_step,
        train_data=jdl.InMemoryData(faults_worker.blobs(), batch_size=32, seed=0),
        num_steps=num_steps,
        log_every=LOG_EVERY,
        workdir=workdir,
        checkpoint_every=0,
        steps_per_dispatch=4,
        progress=False,
    )
    leaves = jax.tree_util.tree_flatten_with_path(result.state.params)[0]
    np.savez(
        os.path.join(workdir, "final_params.npz"),
        **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves},
    )
    print(f"done at step {result.step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
