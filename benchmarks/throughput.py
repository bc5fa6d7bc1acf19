"""Training throughput of `jdl.fit` against a hand-written JAX loop and PyTorch.

Command:
    python -m benchmarks.throughput [--models mnist_mlp,mlp_512,mnist_cnn] [--steps N]
        [--batch-size 128] [--repeats 3] [--dispatch K:U,...] [--no-torch-compile] [--quick]

Every peer trains the same network (same layers and sizes, Adam with learning rate 1e-3,
softmax cross-entropy, same batch size, same number of steps) on the same synthetic
MNIST-shaped data held in memory (a few dozen batches of Gaussian images, random labels):

- jdl: `jdl.fit` with `K` steps per dispatch and scan unroll `U`. A few (K, U) settings are
  timed first with `jdl.make_chunk_runner` (the program `fit` runs) and the fastest is used.
- pure_jax: plain functions over parameter pytrees (no Flax, no optax), one jitted and
  donated `lax.scan` per epoch with on-device batches and a fresh permutation per epoch,
  with the same unroll as jdl. It is the "the framework costs nothing" reference.
- torch_eager: the same model in `torch.nn`, `torch.optim.Adam`, batches pre-made tensors.
- torch_compile: the whole train step (forward, backward, Adam) under `torch.compile`
  with the default inductor backend. If it fails here, its ratio is nan.

What is timed is the steady state: each peer is compiled and warmed up first, then `steps`
training steps are timed with the wall clock (until the final state is ready). Compilation
is excluded for every peer alike. For jdl this takes care: every `fit` call traces, lowers
and compiles its chunk program anew. The XLA compile is served by jdl's persistent
compilation cache (in a temporary directory), and the remaining per-call cost (tracing,
lowering, cache load) is the same for a fit of K steps and a fit of K + `steps` steps, so
jdl's time for `steps` steps is t(fit of K + steps) - t(fit of K). The per-call cost is
printed on its own line.

The machine may be shared, so timings are noisy: the peers are timed in turn (the order
rotates every repeat) and each peer's figure is the median over the repeats. Ratios are
jdl's median throughput over the peer's, all measured in the same run. One line per model:

    RESULT model=<name> jdl_samples_per_s=<x> vs_pure_jax=<r> vs_torch_eager=<r>
        vs_torch_compile=<r>

(on one line; ratio > 1 means jdl is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from jax import lax
from jax.experimental.compilation_cache import compilation_cache
from torch import nn

import jdl

NUM_CLASSES = 10
LEARNING_RATE = 1e-3
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # jdl's, optax's and torch's defaults
TUNE_REPEATS = 2
QUICK = {"steps": 10, "batch_size": 16, "repeats": 1, "epoch_steps": 5, "dispatch": ((5, 1),)}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A benchmarked network.

    Attributes:
      name: the name used on the command line and in RESULT lines.
      description: the layers, for humans.
      example_shape: one input example in JAX layout (images are HWC).
      hidden: MLP hidden sizes; empty for the CNN.
      epoch_steps: batches in the synthetic data set; one epoch is one pure-JAX dispatch.
      default_steps: timed steps per repeat when --steps is not given.
      dispatch: jdl (steps_per_dispatch, unroll) settings to try; the fastest is used.
    """

    name: str
    description: str
    example_shape: tuple[int, ...]
    hidden: tuple[int, ...]
    epoch_steps: int
    default_steps: int
    dispatch: tuple[tuple[int, int], ...]

    @property
    def is_cnn(self) -> bool:
        return len(self.example_shape) == 3


# A rolled scan over these small steps is often not the fastest program on XLA:CPU (the
# CNN's especially), so each model tries a rolled and an unrolled chunk.
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "mnist_mlp", "784-128-10 ReLU MLP", (784,), (128,), 50, 2000, ((50, 1), (50, 5))
        ),
        ModelSpec(
            "mlp_512", "784-512-512-10 ReLU MLP", (784,), (512, 512), 50, 600, ((50, 1), (50, 5))
        ),
        # Seconds per step on XLA:CPU inside a loop (see BENCHMARKS.md): few, short chunks.
        ModelSpec(
            "mnist_cnn",
            "conv3x3 32-relu-maxpool2-conv3x3 64-relu-maxpool2-dense 128-relu-dense 10",
            (28, 28, 1),
            (),
            10,
            20,
            ((5, 1), (5, 5)),
        ),
    )
}


# ----------------------------------------------------------------------------- data


def make_data(spec: ModelSpec, batch_size: int, epoch_steps: int) -> dict[str, np.ndarray]:
    """Synthetic MNIST-shaped data: `epoch_steps` batches, float32 x, int32 y."""
    rng = np.random.default_rng(0)
    num = batch_size * epoch_steps
    return {
        "x": rng.normal(size=(num, *spec.example_shape)).astype(np.float32),
        "y": rng.integers(0, NUM_CLASSES, num).astype(np.int32),
    }


# ----------------------------------------------------------------------------- peers


class Peer(Protocol):
    """One way of training a model: warm up once, then time steady-state steps."""

    name: str

    def warm_up(self) -> None: ...

    def time_steps(self, steps: int) -> float:
        """Seconds to train `steps` more steps, compilation excluded."""
        ...


def build_jdl_model(spec: ModelSpec, rngs: nnx.Rngs) -> nnx.Module:
    if spec.is_cnn:
        return jdl.models.CNN(
            1, NUM_CLASSES, input_shape=spec.example_shape[:2], conv_channels=(32, 64),
            dense_sizes=(128,), rngs=rngs,
        )
    return jdl.models.MLP(spec.example_shape[0], spec.hidden, NUM_CLASSES, rngs=rngs)


class JdlPeer:
    """`jdl.fit`; a fresh state (step 0) per call, so every call runs the same program."""

    name = "jdl"

    def __init__(self, spec: ModelSpec, arrays: dict[str, np.ndarray], batch_size: int,
                 dispatch: tuple[int, int]):
        self.model = build_jdl_model(spec, nnx.Rngs(0))
        self.tx, _ = jdl.make_optimizer("adam", learning_rate=LEARNING_RATE)
        self.data = jdl.InMemoryData(arrays, batch_size=batch_size, seed=0)
        self.train_step = jdl.make_train_step(jdl.classification_loss())
        self.steps_per_dispatch, self.unroll = dispatch
        self.short_fit_seconds: list[float] = []

    def _fit_seconds(self, num_steps: int) -> float:
        state = jdl.TrainState.create(self.model, self.tx, seed=0)  # copies: donation-safe
        start = time.perf_counter()
        result = jdl.fit(
            state, train_step=self.train_step, train_data=self.data, num_steps=num_steps,
            log_every=0, steps_per_dispatch=self.steps_per_dispatch, unroll=self.unroll,
            progress=False,
        )
        jax.block_until_ready(result.state)
        return time.perf_counter() - start

    def warm_up(self) -> None:
        self._fit_seconds(self.steps_per_dispatch)  # compiles and fills the compilation cache

    def time_steps(self, steps: int) -> float:
        # Both fits pay the same per-call cost (trace, lower, cached compile): it cancels.
        short = self._fit_seconds(self.steps_per_dispatch)
        full = self._fit_seconds(self.steps_per_dispatch + steps)
        self.short_fit_seconds.append(short)
        return full - short


def init_pure_params(spec: ModelSpec, key: jax.Array) -> dict[str, list[tuple[jax.Array, ...]]]:
    """{"conv": [(kernel HWIO, bias)], "dense": [(kernel, bias)]}, scaled normal init."""
    if spec.is_cnn:
        conv_sizes, dense_sizes = [1, 32, 64], [7 * 7 * 64, 128, NUM_CLASSES]
    else:
        conv_sizes, dense_sizes = [], [spec.example_shape[0], *spec.hidden, NUM_CLASSES]
    keys = iter(jax.random.split(key, len(conv_sizes) + len(dense_sizes)))

    def layer(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        fan_in = math.prod(shape[:-1])
        kernel = jax.random.normal(next(keys), shape) / math.sqrt(fan_in)
        return kernel, jnp.zeros(shape[-1])

    pairs = lambda sizes: zip(sizes[:-1], sizes[1:], strict=True)
    return {
        "conv": [layer((3, 3, a, b)) for a, b in pairs(conv_sizes)],
        "dense": [layer((a, b)) for a, b in pairs(dense_sizes)],
    }


def pure_forward(params: dict[str, list[tuple[jax.Array, ...]]], x: jax.Array) -> jax.Array:
    """Logits (B, 10) of the MLP or the CNN (NHWC input) described by `params`."""
    for kernel, bias in params["conv"]:
        x = lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(x + bias)
        batch, height, width, channels = x.shape  # 2x2 max pool, as reshape + max
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))
    x = x.reshape(x.shape[0], -1)
    *hidden, (kernel, bias) = params["dense"]
    for hidden_kernel, hidden_bias in hidden:
        x = jax.nn.relu(x @ hidden_kernel + hidden_bias)
    return x @ kernel + bias


def pure_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(pure_forward(params, x))
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def pure_adam(params: Any, grads: Any, mu: Any, nu: Any, count: jax.Array):
    """One Adam update (bias-corrected, eps outside the root), as optax and torch do."""
    count = count + 1
    mu = jax.tree.map(lambda m, g: ADAM_B1 * m + (1 - ADAM_B1) * g, mu, grads)
    nu = jax.tree.map(lambda v, g: ADAM_B2 * v + (1 - ADAM_B2) * g * g, nu, grads)
    mu_scale, nu_scale = 1 / (1 - ADAM_B1**count), 1 / (1 - ADAM_B2**count)
    params = jax.tree.map(
        lambda p, m, v: p - LEARNING_RATE * m * mu_scale / (jnp.sqrt(v * nu_scale) + ADAM_EPS),
        params, mu, nu,
    )
    return params, mu, nu, count


def make_pure_epoch(batch_size: int, unroll: int) -> Callable:
    """Jitted `(state, x, y, key) -> (state, losses)`: one shuffled epoch, state donated."""

    def train_epoch(state, x, y, key):
        steps = x.shape[0] // batch_size
        order = jax.random.permutation(key, x.shape[0])[: steps * batch_size]

        def one_step(state, indices):
            params, mu, nu, count = state
            loss, grads = jax.value_and_grad(pure_loss)(params, x[indices], y[indices])
            return pure_adam(params, grads, mu, nu, count), loss

        return lax.scan(one_step, state, order.reshape(steps, batch_size), unroll=unroll)

    return jax.jit(train_epoch, donate_argnums=(0,))


class PureJaxPeer:
    """The hand-written JAX loop: one dispatch per epoch of `epoch_steps` steps."""

    name = "pure_jax"

    def __init__(self, spec: ModelSpec, arrays: dict[str, np.ndarray], batch_size: int,
                 unroll: int, epoch_steps: int):
        params = init_pure_params(spec, jax.random.PRNGKey(0))
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        self.state = (params, zeros(), zeros(), jnp.zeros((), jnp.float32))
        self.x, self.y = jax.device_put(arrays["x"]), jax.device_put(arrays["y"])
        self.train_epoch = make_pure_epoch(batch_size, unroll)
        self.epoch_steps = epoch_steps
        self.epoch = 0

    def _run_epochs(self, epochs: int) -> None:
        losses = None
        for _ in range(epochs):
            key = jax.random.fold_in(jax.random.PRNGKey(0), self.epoch)
            self.state, losses = self.train_epoch(self.state, self.x, self.y, key)
            self.epoch += 1
        jax.block_until_ready((self.state, losses))

    def warm_up(self) -> None:
        self._run_epochs(1)

    def time_steps(self, steps: int) -> float:
        start = time.perf_counter()
        self._run_epochs(steps // self.epoch_steps)
        return time.perf_counter() - start


def build_torch_model(spec: ModelSpec) -> nn.Module:
    if spec.is_cnn:
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(7 * 7 * 64, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES),
        )
    sizes = [spec.example_shape[0], *spec.hidden]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], NUM_CLASSES))


class TorchPeer:
    """PyTorch on pre-made batch tensors, eager or with the whole step under torch.compile."""

    def __init__(self, spec: ModelSpec, arrays: dict[str, np.ndarray], batch_size: int,
                 compiled: bool):
        self.name = "torch_compile" if compiled else "torch_eager"
        torch.manual_seed(0)
        self.model = build_torch_model(spec)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=LEARNING_RATE, betas=(ADAM_B1, ADAM_B2), eps=ADAM_EPS
        )
        x = arrays["x"].transpose(0, 3, 1, 2) if spec.is_cnn else arrays["x"]  # NHWC -> NCHW
        inputs = torch.from_numpy(np.ascontiguousarray(x)).split(batch_size)
        labels = torch.from_numpy(arrays["y"].astype(np.int64)).split(batch_size)
        self.batches = [(a.contiguous(), b.contiguous()) for a, b in zip(inputs, labels,
                                                                        strict=True)]
        self.step = torch.compile(self._train_step) if compiled else self._train_step
        self.position = 0

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _run(self, steps: int) -> None:
        for _ in range(steps):
            self.step(*self.batches[self.position % len(self.batches)])
            self.position += 1

    def warm_up(self) -> None:
        self._run(3)  # the first steps compile (and create the optimizer state)

    def time_steps(self, steps: int) -> float:
        start = time.perf_counter()
        self._run(steps)
        return time.perf_counter() - start


# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class ModelResult:
    """Median samples/s per peer (nan when a peer could not run) and what was used."""

    name: str
    steps: int
    dispatch: tuple[int, int]
    rates: dict[str, list[float]]
    unavailable: dict[str, str]

    def median(self, peer: str) -> float:
        values = self.rates.get(peer)
        return statistics.median(values) if values else float("nan")

    def ratio(self, peer: str) -> float:
        return self.median("jdl") / self.median(peer)

    def result_line(self) -> str:
        return (
            f"RESULT model={self.name} jdl_samples_per_s={self.median('jdl'):.1f} "
            f"vs_pure_jax={self.ratio('pure_jax'):.3f} "
            f"vs_torch_eager={self.ratio('torch_eager'):.3f} "
            f"vs_torch_compile={self.ratio('torch_compile'):.3f}"
        )


def time_chunk_runner(spec: ModelSpec, arrays: dict[str, np.ndarray], batch_size: int,
                      dispatch: tuple[int, int]) -> Callable[[int], float]:
    """Compiles jdl's chunk program for `dispatch`; returns `seconds(num_chunks)`."""
    data = jdl.InMemoryData(arrays, batch_size=batch_size, seed=0)
    tx, _ = jdl.make_optimizer("adam", learning_rate=LEARNING_RATE)
    state = jdl.TrainState.create(build_jdl_model(spec, nnx.Rngs(0)), tx, seed=0)
    run_chunk = jdl.make_chunk_runner(
        jdl.make_train_step(jdl.classification_loss()), data, *dispatch
    )
    never = jnp.int32(np.iinfo(np.int32).max)  # no step is skipped
    holder = {"state": state}

    def seconds(num_chunks: int) -> float:
        start = time.perf_counter()
        for _ in range(num_chunks):
            holder["state"], metrics = run_chunk(holder["state"], data.arrays, never)
        jax.block_until_ready((holder["state"], metrics))
        return time.perf_counter() - start

    seconds(1)  # compile
    return seconds


def choose_dispatch(spec: ModelSpec, arrays: dict[str, np.ndarray], batch_size: int,
                    candidates: Sequence[tuple[int, int]], tune_steps: int) -> tuple[int, int]:
    """The fastest (steps_per_dispatch, unroll) of `candidates` for jdl, printed."""
    if len(candidates) == 1:
        return candidates[0]
    timers = {c: time_chunk_runner(spec, arrays, batch_size, c) for c in candidates}
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in candidates}
    for _ in range(TUNE_REPEATS):
        for (length, unroll), seconds in timers.items():
            chunks = max(1, tune_steps // length)
            rates[(length, unroll)].append(chunks * length * batch_size / seconds(chunks))
    best = max(candidates, key=lambda c: statistics.median(rates[c]))
    tried = ", ".join(
        f"K={k} unroll={u}: {statistics.median(rates[(k, u)]):,.0f}/s" for k, u in candidates
    )
    print(f"  jdl settings tried (chunk program, samples/s): {tried}", flush=True)
    return best


def make_peers(spec: ModelSpec, arrays: dict[str, np.ndarray], batch_size: int,
               dispatch: tuple[int, int], epoch_steps: int, torch_compile: bool
               ) -> tuple[list[Peer], dict[str, str]]:
    """The warmed-up peers, and {peer: reason} for those that could not run."""
    factories: dict[str, Callable[[], Peer]] = {
        "jdl": lambda: JdlPeer(spec, arrays, batch_size, dispatch),
        "pure_jax": lambda: PureJaxPeer(spec, arrays, batch_size, dispatch[1], epoch_steps),
        "torch_eager": lambda: TorchPeer(spec, arrays, batch_size, compiled=False),
        "torch_compile": lambda: TorchPeer(spec, arrays, batch_size, compiled=True),
    }
    peers: list[Peer] = []
    unavailable: dict[str, str] = {}
    for name, factory in factories.items():
        if name == "torch_compile" and not torch_compile:
            unavailable[name] = "skipped (--no-torch-compile)"
            continue
        start = time.perf_counter()
        try:
            peer = factory()
            peer.warm_up()
        except Exception as error:  # noqa: BLE001 - torch.compile may fail on a host
            if name != "torch_compile":
                raise
            unavailable[name] = f"failed: {type(error).__name__}: {str(error)[:200]}"
            print(f"  torch_compile unavailable on this machine: {unavailable[name]}", flush=True)
            continue
        print(f"  {name}: compiled and warmed up in {time.perf_counter() - start:.1f} s",
              flush=True)
        peers.append(peer)
    return peers, unavailable


def measure(peers: Sequence[Peer], steps: int, batch_size: int, repeats: int
            ) -> dict[str, list[float]]:
    """Samples/s per peer and repeat; the order rotates so no peer always follows another."""
    rates: dict[str, list[float]] = {peer.name: [] for peer in peers}
    for repeat in range(repeats):
        shift = repeat % len(peers)
        for peer in [*peers[shift:], *peers[:shift]]:
            rates[peer.name].append(steps * batch_size / peer.time_steps(steps))
    return rates


def benchmark_model(spec: ModelSpec, args: argparse.Namespace) -> ModelResult:
    steps = args.steps or spec.default_steps
    epoch_steps = args.epoch_steps or spec.epoch_steps
    print(f"model {spec.name}: {spec.description}; batch {args.batch_size}, "
          f"{epoch_steps} batches of data", flush=True)
    arrays = make_data(spec, args.batch_size, epoch_steps)
    candidates = args.dispatch or spec.dispatch
    dispatch = choose_dispatch(spec, arrays, args.batch_size, candidates, steps // 4)
    # Whole epochs for the pure-JAX loop and whole chunks for jdl: no partial dispatch.
    multiple = math.lcm(epoch_steps, dispatch[0])
    steps = -(-steps // multiple) * multiple
    print(f"  jdl uses steps_per_dispatch={dispatch[0]} unroll={dispatch[1]}; "
          f"pure_jax uses unroll={dispatch[1]}; {steps} timed steps per repeat", flush=True)
    peers, unavailable = make_peers(
        spec, arrays, args.batch_size, dispatch, epoch_steps, args.torch_compile
    )
    rates = measure(peers, steps, args.batch_size, args.repeats)
    result = ModelResult(spec.name, steps, dispatch, rates, unavailable)
    print_details(result, peers)
    return result


def print_details(result: ModelResult, peers: Sequence[Peer]) -> None:
    for name, values in result.rates.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {name:13s} median {result.median(name):>10,.0f} samples/s  (repeats: {runs})")
    for name, reason in result.unavailable.items():
        print(f"  {name:13s} nan: {reason}")
    jdl_peer = next(p for p in peers if isinstance(p, JdlPeer))
    per_step = 1 / (result.median("jdl") / jdl_peer.data.batch_size)
    per_call = statistics.median(jdl_peer.short_fit_seconds) - jdl_peer.steps_per_dispatch * per_step
    print(f"  jdl.fit per-call cost outside the steps (trace, lower, cached compile): "
          f"{per_call:.2f} s", flush=True)


# ----------------------------------------------------------------------------- entry point


@contextlib.contextmanager
def benchmark_environment(threads: int) -> Iterator[None]:
    """jdl's persistent compilation cache in a temporary directory and torch on `threads`
    threads, both restored afterwards (the benchmark also runs inside test processes)."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    saved_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="jdl-throughput-xla-") as path:
        jdl.enable_compilation_cache(path)
        compilation_cache.reset_cache()  # a cache looked up earlier (while off) is re-read
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(saved_threads)
            for name, value in saved.items():
                jax.config.update(name, value)
            compilation_cache.reset_cache()


def parse_dispatch(text: str) -> tuple[tuple[int, int], ...]:
    """'50:1,50:5' -> ((50, 1), (50, 5))."""
    try:
        return tuple(
            (int(k), int(u)) for k, u in (item.split(":") for item in text.split(","))
        )
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected K:U[,K:U...], got {text!r}") from error


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=0,
                        help="timed steps per repeat (default: per model)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dispatch", type=parse_dispatch, default=None,
                        help="jdl steps_per_dispatch:unroll settings to try, e.g. 50:1,50:5 "
                             "(default: per model)")
    parser.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                        help="skip torch.compile (its ratio is reported as nan)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: the usable cores)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run: 10 steps of batch 16, one repeat, K=5 unroll=1")
    args = parser.parse_args(argv)
    args.epoch_steps = 0  # per model
    if args.quick:
        args.steps = args.steps or QUICK["steps"]
        args.batch_size, args.repeats = QUICK["batch_size"], QUICK["repeats"]
        args.epoch_steps, args.dispatch = QUICK["epoch_steps"], args.dispatch or QUICK["dispatch"]
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if min(args.steps, args.batch_size - 1, args.repeats - 1) < 0:
        parser.error("--steps must be >= 0, --batch-size and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[ModelResult]:
    """Runs the benchmark, prints detail lines and one RESULT line per model."""
    args = parse_args(argv)
    print(
        f"jdl {jdl.__version__} training throughput: jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({args.threads} threads), "
        f"{os.cpu_count()} CPU cores; batch {args.batch_size}, {args.repeats} repeats, "
        f"medians",
        flush=True,
    )
    results = []
    with benchmark_environment(args.threads):
        for name in args.models:
            results.append(benchmark_model(MODELS[name], args))
            print(results[-1].result_line(), flush=True)
    return results


if __name__ == "__main__":
    main()
