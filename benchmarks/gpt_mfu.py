"""GPT-2 small training MFU on one accelerator, in bf16: `jdl.fit`'s model FLOP/s over the peak.

Command:
    python -m benchmarks.gpt_mfu [--gpt-batch-size 16] [--gpt-seq-len 1024] [--gpt-steps 30]
        [--gpt-repeats 3] [--precision bf16] [--quick]

`python -m benchmarks.scaling` runs it too when JAX's default backend is a GPU or TPU.

What is trained: `jdl.models.gpt_small` (GPT-2 124M: 12 layers of width 768, vocabulary
50,257, tied embeddings) on uniformly random token windows of `--gpt-seq-len` tokens, next-token
cross-entropy, Adam, with `jdl.make_train_step(precision="bf16")`: bfloat16 forward and
backward, float32 master weights and optimizer state. `jdl.fit` runs K=10 steps per dispatch
(rolled). What is timed is the steady state: the warm-up fit compiles the program, every
timed fit reuses it; the figure is the median over the repeats.

- Model FLOPs per step: 3 x the matmul FLOPs of the loss forward pass, counted from its
  jaxpr (`benchmarks/flops.py`; attention's score and value products included).
- `mfu`: against the device's bf16 matmul peak measured in the same run (the best of a few
  batched 8192^2 products); `mfu_nominal`: against the vendor's dense bf16 figure for the
  device (`NOMINAL_BF16_PEAKS`; nan for an unknown device). The usual MFU is the nominal one.

One line:

    RESULT model=gpt_small precision=<p> device=<kind> tokens_per_s=<x>
        model_tflops=<achieved TFLOP/s> mfu=<vs measured peak> mfu_nominal=<vs datasheet>

On a CPU it runs (that is how it is tested, with `--quick`'s tiny GPT), but bf16 matmuls
there are emulated and say nothing about an accelerator.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from benchmarks import flops
from benchmarks.throughput import MODELS, JdlPeer, Setting, make_data, resolve_sizes

SPEC = MODELS["gpt_small"]
STEPS_PER_DISPATCH = 10

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s; the
# first entry whose name is in `jax.Device.device_kind` applies.
NOMINAL_BF16_PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM; "NVIDIA H100 80GB HBM3"
    ("H200", 989.4e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),
)


@dataclasses.dataclass
class MfuResult:
    """One measurement; rates are tokens/s per repeat."""

    device: str
    precision: str
    tokens_per_step: int
    flops_per_step: int
    rates: list[float]
    measured_peak: float
    nominal_peak: float  # nan when the device is not in NOMINAL_BF16_PEAKS

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(self.rates)

    @property
    def model_flops_per_s(self) -> float:
        return self.tokens_per_s / self.tokens_per_step * self.flops_per_step

    @property
    def mfu(self) -> float:
        return self.model_flops_per_s / self.measured_peak

    @property
    def mfu_nominal(self) -> float:
        return self.model_flops_per_s / self.nominal_peak

    def line(self) -> str:
        return (
            f"RESULT model=gpt_small precision={self.precision} "
            f"device={self.device.replace(' ', '_')} tokens_per_s={self.tokens_per_s:.1f} "
            f"model_tflops={self.model_flops_per_s / 1e12:.4g} mfu={self.mfu:.4f} "
            f"mfu_nominal={self.mfu_nominal:.4f}"
        )


def nominal_peak(device_kind: str) -> float:
    """The datasheet bf16 peak of a device kind, FLOP/s; nan when unknown."""
    for name, peak in NOMINAL_BF16_PEAKS:
        if name in device_kind:
            return peak
    return math.nan


def measure_bf16_peak(size: int, batch: int) -> float:
    """The device's best bf16 matmul FLOP/s (a batch of size x size products per call)."""
    return flops.matmul_peak_xla(size, repeats=5, dtype=jnp.bfloat16, batch=batch)


def run(args: argparse.Namespace) -> MfuResult:
    """Builds GPT-2 small, compiles, times `gpt_repeats` x `gpt_steps` steps; prints lines."""
    sizes = resolve_sizes(SPEC, args.quick, args.gpt_seq_len)
    device = jax.devices()[0]
    print(
        f"{SPEC.describe(sizes)}; batch {args.gpt_batch_size}, precision {args.precision}, "
        f"{args.gpt_steps} timed steps x {args.gpt_repeats}; {device.platform} "
        f"({device.device_kind}), jax {jax.__version__}",
        flush=True,
    )
    # Two batches of data, repeated: random tokens cost the same as text.
    arrays = make_data(SPEC, args.gpt_batch_size, 2, sizes)
    start = time.perf_counter()
    peer = JdlPeer(
        SPEC,
        sizes,
        arrays,
        args.gpt_batch_size,
        Setting(STEPS_PER_DISPATCH, 1),
        precision=args.precision,
    )
    peer.warm_up()
    print(f"  compiled and warmed up in {time.perf_counter() - start:.1f} s", flush=True)
    tokens_per_step = args.gpt_batch_size * sizes["seq_len"]
    rates = [
        tokens_per_step * args.gpt_steps / peer.time_steps(args.gpt_steps)
        for _ in range(args.gpt_repeats)
    ]
    result = MfuResult(
        device=device.device_kind,
        precision=args.precision,
        tokens_per_step=tokens_per_step,
        flops_per_step=peer.flops_per_step(),
        rates=rates,
        measured_peak=measure_bf16_peak(args.peak_size, args.peak_batch),
        nominal_peak=nominal_peak(device.device_kind),
    )
    print(
        f"  model FLOPs/step {result.flops_per_step / 1e9:.4g} GFLOP; tokens/s per repeat: "
        + ", ".join(f"{rate:.1f}" for rate in rates),
        flush=True,
    )
    print(
        f"  peak: measured bf16 matmul {result.measured_peak / 1e12:.4g} TFLOP/s "
        f"({args.peak_batch} x {args.peak_size}^2); datasheet "
        f"{result.nominal_peak / 1e12:.4g} TFLOP/s",
        flush=True,
    )
    print(result.line(), flush=True)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of this benchmark (shared with `benchmarks.scaling`)."""
    parser.add_argument("--gpt-batch-size", type=int, default=16, help="windows per step")
    parser.add_argument("--gpt-seq-len", type=int, default=1024, help="tokens per window")
    parser.add_argument("--gpt-steps", type=int, default=30, help="timed steps per repeat")
    parser.add_argument("--gpt-repeats", type=int, default=3)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--peak-size", type=int, default=8192)
    parser.add_argument("--peak-batch", type=int, default=16)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="tiny GPT, a few steps (CPU test)")
    args = parser.parse_args(argv)
    error = check_arguments(args)
    if error:
        parser.error(error)
    return args


def check_arguments(args: argparse.Namespace) -> str | None:
    """Applies `--quick` to the options; returns what is wrong with them, if anything."""
    if args.quick:  # the tiny GPT of `benchmarks.throughput --quick`, one chunk of steps
        args.gpt_batch_size, args.gpt_seq_len = 4, None
        args.gpt_steps, args.gpt_repeats = STEPS_PER_DISPATCH, 1
        args.peak_size, args.peak_batch = 256, 1
    if args.gpt_steps % STEPS_PER_DISPATCH:
        return f"--gpt-steps must be a multiple of {STEPS_PER_DISPATCH}"
    return None


def main(argv: Sequence[str] | None = None) -> MfuResult:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
