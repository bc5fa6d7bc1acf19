"""How long `import jdl` takes, next to `import jax` alone.

    python -m benchmarks.import_time [--repeats 5]

Each import runs in a fresh Python process (so nothing is cached in memory), timed
inside the process around the `import` statement alone (interpreter start-up is left
out), in wall-clock and in CPU seconds (CPU time is the steadier figure on a busy
machine). The file system cache is warm after the first repeat, as on a machine that
runs jdl every day. Prints one RESULT line per module with the medians and all wall
times, one with the ratios of the medians, and `FINAL {json}` last.

`import jdl` imports nothing heavy: each public name is imported on first use. So the
third figure, `import jdl; jdl.fit`, is what a training script pays before its first
line of work: JAX, Flax NNX, Optax, Orbax and jdl's core. Optional heavy libraries
(qwix, transformers, torch, tensorboard, matplotlib) are imported only when used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence

#: What is timed, by name: the statement that runs in a fresh process.
STATEMENTS = {"jax": "import jax", "jdl": "import jdl", "jdl.fit": "import jdl; jdl.fit"}
MODULES = tuple(STATEMENTS)

_TIMER = (
    "import time; wall, cpu = time.perf_counter(), time.process_time(); {statement}; "
    "print(time.perf_counter() - wall, time.process_time() - cpu)"
)


def import_seconds(module: str) -> tuple[float, float]:
    """(wall, CPU) seconds that `STATEMENTS[module]` takes in a fresh Python process."""
    result = subprocess.run(
        [sys.executable, "-c", _TIMER.format(statement=STATEMENTS[module])],
        check=True,
        capture_output=True,
        text=True,
    )
    wall, cpu = result.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def measure(repeats: int = 5) -> dict:
    """Medians of `repeats` fresh imports of each module, in wall and in CPU seconds.

    Returns {"jax_s", "jdl_s", "ratio"} (wall), {"jax_cpu_s", "jdl_cpu_s", "cpu_ratio"},
    {"fit_s", "fit_cpu_s", "fit_ratio"} (`import jdl; jdl.fit`, over `import jax`) and
    "repeats": {module: [wall seconds, ...]}. CPU time is the steadier figure on a
    machine that other work keeps busy.
    """
    wall = {module: [] for module in MODULES}
    cpu = {module: [] for module in MODULES}
    for _ in range(repeats):  # interleaved, so a busy moment hits both alike
        for module in MODULES:
            seconds, cpu_seconds = import_seconds(module)
            wall[module].append(seconds)
            cpu[module].append(cpu_seconds)
    figures = {}
    for suffix, ratio, times in (("_s", "ratio", wall), ("_cpu_s", "cpu_ratio", cpu)):
        jax_s, jdl_s, fit_s = (statistics.median(times[module]) for module in MODULES)
        figures |= {
            "jax" + suffix: round(jax_s, 3),
            "jdl" + suffix: round(jdl_s, 3),
            ratio: round(jdl_s / jax_s, 3),
            "fit" + suffix: round(fit_s, 3),
            "fit_" + ratio: round(fit_s / jax_s, 3),
        }
    figures["repeats"] = {module: [round(t, 3) for t in times] for module, times in wall.items()}
    return figures


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    figures = measure(args.repeats)
    for module, key in zip(MODULES, ("jax", "jdl", "fit"), strict=True):
        print(
            f"RESULT import={module} median_s={figures[key + '_s']:.3f} "
            f"median_cpu_s={figures[key + '_cpu_s']:.3f} repeats={figures['repeats'][module]}"
        )
    print(f"RESULT jdl_over_jax={figures['ratio']:.3f} cpu={figures['cpu_ratio']:.3f}")
    print(f"RESULT jdl.fit_over_jax={figures['fit_ratio']:.3f} cpu={figures['fit_cpu_ratio']:.3f}")
    print("FINAL " + json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
