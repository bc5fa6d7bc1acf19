"""Compile time of experiments with a cold and a warm persistent compilation cache.

    python -m benchmarks.compile_cache [--experiments mnist_mlp,mnist_cnn,iris_mlp]
                                       [--duration "2 steps"]

For each experiment: a new, empty cache directory; the experiment runs twice, each
time in a fresh Python process (so only the on-disk cache can carry over) with a new
workdir (so the second run trains again instead of resuming) and a tiny duration.
Per run it reports:

- `compile_s`: seconds spent getting XLA executables (JAX's
  `/jax/core/compile/backend_compile_duration` events: compiling, or loading from the
  cache on a hit), summed over every program the run builds;
- `cache_hits` / `cache_requests`: executables loaded from the cache / looked up in it
  (programs that compile in under 0.2 s are not cached, see `jdl.enable_compilation_cache`);
- `wall_s`: the whole process, from interpreter start to exit (imports, data loading,
  tracing, compiling, training, evaluation).

The last line is `FINAL {json}` with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

DEFAULT_EXPERIMENTS = ("mnist_mlp", "mnist_cnn", "iris_mlp")
_COMPILE = "/jax/core/compile/backend_compile_duration"
_REPORT = "COMPILE_REPORT "


def child(name: str, workdir: str, duration: str) -> None:
    """Runs experiment `name` in this process and prints its compile figures."""
    import importlib

    import jax

    totals = {"compile_s": 0.0, "cache_hits": 0, "cache_requests": 0}

    def on_duration(event: str, seconds: float, **kwargs) -> None:
        if event == _COMPILE:
            totals["compile_s"] += seconds

    def on_event(event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            totals["cache_hits"] += 1
        elif event == "/jax/compilation_cache/compile_requests_use_cache":
            totals["cache_requests"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    module = importlib.import_module(f"experiments.{name}")
    module.main(
        [
            f"--config.duration={duration}",
            "--config.progress=False",
            "--config.compilation_cache=True",
            "--workdir",
            workdir,
        ]
    )
    print(_REPORT + json.dumps(totals), flush=True)


def run_once(name: str, cache_dir: str, duration: str) -> dict:
    """One run of `name` in a fresh process using `cache_dir`; returns its figures."""
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "JDL_COMPILATION_CACHE": cache_dir}
        command = [sys.executable, "-m", "benchmarks.compile_cache", "--child", name]
        command += ["--workdir", workdir, "--duration", duration]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
    reports = [line for line in done.stdout.splitlines() if line.startswith(_REPORT)]
    if done.returncode != 0 or not reports:
        raise RuntimeError(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return {**json.loads(reports[-1][len(_REPORT) :]), "wall_s": round(wall, 2)}


def measure(name: str, duration: str) -> dict:
    """Cold then warm run of `name` with a new cache directory."""
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = run_once(name, cache_dir, duration)
        warm = run_once(name, cache_dir, duration)
    for run in (cold, warm):
        run["compile_s"] = round(run["compile_s"], 2)
    return {"experiment": name, "cold": cold, "warm": warm}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", default=",".join(DEFAULT_EXPERIMENTS))
    parser.add_argument("--duration", default="2 steps", help="each run's config.duration")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.workdir, args.duration)
        return []
    results = []
    print(f"{'experiment':<12} {'run':<5} {'compile_s':>9} {'hits/req':>9} {'wall_s':>7}")
    for name in args.experiments.split(","):
        result = measure(name.strip(), args.duration)
        for run in ("cold", "warm"):
            r = result[run]
            hits = f"{r['cache_hits']}/{r['cache_requests']}"
            print(f"{name:<12} {run:<5} {r['compile_s']:>9.2f} {hits:>9} {r['wall_s']:>7.1f}")
        results.append(result)
    print("FINAL " + json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
