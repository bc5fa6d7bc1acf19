"""How long `import jdl` takes, next to `import jax` alone.

    python -m benchmarks.import_time [--repeats 5]

Each import runs in a fresh Python process (so nothing is cached in memory), timed
inside the process around the `import` statement alone (interpreter start-up is left
out). The file system cache is warm after the first repeat, as on a machine that runs
jdl every day. Prints one RESULT line per module with the median and all repeats, the
ratio of the two medians, and `FINAL {json}` last.

`import jdl` imports JAX, so the ratio is at least 1; what lies above 1 is jdl's own
modules and what they import (Flax NNX, Optax, Orbax, ...). Optional heavy libraries
(qwix, transformers, torch, tensorboard, matplotlib) are imported only when used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence

MODULES = ("jax", "jdl")

_TIMER = (
    "import time; start = time.perf_counter(); import {module}; print(time.perf_counter() - start)"
)


def import_seconds(module: str) -> float:
    """Seconds that `import module` takes in a fresh Python process."""
    result = subprocess.run(
        [sys.executable, "-c", _TIMER.format(module=module)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def measure(repeats: int = 5) -> dict:
    """{"jax_s", "jdl_s", "ratio", "repeats": {module: [seconds, ...]}} (medians in *_s)."""
    times = {module: [] for module in MODULES}
    for _ in range(repeats):  # interleaved, so a busy moment hits both alike
        for module in MODULES:
            times[module].append(import_seconds(module))
    medians = {module: statistics.median(values) for module, values in times.items()}
    return {
        "jax_s": round(medians["jax"], 3),
        "jdl_s": round(medians["jdl"], 3),
        "ratio": round(medians["jdl"] / medians["jax"], 3),
        "repeats": {module: [round(t, 3) for t in values] for module, values in times.items()},
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    figures = measure(args.repeats)
    for module in MODULES:
        print(
            f"RESULT import={module} median_s={figures[f'{module}_s']:.3f} "
            f"repeats={figures['repeats'][module]}"
        )
    print(f"RESULT jdl_over_jax={figures['ratio']:.3f}")
    print("FINAL " + json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
