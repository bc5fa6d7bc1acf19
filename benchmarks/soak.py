"""Soak test: a long training run whose host and device memory must stay flat.

Command:
    python -m benchmarks.soak [--steps 20000] [--every 1000] [--warmup 5000]
        [--max-host-growth-mib 32] [--max-device-growth-mib 1] [--no-workdir]

Trains a small MLP (32-128-128-10, Adam, batch 128) on synthetic data held on the
device, as `--steps / --every` consecutive `jdl.fit` calls of `--every` steps each,
all in one run directory (metrics, TensorBoard, a checkpoint every `--every` steps,
the curve plot, the lock; `--no-workdir` leaves all of that out). Each call resumes
where the previous one stopped, as a restarted run would. After each segment it
prints the host memory (resident set size from /proc/self/status) and the device
memory (the device's `memory_stats()["bytes_in_use"]` where the backend reports
it, else the bytes of all live JAX arrays).

The check: from the first sample at or after `--warmup` steps to the last sample, host
memory may grow by at most `--max-host-growth-mib` and device memory by at most
`--max-device-growth-mib`. Compilation caches, allocator pools, imports and the plot and
TensorBoard writers settle during warm-up: on CPU, host memory rose by ~25 MiB up to
step ~5000 and then stayed within ~8 MiB up to step 20,000 (see BENCHMARKS.md, "Soak").
The last line is

    SOAK PASS|FAIL steps=<n> host_growth_mib=<x> device_growth_mib=<y>

and the process exits with status 1 on FAIL.

Checkpoint overhead:
    python -m benchmarks.soak --checkpoint-overhead [--repeats 7] [--mlp-hidden 4096]

instead times `Checkpointer.save` (the call, and the call plus the wait for the
asynchronous write) and `Checkpointer.restore` of two Adam `TrainState`s, the MNIST CNN
and an MLP 1024-H-H-10 (H=4096: 21M parameters, 63M arrays values with Adam's moments),
with and without checksums, alternating the two in each repeat, each first in every other
repeat (the first repeat warms up and is left out). Both write the same layout (the arrays
and one JSON manifest); "off" leaves the checksums out of the manifest and does not verify
on restore, so the ratio is the cost of the checksums alone. It prints the medians, the
load average before and after each model (the timings are only as steady as the machine)
and, per model, a line

    CHECKPOINT <model> params=<n> mib=<x> save+restore off=<s> on=<s> ratio=<on/off>

The background write is `save s` minus `save call s`.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

import jdl

MIB = 2**20


def host_rss_bytes() -> int:
    """Current resident set size of this process (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def device_bytes() -> tuple[int, str]:
    """(bytes in use on the devices, how they were measured)."""
    stats = [device.memory_stats() for device in jax.local_devices()]
    if all(s and "bytes_in_use" in s for s in stats):
        return sum(s["bytes_in_use"] for s in stats), "memory_stats"
    return sum(array.nbytes for array in jax.live_arrays()), "live_arrays"


def synthetic_data(num_examples: int = 4096, dim: int = 32, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2, (classes, dim))
    y = rng.integers(0, classes, num_examples)
    x = centers[y] + rng.normal(0, 1, (num_examples, dim))
    return {"x": x.astype(np.float32), "y": y.astype(np.int32)}


def run(args: argparse.Namespace, workdir: str | None) -> bool:
    """Runs the soak and prints the samples and the verdict; returns True on PASS."""
    model = jdl.models.MLP(32, (128, 128), 10, rngs=nnx.Rngs(0))
    tx, _ = jdl.make_optimizer("adam", learning_rate=1e-3)
    state = jdl.TrainState.create(model, tx, seed=0)
    data = jdl.InMemoryData(synthetic_data(), batch_size=128, seed=0)
    loss = jdl.classification_loss()
    train_step = jdl.make_train_step(loss)
    eval_step = jdl.make_eval_step(loss)
    eval_data = synthetic_data(num_examples=512, seed=1)

    samples = []  # (step, host bytes, device bytes)
    started = time.perf_counter()
    print(f"{'step':>8} {'host RSS MiB':>13} {'device MiB':>11} {'s':>7}", flush=True)
    for end in range(args.every, args.steps + 1, args.every):
        result = jdl.fit(
            state,
            train_step=train_step,
            train_data=data,
            num_steps=end,
            eval_step=eval_step,
            eval_data=eval_data,
            log_every=min(100, args.every),
            workdir=workdir,
            checkpoint_every=args.every if workdir else 0,
            max_to_keep=2,
            steps_per_dispatch=10,
            progress=False,
        )
        state = result.state
        jax.block_until_ready(state)
        device, how = device_bytes()
        samples.append((end, host_rss_bytes(), device))
        print(
            f"{end:>8} {samples[-1][1] / MIB:>13.1f} {device / MIB:>11.2f} "
            f"{time.perf_counter() - started:>7.1f}",
            flush=True,
        )
    after_warmup = [s for s in samples if s[0] >= args.warmup] or samples[-1:]
    baseline, last = after_warmup[0], samples[-1]
    host_growth = (last[1] - baseline[1]) / MIB
    device_growth = (last[2] - baseline[2]) / MIB
    passed = host_growth <= args.max_host_growth_mib and device_growth <= args.max_device_growth_mib
    print(
        f"device memory measured by {how}; growth measured from step {baseline[0]} to "
        f"step {last[0]}; final train loss {result.train_metrics.get('loss', float('nan')):.4f}"
    )
    print(
        f"SOAK {'PASS' if passed else 'FAIL'} steps={last[0]} "
        f"host_growth_mib={host_growth:.1f} device_growth_mib={device_growth:.2f}",
        flush=True,
    )
    return passed


def checkpoint_states(mlp_hidden: int) -> dict[str, jdl.TrainState]:
    """The states `--checkpoint-overhead` saves: the MNIST CNN and a wide MLP, with Adam."""
    tx, _ = jdl.make_optimizer("adam", learning_rate=1e-3)
    models = {
        "mnist_cnn": jdl.models.MODELS["mnist_cnn"](rngs=nnx.Rngs(0)),
        f"mlp_1024x{mlp_hidden}x{mlp_hidden}": jdl.models.MLP(
            1024, (mlp_hidden, mlp_hidden), 10, rngs=nnx.Rngs(0)
        ),
    }
    return {name: jdl.TrainState.create(model, tx, seed=0) for name, model in models.items()}


def time_checkpoints(state, repeats: int, directory: str) -> dict[str, dict[str, float]]:
    """{"off"|"on": {"save_call", "save", "restore": median seconds}} over `repeats`
    save/restore rounds, checksums off and on alternating within each round, in the order
    off-on, on-off, off-on, ... so that neither always follows the other (the one that
    goes second may find the disk still busy with the first one's writes)."""
    checkpointers = {
        mode: jdl.Checkpointer(os.path.join(directory, mode), max_to_keep=2, checksums=on)
        for mode, on in (("off", False), ("on", True))
    }
    times = {mode: {"save_call": [], "save": [], "restore": []} for mode in checkpointers}
    for step in range(repeats + 1):  # round 0 warms up (compiles, first files)
        order = list(checkpointers.items())
        for mode, checkpointer in order if step % 2 == 0 else order[::-1]:
            jax.block_until_ready(state)
            started = time.perf_counter()
            checkpointer.save(step, state)
            called = time.perf_counter()
            checkpointer.wait()
            saved = time.perf_counter()
            restored = checkpointer.restore(state, step=step)
            jax.block_until_ready(restored.state)
            done = time.perf_counter()
            if step > 0:
                times[mode]["save_call"].append(called - started)
                times[mode]["save"].append(saved - started)
                times[mode]["restore"].append(done - saved)
    for checkpointer in checkpointers.values():
        checkpointer.close()
    return {
        mode: {what: float(np.median(values)) for what, values in by_what.items()}
        for mode, by_what in times.items()
    }


def checkpoint_overhead(args: argparse.Namespace) -> dict[str, float]:
    """Prints the save/restore medians with and without checksums; returns the ratios."""
    ratios = {}
    print(
        f"{'model':>22} {'params':>11} {'MiB':>7} {'checksums':>9} {'save call s':>11} "
        f"{'save s':>8} {'restore s':>9}",
        flush=True,
    )
    for name, state in checkpoint_states(args.mlp_hidden).items():
        leaves = jax.tree.leaves(state)
        mib = sum(np.asarray(jax.random.key_data(x) if _is_key(x) else x).nbytes for x in leaves)
        params = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
        before = _load_average()
        with tempfile.TemporaryDirectory(prefix="jdl-ckpt-bench-") as directory:
            medians = time_checkpoints(state, args.repeats, directory)
        print(f"{name}: load average {before} before, {_load_average()} after", flush=True)
        for mode, m in medians.items():
            print(
                f"{name:>22} {params:>11,} {mib / MIB:>7.1f} {mode:>9} {m['save_call']:>11.4f} "
                f"{m['save']:>8.4f} {m['restore']:>9.4f}",
                flush=True,
            )
        off = medians["off"]["save"] + medians["off"]["restore"]
        on = medians["on"]["save"] + medians["on"]["restore"]
        ratios[name] = on / off
        print(
            f"CHECKPOINT {name} params={params} mib={mib / MIB:.1f} save+restore "
            f"off={off:.4f} on={on:.4f} ratio={on / off:.3f}",
            flush=True,
        )
    return ratios


def _load_average() -> str:
    """The 1, 5 and 15 minute load averages, or "unknown" where the system has none."""
    try:
        return "/".join(f"{load:.2f}" for load in os.getloadavg())
    except OSError:
        return "unknown"


def _is_key(x) -> bool:
    return jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000, help="total training steps")
    parser.add_argument("--every", type=int, default=1_000, help="steps between samples")
    parser.add_argument("--warmup", type=int, default=5_000, help="steps before the baseline")
    parser.add_argument("--max-host-growth-mib", type=float, default=32.0)
    parser.add_argument("--max-device-growth-mib", type=float, default=1.0)
    parser.add_argument("--no-workdir", action="store_true", help="no logs or checkpoints")
    parser.add_argument(
        "--checkpoint-overhead",
        action="store_true",
        help="time checkpoint save/restore with and without checksums instead of the soak",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed checkpoint rounds")
    parser.add_argument("--mlp-hidden", type=int, default=4096, help="width of the timed MLP")
    args = parser.parse_args(argv)
    if args.every < 1 or args.steps < args.every:
        parser.error(f"need 1 <= --every <= --steps, got --every {args.every} --steps {args.steps}")
    return args


def main(argv: Sequence[str] | None = None) -> bool:
    args = parse_args(argv)
    if args.checkpoint_overhead:
        print(
            f"checkpoint overhead: {args.repeats} rounds; devices {jax.devices()}; "
            f"{os.cpu_count()} CPUs"
        )
        checkpoint_overhead(args)
        return True
    print(f"soak: {args.steps} steps, a sample every {args.every}; devices {jax.devices()}")
    if args.no_workdir:
        return run(args, None)
    with tempfile.TemporaryDirectory(prefix="jdl-soak-") as workdir:
        return run(args, os.path.join(workdir, "run"))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
