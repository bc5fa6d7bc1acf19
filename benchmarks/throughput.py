"""Training throughput of `jdl.fit` against a hand-written JAX loop and PyTorch.

Command:
    python -m benchmarks.throughput [--models mnist_mlp,mlp_512,mnist_cnn] [--steps N]
        [--batch-size 128] [--repeats 3] [--settings K:U[:cpu],...] [--threads T]
        [--no-torch-compile] [--quick]

Every peer trains the same network (same layers and sizes, Adam with learning rate 1e-3,
softmax cross-entropy, same batch size, same number of steps) on the same synthetic
MNIST-shaped data held in memory (a few dozen batches of Gaussian images, random labels):

- jdl: `jdl.fit` with K steps per dispatch and unroll U (for the CNN also with or without
  `CNN(cpu_kernels=True)`). A few settings per model are timed first (with `fit` itself)
  and the fastest is used; the line "settings: ..." says which.
- pure_jax: the "framework costs nothing" reference: plain functions over parameter
  pytrees (no Flax, no optax), a hand-written Adam, one jitted and donated program per K
  steps with jdl's K and unroll (`lax.scan`, or straight-line steps when fully unrolled),
  batches gathered on the device from a fresh permutation per epoch. When jdl's CNN uses
  `cpu_kernels`, the reference calls the same convolution and pooling functions.
- torch_eager: the same model in `torch.nn` (NCHW), `torch.optim.Adam` with its defaults,
  batches pre-made tensors in memory, `torch.set_num_threads(--threads)`.
- torch_compile: the whole torch train step (forward, backward, Adam) under
  `torch.compile` with the default inductor backend. If it fails, the reason is printed and
  its ratio is nan.

What is timed is the steady state: every peer is compiled and warmed up first, then each
repeat times `--steps` training steps with the wall clock, until the final state is ready.
Compilation is excluded for every peer alike. `jdl.fit` builds and compiles its chunk
program on every call, so the warm-up fit compiles it once and the timed fits get that
same program back (`JdlPeer`); everything else `fit` does is timed. What a fresh `fit`
call costs on top of its steps is printed on its own line.

The machine may be shared with other work, so timings are noisy: the peers are timed in
turn (the order rotates every repeat) and each peer's figure is its median over the
repeats. Ratios are jdl's median throughput over the peer's, measured in the same run;
above 1 means jdl is faster. After the detail lines of each model comes one line:

    RESULT model=<name> jdl_samples_per_s=<x> vs_pure_jax=<r> vs_torch_eager=<r> \
vs_torch_compile=<r>
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from jax import lax
from torch import nn

import jdl
from jdl.models import cpu_kernels as jdl_kernels

NUM_CLASSES = 10
LEARNING_RATE = 1e-3
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # the defaults of jdl (optax) and torch
TUNE_REPEATS = 2
PEERS = ("jdl", "pure_jax", "torch_eager", "torch_compile")
Arrays = dict[str, np.ndarray]


class Setting(NamedTuple):
    """How jdl runs a model.

    Attributes:
      steps_per_dispatch: K, training steps per compiled chunk.
      unroll: U, the chunk's `lax.scan` unroll; True writes the K steps out in full.
      cpu_kernels: CNN only: `CNN(cpu_kernels=True)`, convolution and pooling gradients that
        stay fast inside XLA:CPU loops (`jdl.models.cpu_kernels`).
    """

    steps_per_dispatch: int
    unroll: int | bool
    cpu_kernels: bool = False

    def __str__(self) -> str:
        unroll = "full" if self.unroll is True else self.unroll
        kernels = " cpu_kernels" if self.cpu_kernels else ""
        return f"K={self.steps_per_dispatch} unroll={unroll}{kernels}"


QUICK = {
    "steps": 10,
    "batch_size": 16,
    "repeats": 1,
    "epoch_steps": 5,
    "settings": (Setting(5, 1),),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A benchmarked network and how it is run.

    Attributes:
      name: the name used on the command line and in RESULT lines.
      description: the layers, for humans.
      example_shape: one input example in JAX layout (images are HWC).
      hidden: MLP hidden sizes; empty for the CNN.
      epoch_steps: batches in the synthetic data set (an epoch).
      default_steps: timed steps per repeat when --steps is not given.
      settings: jdl settings to try; each K must divide `epoch_steps`.
    """

    name: str
    description: str
    example_shape: tuple[int, ...]
    hidden: tuple[int, ...]
    epoch_steps: int
    default_steps: int
    settings: tuple[Setting, ...]

    @property
    def is_cnn(self) -> bool:
        return len(self.example_shape) == 3


# Settings tried for jdl. Dense models: rolled or lightly unrolled scans compiled faster and
# ran faster than straight-line chunks here. The CNN: plain convolutions inside an XLA:CPU
# loop body run over an order of magnitude slower, so they are only tried fully unrolled;
# with cpu_kernels a rolled scan is fine.
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "mnist_mlp",
            "784-128-10 ReLU MLP",
            (784,),
            (128,),
            50,
            2000,
            (Setting(50, 1), Setting(50, 5)),
        ),
        ModelSpec(
            "mlp_512",
            "784-512-512-10 ReLU MLP",
            (784,),
            (512, 512),
            50,
            600,
            (Setting(50, 1), Setting(50, 5)),
        ),
        ModelSpec(
            "mnist_cnn",
            "conv3x3 32-relu-maxpool2-conv3x3 64-relu-maxpool2-dense 128-relu-dense 10",
            (28, 28, 1),
            (),
            10,
            60,
            (
                Setting(10, True),
                Setting(10, 1, cpu_kernels=True),
                Setting(10, True, cpu_kernels=True),
            ),
        ),
    )
}


def make_data(spec: ModelSpec, batch_size: int, epoch_steps: int) -> Arrays:
    """Synthetic MNIST-shaped data: `epoch_steps` batches, float32 x, int32 y."""
    rng = np.random.default_rng(0)
    num = batch_size * epoch_steps
    return {
        "x": rng.normal(size=(num, *spec.example_shape)).astype(np.float32),
        "y": rng.integers(0, NUM_CLASSES, num).astype(np.int32),
    }


class Peer(Protocol):
    """One way of training a model: warm up once, then time steady-state steps."""

    name: str

    def warm_up(self) -> None: ...

    def time_steps(self, steps: int) -> float:
        """Seconds to train `steps` more steps, compilation excluded."""
        ...


# ----------------------------------------------------------------------------- jdl


def build_jdl_model(spec: ModelSpec, rngs: nnx.Rngs, cpu_kernels: bool = False) -> nnx.Module:
    if spec.is_cnn:
        return jdl.models.CNN(
            1,
            NUM_CLASSES,
            input_shape=spec.example_shape[:2],
            conv_channels=(32, 64),
            dense_sizes=(128,),
            cpu_kernels=cpu_kernels,
            rngs=rngs,
        )
    return jdl.models.MLP(spec.example_shape[0], spec.hidden, NUM_CLASSES, rngs=rngs)


class JdlPeer:
    """`jdl.fit` from a fresh state (step 0) per call, so every call runs the same program.

    Compilation is excluded for every peer: the warm-up fit compiles the chunk program,
    and the timed fits get the same program back from `fit`'s own cache (it is kept per
    train step, data set-up, K and unroll). Everything else `fit` does is timed as it is.
    """

    name = "jdl"

    def __init__(self, spec: ModelSpec, arrays: Arrays, batch_size: int, setting: Setting):
        self.model = build_jdl_model(spec, nnx.Rngs(0), setting.cpu_kernels)
        self.tx, _ = jdl.make_optimizer("adam", learning_rate=LEARNING_RATE)
        self.data = jdl.InMemoryData(arrays, batch_size=batch_size, seed=0)
        self.train_step = jdl.make_train_step(jdl.classification_loss())
        self.setting = setting

    def fit_seconds(self, num_steps: int) -> float:
        """Wall time of one `jdl.fit` call."""
        state = jdl.TrainState.create(self.model, self.tx, seed=0)  # copies: donation-safe
        start = time.perf_counter()
        result = jdl.fit(
            state,
            train_step=self.train_step,
            train_data=self.data,
            num_steps=num_steps,
            log_every=0,
            steps_per_dispatch=self.setting.steps_per_dispatch,
            unroll=self.setting.unroll,
            progress=False,
        )
        jax.block_until_ready(result.state)
        return time.perf_counter() - start

    def warm_up(self) -> None:
        self.fit_seconds(self.setting.steps_per_dispatch)  # compiles the program reused below

    def time_steps(self, steps: int) -> float:
        return self.fit_seconds(steps)


# ----------------------------------------------------------------------------- pure JAX

PureParams = dict[str, list[tuple[jax.Array, jax.Array]]]


def init_pure_params(spec: ModelSpec, key: jax.Array) -> PureParams:
    """{"conv": [(kernel HWIO, bias)], "dense": [(kernel, bias)]}, scaled normal init."""
    if spec.is_cnn:
        conv_sizes, dense_sizes = [1, 32, 64], [7 * 7 * 64, 128, NUM_CLASSES]
    else:
        conv_sizes, dense_sizes = [], [spec.example_shape[0], *spec.hidden, NUM_CLASSES]
    keys = iter(jax.random.split(key, len(conv_sizes) + len(dense_sizes)))

    def layer(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        kernel = jax.random.normal(next(keys), shape) / math.sqrt(math.prod(shape[:-1]))
        return kernel, jnp.zeros(shape[-1])

    pairs = lambda sizes: zip(sizes[:-1], sizes[1:], strict=True)
    return {
        "conv": [layer((3, 3, a, b)) for a, b in pairs(conv_sizes)],
        "dense": [layer((a, b)) for a, b in pairs(dense_sizes)],
    }


def pure_forward(params: PureParams, x: jax.Array, cpu_kernels: bool = False) -> jax.Array:
    """Logits (B, 10) of the MLP or the CNN (NHWC input) described by `params`.

    `cpu_kernels`: convolution and pooling from `jdl.models.cpu_kernels` (plain functions),
    as jdl's `CNN(cpu_kernels=True)` computes them.
    """
    for kernel, bias in params["conv"]:
        if cpu_kernels:
            x = jax.nn.relu(jdl_kernels.conv2d_same(x, kernel) + bias)
            x = jdl_kernels.max_pool_2x2(x)
            continue
        x = lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(x + bias)
        batch, height, width, channels = x.shape  # 2x2 max pool as reshape + max, like jdl
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))
    x = x.reshape(x.shape[0], -1)
    *hidden, (kernel, bias) = params["dense"]
    for hidden_kernel, hidden_bias in hidden:
        x = jax.nn.relu(x @ hidden_kernel + hidden_bias)
    return x @ kernel + bias


def pure_loss(params: PureParams, x: jax.Array, y: jax.Array, cpu_kernels: bool) -> jax.Array:
    log_probs = jax.nn.log_softmax(pure_forward(params, x, cpu_kernels))
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def pure_adam(params: Any, grads: Any, mu: Any, nu: Any, count: jax.Array) -> tuple[Any, ...]:
    """One Adam update (bias-corrected, eps outside the root), as optax and torch do."""
    count = count + 1
    mu = jax.tree.map(lambda m, g: ADAM_B1 * m + (1 - ADAM_B1) * g, mu, grads)
    nu = jax.tree.map(lambda v, g: ADAM_B2 * v + (1 - ADAM_B2) * g * g, nu, grads)
    mu_scale, nu_scale = 1 / (1 - ADAM_B1**count), 1 / (1 - ADAM_B2**count)
    params = jax.tree.map(
        lambda p, m, v: p - LEARNING_RATE * m * mu_scale / (jnp.sqrt(v * nu_scale) + ADAM_EPS),
        params,
        mu,
        nu,
    )
    return params, mu, nu, count


def make_pure_chunk(setting: Setting) -> Callable:
    """Jitted `(state, x, y, order, start) -> (state, losses)`, state donated.

    Runs `length` steps on the batches `order[start : start + length]` (rows of example
    indices), gathered on the device. Like jdl's chunks: straight-line steps when `unroll`
    is True or >= `length`, else a `lax.scan` with that unroll.
    """

    length, unroll, cpu_kernels = setting

    def train_chunk(state, x, y, order, start):
        def one_step(state, indices):
            params, mu, nu, count = state
            loss, grads = jax.value_and_grad(pure_loss)(params, x[indices], y[indices], cpu_kernels)
            return pure_adam(params, grads, mu, nu, count), loss

        rows = lax.dynamic_slice_in_dim(order, start, length)
        if unroll is True or unroll >= length:
            losses = []
            for i in range(length):
                state, loss = one_step(state, rows[i])
                losses.append(loss)
            return state, jnp.stack(losses)
        return lax.scan(one_step, state, rows, unroll=unroll)

    return jax.jit(train_chunk, donate_argnums=(0,))


class PureJaxPeer:
    """The hand-written JAX loop, run with jdl's setting (K steps per dispatch, unroll)."""

    name = "pure_jax"

    def __init__(
        self,
        spec: ModelSpec,
        arrays: Arrays,
        batch_size: int,
        setting: Setting,
        epoch_steps: int,
    ):
        params = init_pure_params(spec, jax.random.PRNGKey(0))
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        self.state = (params, zeros(), zeros(), jnp.zeros((), jnp.float32))
        self.x, self.y = jax.device_put(arrays["x"]), jax.device_put(arrays["y"])
        self.length = setting.steps_per_dispatch
        self.train_chunk = make_pure_chunk(setting)
        num = epoch_steps * batch_size
        self.shuffle = jax.jit(  # one permutation per epoch, as rows of batch indices
            lambda key: jax.random.permutation(key, num).reshape(epoch_steps, batch_size)
        )
        self.epoch_steps = epoch_steps
        self.epoch = 0

    def _run_epochs(self, epochs: int) -> None:
        losses = None
        for _ in range(epochs):
            order = self.shuffle(jax.random.fold_in(jax.random.PRNGKey(0), self.epoch))
            for start in range(0, self.epoch_steps, self.length):
                self.state, losses = self.train_chunk(self.state, self.x, self.y, order, start)
            self.epoch += 1
        jax.block_until_ready((self.state, losses))

    def warm_up(self) -> None:
        self._run_epochs(1)

    def time_steps(self, steps: int) -> float:
        start = time.perf_counter()
        self._run_epochs(steps // self.epoch_steps)
        return time.perf_counter() - start


# ----------------------------------------------------------------------------- PyTorch


def build_torch_model(spec: ModelSpec) -> nn.Module:
    if spec.is_cnn:
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(7 * 7 * 64, 128),
            nn.ReLU(),
            nn.Linear(128, NUM_CLASSES),
        )
    sizes = [spec.example_shape[0], *spec.hidden]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], NUM_CLASSES))


class TorchPeer:
    """PyTorch on pre-made batch tensors, eager or with the whole step under torch.compile."""

    def __init__(self, spec: ModelSpec, arrays: Arrays, batch_size: int, compiled: bool):
        self.name = "torch_compile" if compiled else "torch_eager"
        torch.manual_seed(0)
        self.model = build_torch_model(spec)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=LEARNING_RATE, betas=(ADAM_B1, ADAM_B2), eps=ADAM_EPS
        )
        x = arrays["x"].transpose(0, 3, 1, 2) if spec.is_cnn else arrays["x"]  # NHWC -> NCHW
        inputs = torch.from_numpy(np.ascontiguousarray(x)).split(batch_size)
        labels = torch.from_numpy(arrays["y"].astype(np.int64)).split(batch_size)
        self.batches = list(zip(inputs, labels, strict=True))  # views of contiguous rows
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
    """Samples/s per peer and repeat, and why a peer has none."""

    name: str
    steps: int
    setting: Setting
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


def choose_jdl_peer(
    spec: ModelSpec,
    arrays: Arrays,
    batch_size: int,
    candidates: Sequence[Setting],
    tune_steps: int,
) -> JdlPeer:
    """The warmed-up jdl peer with the fastest of the `candidates` settings, printed."""
    peers = [JdlPeer(spec, arrays, batch_size, setting) for setting in candidates]
    for peer in peers:
        peer.warm_up()
    if len(peers) == 1:
        return peers[0]
    rates: list[list[float]] = [[] for _ in peers]
    for _ in range(TUNE_REPEATS):
        for peer, peer_rates in zip(peers, rates, strict=True):
            length = peer.setting.steps_per_dispatch
            steps = max(1, tune_steps // length) * length
            peer_rates.append(steps * batch_size / peer.time_steps(steps))
    medians = [statistics.median(peer_rates) for peer_rates in rates]
    tried = ", ".join(
        f"{peer.setting}: {rate:,.0f}" for peer, rate in zip(peers, medians, strict=True)
    )
    print(f"  jdl settings tried (samples/s, median of {TUNE_REPEATS}): {tried}", flush=True)
    return peers[medians.index(max(medians))]


def make_peers(
    spec: ModelSpec,
    arrays: Arrays,
    batch_size: int,
    jdl_peer: JdlPeer,
    epoch_steps: int,
    torch_compile: bool,
) -> tuple[list[Peer], dict[str, str]]:
    """The warmed-up peers (jdl first), and {peer: reason} for those that could not run."""
    factories: dict[str, Callable[[], Peer]] = {
        "pure_jax": lambda: PureJaxPeer(spec, arrays, batch_size, jdl_peer.setting, epoch_steps),
        "torch_eager": lambda: TorchPeer(spec, arrays, batch_size, compiled=False),
        "torch_compile": lambda: TorchPeer(spec, arrays, batch_size, compiled=True),
    }
    peers: list[Peer] = [jdl_peer]
    unavailable: dict[str, str] = {}
    for name, factory in factories.items():
        if name == "torch_compile" and not torch_compile:
            unavailable[name] = "skipped (--no-torch-compile)"
            continue
        peer = start_peer(name, factory)
        if isinstance(peer, str):
            unavailable[name] = peer
        else:
            peers.append(peer)
    return peers, unavailable


def start_peer(name: str, factory: Callable[[], Peer]) -> Peer | str:
    """The built and warmed-up peer, or why torch_compile could not run (other peers raise)."""
    start = time.perf_counter()
    try:
        peer = factory()
        peer.warm_up()
    except Exception as error:  # torch.compile needs a working C++ toolchain, among others
        if name != "torch_compile":
            raise
        reason = f"failed here: {type(error).__name__}: {str(error).strip()[:300]}"
        print(f"  {name} unavailable: {reason}", flush=True)
        return reason
    print(f"  {name}: compiled and warmed up in {time.perf_counter() - start:.1f} s", flush=True)
    return peer


def measure(
    peers: Sequence[Peer], steps: int, batch_size: int, repeats: int
) -> dict[str, list[float]]:
    """Samples/s per peer and repeat; the order rotates so no peer always follows another."""
    rates: dict[str, list[float]] = {peer.name: [] for peer in peers}
    for repeat in range(repeats):
        shift = repeat % len(peers)
        for peer in [*peers[shift:], *peers[:shift]]:
            rates[peer.name].append(steps * batch_size / peer.time_steps(steps))
    return rates


def benchmark_model(spec: ModelSpec, args: argparse.Namespace) -> ModelResult:
    epoch_steps = args.epoch_steps or spec.epoch_steps
    candidates = args.settings or spec.settings
    if any(epoch_steps % setting.steps_per_dispatch for setting in candidates):
        raise ValueError(f"every K of {candidates} must divide the epoch ({epoch_steps} steps)")
    # Whole epochs: the pure-JAX loop and jdl run the same whole chunks.
    steps = -(-(args.steps or spec.default_steps) // epoch_steps) * epoch_steps
    print(
        f"model {spec.name}: {spec.description}; batch {args.batch_size}, "
        f"{epoch_steps} batches of data, {steps} timed steps per repeat",
        flush=True,
    )
    arrays = make_data(spec, args.batch_size, epoch_steps)
    start = time.perf_counter()
    jdl_peer = choose_jdl_peer(spec, arrays, args.batch_size, candidates, steps // 4)
    print(
        f"  jdl: compiled, warmed up and tuned in {time.perf_counter() - start:.1f} s", flush=True
    )
    print(
        f"  settings: jdl.fit {jdl_peer.setting}; pure_jax the same",
        flush=True,
    )
    peers, unavailable = make_peers(
        spec, arrays, args.batch_size, jdl_peer, epoch_steps, args.torch_compile
    )
    rates = measure(peers, steps, args.batch_size, args.repeats)
    result = ModelResult(spec.name, steps, jdl_peer.setting, rates, unavailable)
    print_rates(result)
    if not args.quick:
        print_fit_call_cost(jdl_peer, result.median("jdl"))
    return result


def print_rates(result: ModelResult) -> None:
    for name in PEERS:
        if name in result.rates:
            runs = ", ".join(f"{value:,.0f}" for value in result.rates[name])
            print(f"  {name:13s} {result.median(name):>10,.0f} samples/s (repeats: {runs})")
        else:
            print(f"  {name:13s} {'nan':>10s} ({result.unavailable[name]})")


def print_fit_call_cost(jdl_peer: JdlPeer, samples_per_second: float) -> None:
    """What a fresh `fit` call costs on top of its steps: it compiles its own program."""
    length = jdl_peer.setting.steps_per_dispatch
    seconds = jdl_peer.fit_seconds(length)
    outside = seconds - length * jdl_peer.data.batch_size / samples_per_second
    print(
        f"  jdl.fit compiles its chunk program on every call: a fresh fit of {length} steps "
        f"took {seconds:.1f} s, {outside:.1f} s of it outside the steps",
        flush=True,
    )


# ----------------------------------------------------------------------------- entry point


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch on `threads` threads, restored afterwards (the benchmark also runs in tests)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def parse_settings(text: str) -> tuple[Setting, ...]:
    """'50:1,10:full,10:1:cpu' -> (Setting(50, 1), Setting(10, True), Setting(10, 1, True))."""
    settings = []
    for item in text.split(","):
        parts = item.split(":")
        try:
            if len(parts) not in (2, 3) or parts[2:] not in ([], ["cpu"]):
                raise ValueError(item)
            unroll = True if parts[1] == "full" else int(parts[1])
            settings.append(Setting(int(parts[0]), unroll, parts[2:] == ["cpu"]))
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"expected K:U[:cpu],... with U an int or 'full', got {text!r}"
            ) from error
    return tuple(settings)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--steps", type=int, default=0, help="timed steps per repeat (default: per model)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--settings",
        type=parse_settings,
        default=None,
        help="jdl steps_per_dispatch:unroll[:cpu] settings to try, e.g. 50:1,10:full,10:1:cpu "
        "(cpu: CNN(cpu_kernels=True); default: per model)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads (default: the usable CPU cores)",
    )
    parser.add_argument(
        "--no-torch-compile",
        dest="torch_compile",
        action="store_false",
        help="skip torch.compile (its ratio is then nan)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: 10 steps of batch 16, one repeat, K=5 unroll=1",
    )
    args = parser.parse_args(argv)
    args.epoch_steps = 0  # per model
    if args.quick:
        args.steps = args.steps or QUICK["steps"]
        args.batch_size, args.repeats = QUICK["batch_size"], QUICK["repeats"]
        args.epoch_steps, args.settings = QUICK["epoch_steps"], args.settings or QUICK["settings"]
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if args.steps < 0 or args.batch_size < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--steps must be >= 0; --batch-size, --repeats and --threads >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[ModelResult]:
    """Runs the benchmark: detail lines, then one RESULT line per model."""
    args = parse_args(argv)
    print(
        f"jdl {jdl.__version__} training throughput; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({args.threads} threads), "
        f"{os.cpu_count()} CPU cores; {args.repeats} repeats, medians",
        flush=True,
    )
    results = []
    with torch_threads(args.threads):
        for name in args.models:
            results.append(benchmark_model(MODELS[name], args))
            print(results[-1].result_line(), flush=True)
    return results


if __name__ == "__main__":
    main()
