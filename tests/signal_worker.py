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


def slowed(train_step):
    """`train_step` with a host callback that sleeps 2 ms per step."""
    import jax

    def slow_step(state, batch):
        jax.debug.callback(lambda: time.sleep(0.002), ordered=True)
        return train_step(state, batch)

    return slow_step


def main(workdir: str, num_steps: int, cache: str) -> None:
    faults_worker.main(
        workdir,
        num_steps,
        cache,
        wrap_step=slowed,
        checkpoint_every=0,
        log_every=LOG_EVERY,
        steps_per_dispatch=4,
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
