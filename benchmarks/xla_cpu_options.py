"""What jdl's XLA:CPU options (`jdl.compiler`) gain over XLA's defaults, per zoo model.

Command:
    python -m benchmarks.xla_cpu_options [--models mnist_cnn,resnet20,...] [--repeats 7]
        [--quick]

For every model of `benchmarks.throughput` (same networks, sizes and batch sizes), one
training step (forward, backward, SGD update on the model's parameters, batch-norm
statistics carried) is lowered once and compiled under each setting:

- xla_default: XLA's own options (this jaxlib hands dots, convolutions and reductions
  to YNNPACK);
- jdl: `jdl.compiler.compiler_options()` (the same less convolutions);
- ynn_off: no YNNPACK at all (every operation in XLA's own kernels), for reference.

The compiled steps are then timed interleaved, one call of each per round, so machine
noise falls on all alike (a step shorter than 50 ms is timed over as many calls as make
50 ms); the medians over `--repeats` rounds are printed as
`RESULT model=<name> xla_default_ms=<a> jdl_ms=<b> ynn_off_ms=<c> speedup=<a/b>`.
`ynn=` on the detail lines counts the YNNPACK fusions of each compiled step.
CPU only (the options are CPU options): elsewhere it prints why and exits with 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import jdl
from benchmarks import throughput

QUICK = {"batch_size": 16, "repeats": 1}
SAMPLE_SECONDS = 0.05


class OptionsResult(NamedTuple):
    """Median step time (ms) of one model under each setting."""

    model: str
    medians_ms: dict[str, float]

    @property
    def speedup(self) -> float:
        return self.medians_ms["xla_default"] / self.medians_ms["jdl"]

    def result_line(self) -> str:
        times = " ".join(f"{name}_ms={value:.3f}" for name, value in self.medians_ms.items())
        return f"RESULT model={self.model} {times} speedup={self.speedup:.3f}"


def settings() -> dict[str, dict[str, str]]:
    """The compiler options of each timed setting, by name."""
    return {
        "xla_default": {},
        "jdl": jdl.compiler.compiler_options("cpu"),
        "ynn_off": {jdl.compiler.YNN_FUSION_OPTION: ""},
    }


def make_step(spec: throughput.ModelSpec, sizes: dict, batch_size: int) -> tuple[Callable, tuple]:
    """(step, args): one pure training step of the model and its arguments."""
    model = throughput.build_jdl_model(spec, sizes, nnx.Rngs(0))
    pure = throughput.make_pure_model(spec, model, cpu_kernels=False)
    data = throughput.make_data(spec, batch_size, 1, sizes)
    grad_fn = jax.value_and_grad(pure.loss, has_aux=True)

    def step(params, extra, x, y):
        (loss, extra), grads = grad_fn(params, extra, x, y)
        params = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
        return params, extra, loss

    return step, (pure.params, pure.extra, jnp.asarray(data["x"]), jnp.asarray(data["y"]))


def time_model(name: str, batch_size: int | None, repeats: int, quick: bool) -> OptionsResult:
    """Compiles one model's step under every setting and times them interleaved."""
    spec = throughput.MODELS[name]
    sizes = throughput.resolve_sizes(spec, quick, None)
    step, args = make_step(spec, sizes, batch_size or spec.batch_size)
    lowered = jax.jit(step).lower(*args)
    compiled = {}
    for setting, options in settings().items():
        start = time.perf_counter()
        compiled[setting] = lowered.compile(compiler_options=options)
        fusions = compiled[setting].as_text().count("__ynn_fusion")
        print(f"  {name} {setting}: compiled in {time.perf_counter() - start:.1f} s, ynn={fusions}")
        jax.block_until_ready(compiled[setting](*args))  # warm-up
    calls = calls_per_sample(compiled["xla_default"], args)
    seconds: dict[str, list[float]] = {setting: [] for setting in compiled}
    for _ in range(repeats):
        for setting, program in compiled.items():
            start = time.perf_counter()
            for _ in range(calls):
                outputs = program(*args)
            jax.block_until_ready(outputs)
            seconds[setting].append((time.perf_counter() - start) / calls)
    return OptionsResult(name, {s: 1e3 * statistics.median(t) for s, t in seconds.items()})


def calls_per_sample(program: Callable, args: tuple) -> int:
    """How many calls make one timed sample last about `SAMPLE_SECONDS` (at least one).

    A step of a millisecond is too short to time alone on a noisy machine.
    """
    start = time.perf_counter()
    jax.block_until_ready(program(*args))  # after a first, warm-up call
    return max(1, round(SAMPLE_SECONDS / (time.perf_counter() - start)))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.xla_cpu_options", description=__doc__.split("\n")[0]
    )
    models = ",".join(throughput.MODELS)
    parser.add_argument("--models", default=models, help=f"comma-separated, from {models}")
    parser.add_argument("--batch-size", type=int, default=None, help="default: per model")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians)")
    parser.add_argument("--quick", action="store_true", help="tiny models, batch 16, 1 round")
    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(args.models) - set(throughput.MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {models}")
    if args.quick:
        args.batch_size = args.batch_size or QUICK["batch_size"]
        args.repeats = QUICK["repeats"]
    return args


def main(argv: Sequence[str] | None = None) -> list[OptionsResult]:
    args = parse_args(argv)
    if jax.default_backend() != "cpu":
        print(f"XLA:CPU options only: the default backend is {jax.default_backend()}")
        sys.exit(2)
    print(f"jdl options: {jdl.compiler.compiler_options('cpu') or 'none (XLA_FLAGS sets them)'}")
    results = []
    for name in args.models:
        result = time_model(name, args.batch_size, args.repeats, args.quick)
        print(result.result_line(), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
