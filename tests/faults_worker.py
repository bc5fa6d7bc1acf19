"""A tiny training run for the crash tests: `python tests/faults_worker.py WORKDIR STEPS CACHE`.

Trains a small MLP on synthetic blobs with `jdl.fit`, checkpointing every
`CHECKPOINT_EVERY` steps into WORKDIR (resuming from it if it holds a
checkpoint), then writes the final parameters to WORKDIR/final_params.npz.
CACHE is a persistent compilation cache shared by all workers, so only the
first one compiles. tests/test_faults.py kills it with SIGKILL at chosen moments.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from support import blobs, mlp_state

CHECKPOINT_EVERY = 2


def main(
    workdir: str,
    num_steps: int,
    cache: str,
    *,
    wrap_step=None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    log_every: int = CHECKPOINT_EVERY,
    steps_per_dispatch: int = 1,
) -> None:
    """Trains, saves WORKDIR/final_params.npz and prints "done at step N".

    `wrap_step(train_step) -> train_step` changes the step (the signal tests slow it down).
    """
    import jax
    import numpy as np

    import jdl

    jdl.enable_compilation_cache(cache)
    state = mlp_state()
    train_step = jdl.make_train_step(jdl.classification_loss())
    result = jdl.fit(
        state,
        train_step=train_step if wrap_step is None else wrap_step(train_step),
        train_data=jdl.InMemoryData(blobs(), batch_size=32, seed=0),
        num_steps=num_steps,
        log_every=log_every,
        workdir=workdir,
        checkpoint_every=checkpoint_every,
        max_to_keep=2,
        steps_per_dispatch=steps_per_dispatch,
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
