"""Training throughput of `jdl.fit` on 1, 2, 4 and 8 devices, data parallel and FSDP.

Command:
    python -m benchmarks.scaling [--devices 1,2,4,8] [--modes dp,fsdp] [--steps 200]
        [--batch-size 256] [--repeats 3] [--gpt-mfu auto|on|off] [--quick]

On a CPU-only machine the devices are fake (`--xla_force_host_platform_device_count=8`,
set here unless XLA_FLAGS already asks for a device count): they all share the same
cores, so the figures check that the sharded path runs, compiles once and costs little
on top of one device; they say nothing about speed-ups on real accelerators.

Every run trains the 784-512-512-10 ReLU MLP of `benchmarks.throughput` (Adam, softmax
cross-entropy) on the same synthetic MNIST-shaped data held on the device, with the
global batch size fixed (each device gets batch/devices examples):

- dp: `mesh_shape="data:N"`, parameters and optimizer state replicated.
- fsdp: `mesh_shape="fsdp:N"`, every array of 4096+ entries split over the devices.

What is timed is the steady state: a first `fit` compiles the chunk program, then each
repeat times `fit` continuing for `--steps` more steps (the same program, no compile).
Each setting's figure is its median over the repeats. One line per setting:

    RESULT model=mlp_512 mode=<dp|fsdp> devices=<n> samples_per_s=<x> vs_1_device=<r>

The device counts default to 1, 2, 4, ... up to the devices there are (at most 8). On a GPU
or TPU (or with `--gpt-mfu on`) it then measures GPT-2 small's bf16 training MFU on one
device with `benchmarks.gpt_mfu` (its `--gpt-*`, `--precision` and `--peak-*` options
apply) and prints its RESULT line too.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import jdl  # noqa: E402
from benchmarks import gpt_mfu  # noqa: E402
from benchmarks.throughput import MODELS, make_data  # noqa: E402

SPEC = MODELS["mlp_512"]
MESH_AXIS = {"dp": "data", "fsdp": "fsdp"}


def time_setting(
    mode: str, devices: int, *, batch_size: int, steps: int, repeats: int, chunk: int
) -> float:
    """Median samples/s of `steps` training steps of `mode` on the first `devices` devices."""
    mesh = jdl.make_mesh(f"{MESH_AXIS[mode]}:{devices}", devices=jax.devices()[:devices])
    data = jdl.InMemoryData(
        make_data(SPEC, batch_size, SPEC.epoch_steps), batch_size=batch_size, seed=0
    )
    model = jdl.models.MLP(784, SPEC.hidden, 10, rngs=nnx.Rngs(0))
    tx, _ = jdl.make_optimizer("adam", learning_rate=1e-3)
    step_fn = jdl.make_train_step(jdl.classification_loss())
    options = dict(
        train_step=step_fn,
        train_data=data,
        mesh=mesh,
        steps_per_dispatch=chunk,
        unroll=1,
        log_every=0,
        progress=False,
    )
    state = jdl.fit(jdl.TrainState.create(model, tx), num_steps=chunk, **options).state
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = jdl.fit(state, num_steps=int(state.step) + steps, **options)
        jax.block_until_ready(result.state)
        rates.append(steps * batch_size / (time.perf_counter() - started))
        state = result.state
    return statistics.median(rates)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--devices", help="device counts, comma-separated (default 1, 2, 4, ... up to 8)"
    )
    parser.add_argument("--modes", default="dp,fsdp", help="dp and/or fsdp")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per repeat")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=10, help="steps per dispatch")
    parser.add_argument(
        "--gpt-mfu",
        default="auto",
        choices=("auto", "on", "off"),
        help="GPT-2 small bf16 MFU on one device (auto: on a GPU or TPU)",
    )
    gpt_mfu.add_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="a few steps, one repeat")
    args = parser.parse_args(argv)
    if args.devices is None:  # 1, 2, 4, ... up to the devices there are, at most 8
        available = min(len(jax.devices()), 8)
        args.devices = [2**i for i in range(available.bit_length()) if 2**i <= available]
    else:
        args.devices = [int(n) for n in args.devices.split(",")]
    args.modes = args.modes.split(",")
    if bad := [m for m in args.modes if m not in MESH_AXIS]:
        parser.error(f"unknown mode {bad[0]!r}; use dp or fsdp")
    if max(args.devices) > len(jax.devices()):
        parser.error(f"{max(args.devices)} devices asked for, {len(jax.devices())} available")
    if args.quick:
        args.steps, args.repeats = 2 * args.chunk, 1
    if args.steps % args.chunk:
        parser.error("--steps must be a multiple of --chunk")
    if error := gpt_mfu.check_arguments(args):
        parser.error(error)
    return args


def main(argv: Sequence[str] | None = None) -> dict[tuple[str, int], float]:
    """Runs the benchmark: one RESULT line per (mode, device count), then GPT-2 MFU."""
    args = parse_args(argv)
    results = time_settings(args)
    accelerator = jax.default_backend() in ("gpu", "tpu")
    if args.gpt_mfu == "on" or (args.gpt_mfu == "auto" and accelerator):
        gpt_mfu.run(args)
    return results


def time_settings(args: argparse.Namespace) -> dict[tuple[str, int], float]:
    """The data-parallel / FSDP table: one RESULT line per (mode, device count)."""
    print(
        f"{SPEC.description}, batch {args.batch_size}, {args.steps} steps x {args.repeats}; "
        f"{jax.devices()[0].platform} x {len(jax.devices())}, jax {jax.__version__}",
        flush=True,
    )
    results = {}
    for mode in args.modes:
        for devices in args.devices:
            rate = time_setting(
                mode,
                devices,
                batch_size=args.batch_size,
                steps=args.steps,
                repeats=args.repeats,
                chunk=args.chunk,
            )
            results[mode, devices] = rate
            base = results.get((mode, args.devices[0]), rate)
            print(
                f"RESULT model={SPEC.name} mode={mode} devices={devices} "
                f"samples_per_s={rate:.1f} vs_{args.devices[0]}_device={rate / base:.2f}",
                flush=True,
            )
    return results


if __name__ == "__main__":
    main()
