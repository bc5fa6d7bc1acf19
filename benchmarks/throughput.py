"""Training throughput and model FLOP utilisation of `jdl.fit`, against pure JAX and PyTorch.

Command:
    python -m benchmarks.throughput [--models mnist_mlp,...,vit] [--steps N] [--batch-size B]
        [--seq-len T] [--repeats 3] [--settings K:U[:cpu],...] [--threads T]
        [--peak-size N] [--no-torch-compile] [--quick]

Models (every family of jdl's zoo, each built from `jdl.models`; synthetic data held in
memory, a few batches' worth, reshuffled every epoch; softmax cross-entropy; Adam with
learning rate 1e-3; the same batch size and number of steps in every peer):

| model | network | data | batch |
|---|---|---|---|
| mnist_mlp | `MLP` 784-128-10, ReLU | 784 Gaussian features, 10 classes | 128 |
| mlp_512 | `MLP` 784-512-512-10, ReLU | as mnist_mlp | 128 |
| mnist_cnn | `CNN` conv32-pool-conv64-pool-dense128 | 28x28x1 images, 10 classes | 128 |
| resnet20 | `resnet20` (0.27M parameters, batch norm) | 32x32x3 images, 10 classes | 128 |
| lstm | `CharLM`, embedding 64, LSTM 256 | windows of 64 of 65 tokens | 64 |
| gpt_small | `gpt_small`, GPT-2 small (124M) | windows of 128 of 50,257 tokens | 4 |
| vit | `vit_cifar`, 6 layers of width 192 | 32x32x3 images, 10 classes | 128 |

The LSTM's sizes are the defaults of `experiments/charlm_lstm.py` (vocabulary 65, the
characters of tinyshakespeare.txt). The language models predict the next token at every
position of uniformly random token windows (the loss of `experiments/charlm_common.py`);
their "samples" are sequences: samples/s means windows/s (tokens/s = that x T).
`--seq-len` sets T of both language models. Dropout is off in every peer.

Peers:

- jdl: `jdl.fit` with K steps per dispatch and unroll U (for the CNN also with or without
  `CNN(cpu_kernels=True)`), on `jdl.InMemoryData`, with `jdl.make_train_step` over
  `jdl.classification_loss` (language models: `experiments.charlm_common.lm_loss`) and
  `norm_metrics=False`: the step computes what the pure-JAX step computes (the loss and
  its mean) plus the accuracy, not the per-step gradient and parameter norms. A
  few settings per model are timed first (with `fit` itself) and the fastest is used;
  the line "settings: ..." says which. Models with convolutions get straight-line
  chunks (BENCHMARKS.md, finding 2).
- jdl_norms (the three original models only; a detail line, not in RESULT): the same
  with `make_train_step`'s default `norm_metrics=True`, i.e. with the two global norms
  every step, to show what those metrics cost.
- pure_jax: the "framework costs nothing" reference: one jitted and donated program per
  K steps with jdl's K and unroll (`lax.scan`, or straight-line steps when fully
  unrolled), a hand-written Adam and softmax cross-entropy, batches gathered on the
  device from a fresh permutation per epoch. For the three original models the network
  is plain functions over parameter pytrees (no Flax, no optax; with `cpu_kernels` the
  same convolution and pooling functions as jdl's CNN). For the zoo models it is the
  same jdl NNX module, split once (`nnx.split`) and merged inside the jitted program,
  with batch-norm statistics carried and updated as jdl does: the difference to jdl is
  then what jdl's loop and step add around the model (optax, metrics, data sampling).
  Compiled with jdl's XLA options (`jdl.compiler`), as jdl's programs are, so the ratio
  measures the loop and not the choice of kernels (`benchmarks.xla_cpu_options` measures
  that choice).
- torch_eager: the same network in `torch.nn` (`benchmarks/zoo_peers.py` for the zoo
  models; NCHW for the convolutional ones), `torch.optim.Adam` with its defaults, batches
  pre-made tensors in memory, `torch.set_num_threads(--threads)`. The trainable
  parameter counts of the torch and jdl networks are checked equal and printed.
- torch_compile: the whole torch train step (forward, backward, Adam) under
  `torch.compile` with the default inductor backend. If it fails, the reason is printed and
  its ratio is nan.

What is timed is the steady state: every peer is compiled and warmed up first, then each
repeat times `--steps` training steps with the wall clock, until the final state is ready.
Compilation is excluded for every peer alike. The warm-up `jdl.fit` compiles the chunk
program and the timed fits get it back from `fit`'s own cache (`JdlPeer`); everything else
`fit` does is timed. What one more `fit` call costs on top of its steps is printed on its
own line. (Models are initialised with the non-partitionable threefry PRNG, which XLA:CPU
compiles several times faster; that is set-up only, never timed.)

Defaults: timed steps per repeat 2000 (mnist_mlp), 600 (mlp_512), 60 (mnist_cnn), 8
(resnet20), 40 (lstm), 16 (gpt_small: seconds per step), 16 (vit), rounded up to whole
epochs of the synthetic data; jdl settings tried: K=50 with unroll 1 or 5 (MLPs); K=10
fully unrolled, or rolled or unrolled with cpu_kernels (CNN); K=2 fully unrolled
(resnet20); K=10 with unroll 1 or full (lstm); K=2 unroll 1 (gpt_small); K=2 with unroll
1 or full (vit).
`--steps` sets one number for all models, `--settings` one list of settings.

MFU (model FLOP utilisation) is jdl's achieved model FLOP/s over the machine's peak:
`mfu = model FLOPs per step * jdl steps/s / peak`.

- Peak: measured once at the start, the best of a few float32 N x N matrix products
  (`--peak-size`, default 4096) in XLA (a jitted `jnp.dot`) and in torch (on the
  benchmark's threads); the peak is the larger. Printed as
  `peak: xla=<x> GFLOP/s torch=<y> GFLOP/s (matmul NxN fp32)`.
- Model FLOPs per step: the matmul and convolution FLOPs of jdl's loss forward pass,
  counted from its jaxpr (`benchmarks/flops.py`), times 3 for forward plus backward (the
  usual convention). Printed per model as `model FLOPs/step: ...`.

The machine may be shared with other work, so timings are noisy: the peers are timed in
turn (the order rotates every repeat) and each peer's figure is its median over the
repeats. Ratios are jdl's median throughput over the peer's, measured in the same run;
above 1 means jdl is faster. Each ratio is printed with its spread: half the
interquartile range of its per-repeat values (each repeat times the peers one after the
other), as a +- share of their median. The interquartile range rather than the full range,
because on a shared machine one repeat that another process disturbs would otherwise set
the figure alone (with two or three repeats it is half the range). While vs_pure_jax has
fewer than 5 repeats or spreads by more than +-3%, jdl and pure_jax alone are timed again,
up to `--max-repeats` (default 9), and the RESULT line carries the spread reached. After
the detail lines of each model comes one line:

    RESULT model=<name> jdl_samples_per_s=<x> vs_pure_jax=<r> vs_torch_eager=<r> \
vs_torch_compile=<r> mfu=<fraction> spread_pure_jax=<fraction>

MFU is a fraction of what the machine's best matmul reaches, not of a datasheet peak; on
a CPU shared with other work both the peak and the model's rate move with the load.

`--quick` is a smoke run: 10 steps of batch 16, one repeat, K=5 unroll=1, a 1024 peak
matmul, and tiny versions of the zoo models (the same modules and block types at small
sizes: a ResNet with one basic block per stage and width 4 on 8x8 images, an LSTM of 32,
one-layer GPT and ViT of width 64 and 32, sequences of 16 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from benchmarks import flops
from benchmarks import zoo_peers as twins
from experiments import charlm_lstm
from experiments.charlm_common import lm_loss
from jdl.models import cpu_kernels as jdl_kernels

NUM_CLASSES = 10
SHAKESPEARE_VOCAB = 65  # distinct characters of tinyshakespeare.txt
LEARNING_RATE = 1e-3
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # the defaults of jdl (optax) and torch
TUNE_REPEATS = 2
PEAK_SIZE, PEAK_REPEATS = 4096, 5
PEERS = ("jdl", "jdl_norms", "pure_jax", "torch_eager", "torch_compile")
PLAIN_FAMILIES = ("mlp", "cnn")  # pure_jax is plain functions; for the others, the jdl module
LANGUAGE_FAMILIES = ("lstm", "gpt")
Arrays = dict[str, np.ndarray]
Sizes = Mapping[str, Any]


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
    "peak_size": 1024,
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A benchmarked network and how it is run.

    Attributes:
      name: the name used on the command line and in RESULT lines.
      description: the network, for humans; formatted with the sizes (`str.format`).
      family: which builders make it: "mlp", "cnn", "resnet", "lstm", "gpt" or "vit".
      sizes: the network's sizes (and "seq_len" for language models), read by the jdl,
        pure-JAX and torch builders alike.
      quick_sizes: the tiny sizes of `--quick` (None: `sizes`).
      batch_size: the default batch size.
      epoch_steps: batches in the synthetic data set (an epoch).
      default_steps: timed steps per repeat when --steps is not given.
      settings: jdl settings to try; each K must divide `epoch_steps`.
    """

    name: str
    description: str
    family: str
    sizes: Sizes
    quick_sizes: Sizes | None
    batch_size: int
    epoch_steps: int
    default_steps: int
    settings: tuple[Setting, ...]

    @property
    def hidden(self) -> tuple[int, ...]:
        """MLP hidden sizes; empty for the other families."""
        return tuple(self.sizes.get("hidden", ()))

    @property
    def is_language_model(self) -> bool:
        return self.family in LANGUAGE_FAMILIES

    def describe(self, sizes: Sizes) -> str:
        return self.description.format(**sizes)


_LSTM = charlm_lstm.get_config()
_GPT_SMALL = dict(vocab_size=50257, max_len=1024, embed_dim=768, num_heads=12, num_layers=12)
_VIT_CIFAR = dict(image_size=32, patch_size=4, embed_dim=192, num_heads=3, num_layers=6)

# Settings tried for jdl. Dense models: rolled or lightly unrolled scans compiled faster and
# ran faster than straight-line chunks here. Convolutions inside an XLA:CPU loop body run
# over an order of magnitude slower, so the CNN and the ResNet are tried fully unrolled
# (the CNN also with cpu_kernels, where a rolled scan is fine). The big models get short
# chunks: their steps take long enough that dispatch costs nothing, and compiles stay sane.
# GPT-2 small gets one setting: K=2 rolled and fully unrolled ran alike (0.5 samples/s
# each, loaded machine), and each candidate costs a compile and seconds-long tuning steps.
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="mnist_mlp",
            description="{inputs}-128-10 ReLU MLP",
            family="mlp",
            sizes={"inputs": 784, "hidden": (128,)},
            quick_sizes=None,
            batch_size=128,
            epoch_steps=50,
            default_steps=2000,
            settings=(Setting(50, 1), Setting(50, 5)),
        ),
        ModelSpec(
            name="mlp_512",
            description="{inputs}-512-512-10 ReLU MLP",
            family="mlp",
            sizes={"inputs": 784, "hidden": (512, 512)},
            quick_sizes=None,
            batch_size=128,
            epoch_steps=50,
            default_steps=600,
            settings=(Setting(50, 1), Setting(50, 5)),
        ),
        ModelSpec(
            name="mnist_cnn",
            description="conv3x3 32-relu-maxpool2-conv3x3 64-relu-maxpool2-dense 128-relu-dense 10",
            family="cnn",
            sizes={"image_size": 28},
            quick_sizes=None,
            batch_size=128,
            epoch_steps=10,
            default_steps=60,
            settings=(
                Setting(10, True),
                Setting(10, 1, cpu_kernels=True),
                Setting(10, True, cpu_kernels=True),
            ),
        ),
        ModelSpec(
            name="resnet20",
            description="CIFAR ResNet (stages of {stage_sizes} basic blocks, widths {width}/2x/4x, "
            "batch norm, option-A shortcuts) on {image_size}x{image_size}x3 images",
            family="resnet",
            sizes={"stage_sizes": (3, 3, 3), "width": 16, "image_size": 32},  # ResNet-20
            quick_sizes={"stage_sizes": (1, 1, 1), "width": 4, "image_size": 8},
            batch_size=128,
            epoch_steps=4,
            default_steps=8,
            settings=(Setting(2, True),),
        ),
        ModelSpec(
            name="lstm",
            description="character LM: embedding {embed_dim} -> LSTM {hidden_size} x "
            "{num_layers} -> dense {vocab_size}, windows of {seq_len} tokens",
            family="lstm",
            sizes={
                "vocab_size": SHAKESPEARE_VOCAB,
                "embed_dim": _LSTM.embed_dim,
                "hidden_size": _LSTM.hidden_size,
                "num_layers": _LSTM.num_layers,
                "seq_len": _LSTM.seq_len,
            },
            quick_sizes={
                "vocab_size": SHAKESPEARE_VOCAB,
                "embed_dim": 16,
                "hidden_size": 32,
                "num_layers": 1,
                "seq_len": 16,
            },
            batch_size=_LSTM.batch_size,
            epoch_steps=20,
            default_steps=40,
            settings=(Setting(10, 1), Setting(10, True)),
        ),
        ModelSpec(
            name="gpt_small",
            description="GPT-2 ({num_layers} pre-LN layers of width {embed_dim}, {num_heads} "
            "heads, vocab {vocab_size}, context {max_len}, tied embeddings), windows of "
            "{seq_len} tokens",
            family="gpt",
            sizes={**_GPT_SMALL, "seq_len": 128},
            quick_sizes={
                "vocab_size": 256,
                "max_len": 16,
                "embed_dim": 64,
                "num_heads": 4,
                "num_layers": 1,
                "seq_len": 16,
            },
            batch_size=4,
            epoch_steps=2,
            default_steps=16,  # with 6 per repeat, one quiet run gave 0.93, others 1.04
            settings=(Setting(2, 1),),
        ),
        ModelSpec(
            name="vit",
            description="ViT ({num_layers} pre-LN layers of width {embed_dim}, {num_heads} "
            "heads, patches {patch_size}x{patch_size}) on {image_size}x{image_size}x3 images",
            family="vit",
            sizes=_VIT_CIFAR,
            quick_sizes={
                "image_size": 8,
                "patch_size": 4,
                "embed_dim": 32,
                "num_heads": 2,
                "num_layers": 1,
            },
            batch_size=128,
            epoch_steps=4,
            default_steps=16,
            settings=(Setting(2, 1), Setting(2, True)),
        ),
    )
}


def example_shape(spec: ModelSpec, sizes: Sizes) -> tuple[int, ...]:
    """One input example in JAX layout (images are HWC); language models: (seq_len,)."""
    if spec.family == "mlp":
        return (sizes["inputs"],)
    if spec.family == "cnn":
        return (sizes["image_size"], sizes["image_size"], 1)
    if spec.is_language_model:
        return (sizes["seq_len"],)
    return (sizes["image_size"], sizes["image_size"], 3)


def make_data(
    spec: ModelSpec, batch_size: int, epoch_steps: int, sizes: Sizes | None = None
) -> Arrays:
    """Synthetic data of `epoch_steps` batches: {"x": inputs, "y": int32 targets}.

    Classifiers: float32 Gaussian inputs, uniformly random labels (N,). Language models:
    int32 windows (N, T) of uniformly random tokens, "y" the next token at every position.
    """
    sizes = spec.sizes if sizes is None else sizes
    rng = np.random.default_rng(0)
    num = batch_size * epoch_steps
    if spec.is_language_model:
        tokens = rng.integers(0, sizes["vocab_size"], (num, sizes["seq_len"] + 1))
        tokens = tokens.astype(np.int32)
        return {"x": np.ascontiguousarray(tokens[:, :-1]), "y": np.ascontiguousarray(tokens[:, 1:])}
    return {
        "x": rng.normal(size=(num, *example_shape(spec, sizes))).astype(np.float32),
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


def _gpt_sizes(sizes: Sizes) -> dict[str, Any]:
    return {name: value for name, value in sizes.items() if name != "seq_len"}


def build_jdl_model(
    spec: ModelSpec, sizes: Sizes, rngs: nnx.Rngs, cpu_kernels: bool = False
) -> nnx.Module:
    """The jdl network of `spec` at `sizes` (dropout off)."""
    # Only the set-up is faster this way: XLA:CPU compiles the partitionable threefry
    # random-bits program about 5x slower (~3 s per distinct parameter shape here).
    with jax.threefry_partitionable(False):
        return _build_jdl_model(spec, sizes, rngs, cpu_kernels)


def _build_jdl_model(
    spec: ModelSpec, sizes: Sizes, rngs: nnx.Rngs, cpu_kernels: bool
) -> nnx.Module:
    family = spec.family
    if family == "mlp":
        return jdl.models.MLP(sizes["inputs"], sizes["hidden"], NUM_CLASSES, rngs=rngs)
    if family == "cnn":
        side = sizes["image_size"]
        return jdl.models.CNN(
            1,
            NUM_CLASSES,
            input_shape=(side, side),
            conv_channels=(32, 64),
            dense_sizes=(128,),
            cpu_kernels=cpu_kernels,
            rngs=rngs,
        )
    if family == "resnet":  # stage sizes (3, 3, 3) and width 16: `jdl.models.resnet20`
        return jdl.models.ResNet(
            sizes["stage_sizes"],
            jdl.models.BasicBlock,
            NUM_CLASSES,
            stem="cifar",
            width=sizes["width"],
            rngs=rngs,
        )
    if family == "lstm":
        return jdl.models.CharLM(
            sizes["vocab_size"],
            sizes["embed_dim"],
            sizes["hidden_size"],
            sizes["num_layers"],
            cell_type="lstm",
            rngs=rngs,
        )
    if family == "gpt":
        return jdl.models.gpt_small(rngs=rngs, **_gpt_sizes(sizes))
    if family == "vit":
        return jdl.models.vit_cifar(NUM_CLASSES, rngs=rngs, **sizes)
    raise ValueError(f"unknown model family {family!r}")


def jdl_loss_fn(spec: ModelSpec) -> jdl.steps.LossFn:
    """jdl's own loss for the model: next-token cross-entropy or classification."""
    return lm_loss() if spec.is_language_model else jdl.classification_loss()


def jdl_param_count(spec: ModelSpec, sizes: Sizes) -> int:
    """Trainable parameters of the jdl network, from shapes only (nothing is initialised)."""
    model = nnx.eval_shape(lambda: build_jdl_model(spec, sizes, nnx.Rngs(0)))
    return jdl.count_params(nnx.state(model, nnx.Param))


class JdlPeer:
    """`jdl.fit` from a fresh state (step 0) per call, so every call runs the same program.

    Compilation is excluded for every peer: the warm-up fit compiles the chunk program,
    and the timed fits get the same program back from `fit`'s own cache (it is kept per
    train step, data set-up, K and unroll). Everything else `fit` does is timed as it is.
    """

    def __init__(
        self,
        spec: ModelSpec,
        sizes: Sizes,
        arrays: Arrays,
        batch_size: int,
        setting: Setting,
        norm_metrics: bool = False,
        precision: str = "fp32",
    ):
        self.name = "jdl_norms" if norm_metrics else "jdl"
        self.model = build_jdl_model(spec, sizes, nnx.Rngs(0), setting.cpu_kernels)
        self.num_params = jdl.count_params(nnx.state(self.model, nnx.Param))
        self.tx, _ = jdl.make_optimizer("adam", learning_rate=LEARNING_RATE)
        self.data = jdl.InMemoryData(arrays, batch_size=batch_size, seed=0)
        self.loss_fn = jdl_loss_fn(spec)
        self.train_step = jdl.make_train_step(
            self.loss_fn, norm_metrics=norm_metrics, precision=precision
        )
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

    def flops_per_step(self) -> int:
        """Model FLOPs of one training step: 3 x the matmul/conv FLOPs of the loss forward."""
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        batch = {
            name: jax.ShapeDtypeStruct((self.data.batch_size, *value.shape[1:]), value.dtype)
            for name, value in self.data.arrays.items()
        }

        def loss(params, rest, batch):
            model = nnx.merge(graphdef, params, rest, copy=True)
            model.train()  # as in the train step: batch norm on batch statistics
            return jnp.mean(self.loss_fn(model, batch)["loss"])

        return flops.training_flops(loss, params, rest, batch)


# ----------------------------------------------------------------------------- pure JAX

PureParams = dict[str, list[tuple[jax.Array, jax.Array]]]
# (params, extra, x, y) -> (mean loss, new extra); `extra` is state the forward pass
# updates without gradients (batch-norm statistics), () when there is none.
PureLoss = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


class PureModel(NamedTuple):
    """What the pure-JAX loop trains: initial `params`, carried `extra` state, the loss."""

    params: Any
    extra: Any
    loss: PureLoss


def init_pure_params(spec: ModelSpec, key: jax.Array) -> PureParams:
    """{"conv": [(kernel HWIO, bias)], "dense": [(kernel, bias)]}, scaled normal init."""
    if spec.family == "cnn":
        conv_sizes, dense_sizes = [1, 32, 64], [7 * 7 * 64, 128, NUM_CLASSES]
    else:
        conv_sizes, dense_sizes = [], [spec.sizes["inputs"], *spec.hidden, NUM_CLASSES]
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


def pure_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of logits (..., C) against int labels (...)."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], axis=-1))


def pure_loss(params: PureParams, x: jax.Array, y: jax.Array, cpu_kernels: bool) -> jax.Array:
    return pure_xent(pure_forward(params, x, cpu_kernels), y)


def make_pure_model(spec: ModelSpec, jdl_model: nnx.Module, cpu_kernels: bool) -> PureModel:
    """The plain-function network (MLP, CNN), or `jdl_model` split for the loop (the zoo).

    `jdl_model` is not modified; the loop works on copies of its arrays.
    """
    if spec.family in PLAIN_FAMILIES:
        return PureModel(
            init_pure_params(spec, jax.random.PRNGKey(0)),
            (),
            lambda params, extra, x, y: (pure_loss(params, x, y, cpu_kernels), extra),
        )
    graphdef, params, extra = nnx.split(jdl_model, nnx.Param, ...)

    def loss(params, extra, x, y):
        # copy=True: fresh Variables of the current trace, which batch norm may update.
        model = nnx.merge(graphdef, params, extra, copy=True)
        model.train()  # batch norm on batch statistics, as in jdl's train step
        logits = model(x)
        _, _, extra = nnx.split(model, nnx.Param, ...)  # batch statistics, updated
        return pure_xent(logits, y), extra

    return PureModel(params, extra, loss)


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


def make_pure_chunk(setting: Setting, loss_fn: PureLoss) -> Callable:
    """Jitted `(state, x, y, order, start) -> (state, losses)`, state donated.

    `state` is `(params, extra, mu, nu, count)`. Runs `length` steps on the batches
    `order[start : start + length]` (rows of example indices), gathered on the device.
    Like jdl's chunks: straight-line steps when `unroll` is True or >= `length`, else a
    `lax.scan` with that unroll.
    """

    length, unroll, _ = setting
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_chunk(state, x, y, order, start):
        def one_step(state, indices):
            params, extra, mu, nu, count = state
            (loss, extra), grads = grad_fn(params, extra, x[indices], y[indices])
            params, mu, nu, count = pure_adam(params, grads, mu, nu, count)
            return (params, extra, mu, nu, count), loss

        rows = lax.dynamic_slice_in_dim(order, start, length)
        if unroll is True or unroll >= length:
            losses = []
            for i in range(length):
                state, loss = one_step(state, rows[i])
                losses.append(loss)
            return state, jnp.stack(losses)
        return lax.scan(one_step, state, rows, unroll=unroll)

    # jdl's compiler options (`jdl.compiler`): the ratio then measures the loop around the
    # kernels; what the options gain over XLA's defaults is `benchmarks.xla_cpu_options`.
    return jax.jit(
        train_chunk, donate_argnums=(0,), compiler_options=jdl.compiler.compiler_options()
    )


class PureJaxPeer:
    """The hand-written JAX loop, run with jdl's setting (K steps per dispatch, unroll).

    For the zoo models it trains jdl's own NNX module (split once, merged inside the
    jitted chunk, starting from the jdl peer's initial weights), so the same network
    runs in both and the ratio measures what jdl's loop, step and optimizer cost around
    it. Batch-norm statistics are carried from step to step as jdl carries them.
    """

    name = "pure_jax"

    def __init__(
        self,
        spec: ModelSpec,
        jdl_model: nnx.Module,
        arrays: Arrays,
        batch_size: int,
        setting: Setting,
        epoch_steps: int,
    ):
        params, extra, loss_fn = make_pure_model(spec, jdl_model, setting.cpu_kernels)
        # Own buffers (the chunk donates them): jdl's model keeps its arrays.
        params, extra = jax.tree.map(jnp.array, (params, extra))
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        self.state = (params, extra, zeros(), zeros(), jnp.zeros((), jnp.float32))
        self.x, self.y = jax.device_put(arrays["x"]), jax.device_put(arrays["y"])
        self.length = setting.steps_per_dispatch
        self.train_chunk = make_pure_chunk(setting, loss_fn)
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


def build_torch_model(spec: ModelSpec, sizes: Sizes | None = None) -> nn.Module:
    """The torch twin of the jdl network (NCHW for the CNN and the ResNet)."""
    sizes = spec.sizes if sizes is None else sizes
    family = spec.family
    if family == "cnn":
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
    if family == "mlp":
        widths = [sizes["inputs"], *sizes["hidden"]]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], NUM_CLASSES))
    if family == "resnet":
        return twins.TorchResNet(sizes["stage_sizes"], NUM_CLASSES, width=sizes["width"])
    if family == "lstm":
        return twins.TorchCharLM(
            sizes["vocab_size"], sizes["embed_dim"], sizes["hidden_size"], sizes["num_layers"]
        )
    if family == "gpt":
        return twins.TorchGPT(**_gpt_sizes(sizes))
    if family == "vit":
        return twins.TorchViT(in_channels=3, num_classes=NUM_CLASSES, **sizes)
    raise ValueError(f"unknown model family {family!r}")


def torch_inputs(spec: ModelSpec, x: np.ndarray) -> torch.Tensor:
    """Inputs as torch wants them: NCHW images for convolutions, int64 token ids."""
    if spec.family in ("cnn", "resnet"):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    return tensor.long() if spec.is_language_model else tensor


class TorchPeer:
    """PyTorch on pre-made batch tensors, eager or with the whole step under torch.compile.

    Raises ValueError when the torch network's trainable parameter count differs from
    `expected_params` (jdl's): the two would not be the same architecture.
    """

    def __init__(
        self,
        spec: ModelSpec,
        sizes: Sizes,
        arrays: Arrays,
        batch_size: int,
        compiled: bool,
        expected_params: int | None = None,
    ):
        self.name = "torch_compile" if compiled else "torch_eager"
        torch.manual_seed(0)
        self.model = build_torch_model(spec, sizes)
        self.num_params = twins.count_trainable(self.model)
        if expected_params is not None and self.num_params != expected_params:
            raise ValueError(
                f"{spec.name}: the torch network has {self.num_params:,} trainable "
                f"parameters, jdl's {expected_params:,}; the architectures differ"
            )
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=LEARNING_RATE, betas=(ADAM_B1, ADAM_B2), eps=ADAM_EPS
        )
        inputs = torch_inputs(spec, arrays["x"]).split(batch_size)
        labels = torch.from_numpy(arrays["y"].astype(np.int64)).split(batch_size)
        self.batches = list(zip(inputs, labels, strict=True))  # views of contiguous rows
        self.step = torch.compile(self._train_step) if compiled else self._train_step
        self.position = 0

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)  # (B, C), or (B, T, V) for a language model
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
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
    """Samples/s per peer and repeat, why a peer has none, and what MFU needs.

    Attributes:
      flops_per_step: model FLOPs of one training step (3 x forward matmul/conv FLOPs).
      batch_size: samples per step.
      peak_flops: the machine's measured matmul peak, FLOP/s.
    """

    name: str
    steps: int
    setting: Setting
    rates: dict[str, list[float]]
    unavailable: dict[str, str]
    flops_per_step: float
    batch_size: int
    peak_flops: float

    def median(self, peer: str) -> float:
        values = self.rates.get(peer)
        return statistics.median(values) if values else float("nan")

    def ratio(self, peer: str) -> float:
        return self.median("jdl") / self.median(peer)

    def spread(self, peer: str) -> float:
        return ratio_spread(self.rates, peer)

    @property
    def mfu(self) -> float:
        """jdl's model FLOP/s over the peak."""
        steps_per_second = self.median("jdl") / self.batch_size
        return self.flops_per_step * steps_per_second / self.peak_flops

    def result_line(self) -> str:
        return (
            f"RESULT model={self.name} jdl_samples_per_s={format_rate(self.median('jdl'))} "
            f"vs_pure_jax={self.ratio('pure_jax'):.3f} "
            f"vs_torch_eager={self.ratio('torch_eager'):.3f} "
            f"vs_torch_compile={self.ratio('torch_compile'):.3f} "
            f"mfu={self.mfu:.4g} spread_pure_jax={self.spread('pure_jax'):.3f}"
        )


def ratio_spread(rates: dict[str, list[float]], peer: str) -> float:
    """Half the interquartile range of the per-repeat ratios jdl/peer (each repeat times
    both, one after the other), over their median: the ratio's +- noise as a fraction (nan
    below 2 repeats). Quartiles are interpolated between repeats (`inclusive`), so with two
    or three repeats this is a quarter of their range."""
    ratios = [j / p for j, p in zip(rates["jdl"], rates.get(peer, []), strict=False)]
    if len(ratios) < 2:
        return float("nan")
    lower, _, upper = statistics.quantiles(ratios, n=4, method="inclusive")
    return (upper - lower) / 2 / statistics.median(ratios)


def format_rate(value: float, grouped: bool = False) -> str:
    """One decimal from 100 up (thousands grouped if asked), 4 significant digits below."""
    if value >= 100:
        return f"{value:,.1f}" if grouped else f"{value:.1f}"
    return f"{value:.4g}"


def choose_jdl_peer(
    spec: ModelSpec,
    sizes: Sizes,
    arrays: Arrays,
    batch_size: int,
    candidates: Sequence[Setting],
    tune_steps: int,
) -> JdlPeer:
    """The warmed-up jdl peer with the fastest of the `candidates` settings, printed."""
    peers = [JdlPeer(spec, sizes, arrays, batch_size, setting) for setting in candidates]
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
        f"{peer.setting}: {format_rate(rate, grouped=True)}"
        for peer, rate in zip(peers, medians, strict=True)
    )
    print(f"  jdl settings tried (samples/s, median of {TUNE_REPEATS}): {tried}", flush=True)
    return peers[medians.index(max(medians))]


def make_peers(
    spec: ModelSpec,
    sizes: Sizes,
    arrays: Arrays,
    batch_size: int,
    jdl_peer: JdlPeer,
    epoch_steps: int,
    torch_compile: bool,
) -> tuple[list[Peer], dict[str, str]]:
    """The warmed-up peers (jdl first), and {peer: reason} for those that could not run."""
    torch_peer = lambda compiled: TorchPeer(
        spec, sizes, arrays, batch_size, compiled, expected_params=jdl_peer.num_params
    )
    factories: dict[str, Callable[[], Peer]] = {
        "jdl_norms": lambda: JdlPeer(
            spec, sizes, arrays, batch_size, jdl_peer.setting, norm_metrics=True
        ),
        "pure_jax": lambda: PureJaxPeer(
            spec, jdl_peer.model, arrays, batch_size, jdl_peer.setting, epoch_steps
        ),
        "torch_eager": lambda: torch_peer(False),
        "torch_compile": lambda: torch_peer(True),
    }
    peers: list[Peer] = [jdl_peer]
    unavailable: dict[str, str] = {}
    for name, factory in factories.items():
        if name == "jdl_norms" and spec.family not in PLAIN_FAMILIES:
            continue  # big models: two norms per step are noise next to the model
        if name == "torch_compile" and not torch_compile:
            unavailable[name] = "skipped (--no-torch-compile)"
            continue
        peer = start_peer(name, factory)
        if isinstance(peer, str):
            unavailable[name] = peer
            continue
        peers.append(peer)
        if name == "torch_eager":
            print(
                f"  trainable parameters: jdl {jdl_peer.num_params:,}, "
                f"torch {peer.num_params:,} (equal)",
                flush=True,
            )
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
    peers: Sequence[Peer], steps: int, batch_size: int, repeats: int, first_repeat: int = 0
) -> dict[str, list[float]]:
    """Samples/s per peer and repeat; the order rotates so no peer always follows another."""
    rates: dict[str, list[float]] = {peer.name: [] for peer in peers}
    for repeat in range(first_repeat, first_repeat + repeats):
        shift = repeat % len(peers)
        for peer in [*peers[shift:], *peers[:shift]]:
            rates[peer.name].append(steps * batch_size / peer.time_steps(steps))
    return rates


SPREAD_TARGET = 0.03  # the +- on vs_pure_jax that a figure must reach to be recorded
MIN_SPREAD_REPEATS = 5  # fewer repeats say too little about the quartiles


def repeat_while_noisy(
    peers: Sequence[Peer],
    steps: int,
    batch_size: int,
    rates: dict[str, list[float]],
    max_repeats: int,
) -> dict[str, list[float]]:
    """More repeats of jdl and pure_jax (the other peers keep theirs), up to `max_repeats`,
    while they have fewer than `MIN_SPREAD_REPEATS` or their ratio spreads by more than
    +-`SPREAD_TARGET`: the median then rests on more, and a figure whose spread stays wide
    says so on its RESULT line."""
    paired = [peer for peer in peers if peer.name in ("jdl", "pure_jax")]

    def noisy() -> bool:
        few = len(rates["jdl"]) < MIN_SPREAD_REPEATS
        return few or not ratio_spread(rates, "pure_jax") <= SPREAD_TARGET

    while "pure_jax" in rates and len(rates["jdl"]) < max_repeats and noisy():
        more = measure(paired, steps, batch_size, 1, first_repeat=len(rates["jdl"]))
        rates = {name: rates[name] + more.get(name, []) for name in rates}
    return rates


def resolve_sizes(spec: ModelSpec, quick: bool, seq_len: int | None) -> Sizes:
    """The model's sizes for this run: quick or full, `seq_len` applied to language models.

    Raises ValueError when `seq_len` is out of range (below 2, or above GPT's context).
    """
    sizes = dict(spec.quick_sizes if quick and spec.quick_sizes else spec.sizes)
    if seq_len is not None and spec.is_language_model:
        limit = sizes.get("max_len", math.inf)
        if not 2 <= seq_len <= limit:
            raise ValueError(f"--seq-len {seq_len} must be in [2, {limit}] for {spec.name}")
        sizes["seq_len"] = seq_len
    return sizes


def benchmark_model(spec: ModelSpec, args: argparse.Namespace, peak_flops: float) -> ModelResult:
    """Builds, warms up and times every peer of one model; prints the detail lines."""
    sizes = resolve_sizes(spec, args.quick, args.seq_len)
    batch_size = args.batch_size or spec.batch_size
    epoch_steps = args.epoch_steps or spec.epoch_steps
    candidates = args.settings or spec.settings
    if any(epoch_steps % setting.steps_per_dispatch for setting in candidates):
        raise ValueError(f"every K of {candidates} must divide the epoch ({epoch_steps} steps)")
    # Whole epochs: the pure-JAX loop and jdl run the same whole chunks.
    steps = -(-(args.steps or spec.default_steps) // epoch_steps) * epoch_steps
    samples = f"sequences of {sizes['seq_len']} tokens" if spec.is_language_model else "examples"
    print(
        f"model {spec.name}: {spec.describe(sizes)}; batch {batch_size} ({samples}), "
        f"{epoch_steps} batches of data, {steps} timed steps per repeat",
        flush=True,
    )
    arrays = make_data(spec, batch_size, epoch_steps, sizes)
    start = time.perf_counter()
    jdl_peer = choose_jdl_peer(spec, sizes, arrays, batch_size, candidates, steps // 4)
    print(
        f"  jdl: compiled, warmed up and tuned in {time.perf_counter() - start:.1f} s", flush=True
    )
    print(f"  settings: jdl.fit {jdl_peer.setting}; pure_jax the same", flush=True)
    flops_per_step = jdl_peer.flops_per_step()
    print(
        f"  model FLOPs/step: {flops_per_step / 1e9:.4g} GFLOP (3 x forward matmul/conv FLOPs)",
        flush=True,
    )
    peers, unavailable = make_peers(
        spec, sizes, arrays, batch_size, jdl_peer, epoch_steps, args.torch_compile
    )
    rates = measure(peers, steps, batch_size, args.repeats)
    rates = repeat_while_noisy(peers, steps, batch_size, rates, args.max_repeats)
    result = ModelResult(
        spec.name,
        steps,
        jdl_peer.setting,
        rates,
        unavailable,
        flops_per_step=flops_per_step,
        batch_size=batch_size,
        peak_flops=peak_flops,
    )
    print_rates(result)
    if not args.quick:
        print_fit_call_cost(jdl_peer, result.median("jdl"))
    return result


def print_rates(result: ModelResult) -> None:
    for name in PEERS:
        if name == "jdl_norms" and name not in result.rates:
            continue
        if name in result.rates:
            runs = ", ".join(format_rate(value, grouped=True) for value in result.rates[name])
            median = format_rate(result.median(name), grouped=True)
            spread = "" if name == "jdl" else f", ratio +-{100 * result.spread(name):.1f}%"
            print(f"  {name:13s} {median:>10s} samples/s (repeats: {runs}{spread})")
        else:
            print(f"  {name:13s} {'nan':>10s} ({result.unavailable[name]})")
    if "jdl_norms" in result.rates:
        print(
            "  jdl_norms (make_train_step's default grad/param norm metrics): "
            f"{result.median('jdl_norms') / result.median('pure_jax'):.3f} of pure_jax, "
            f"{result.median('jdl_norms') / result.median('jdl'):.3f} of jdl without them"
        )
    achieved = result.flops_per_step * result.median("jdl") / result.batch_size
    print(
        f"  jdl: {achieved / 1e9:,.1f} model GFLOP/s of a {result.peak_flops / 1e9:,.1f} "
        f"GFLOP/s peak: mfu {result.mfu:.4g}",
        flush=True,
    )


def print_fit_call_cost(jdl_peer: JdlPeer, samples_per_second: float) -> None:
    """What one `fit` call costs on top of its steps (its program comes from the cache)."""
    length = jdl_peer.setting.steps_per_dispatch
    seconds = jdl_peer.fit_seconds(length)
    outside = seconds - length * jdl_peer.data.batch_size / samples_per_second
    print(
        f"  a jdl.fit call of {length} steps (program cached) took {seconds:.2f} s, "
        f"{outside:.2f} s of it outside the steps",
        flush=True,
    )


def measure_peak(size: int) -> float:
    """The machine's fp32 matmul peak, FLOP/s: the better of XLA and torch (printed)."""
    xla = flops.matmul_peak_xla(size, PEAK_REPEATS)
    torch_rate = flops.matmul_peak_torch(size, PEAK_REPEATS)
    print(
        f"peak: xla={xla / 1e9:.1f} GFLOP/s torch={torch_rate / 1e9:.1f} GFLOP/s "
        f"(matmul {size}x{size} fp32)",
        flush=True,
    )
    return max(xla, torch_rate)


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
    parser.add_argument(
        "--batch-size", type=int, default=None, help="batch size (default: per model)"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length of the language models (default: lstm 64, gpt_small 128)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-repeats",
        type=int,
        default=9,
        help="repeat further, up to this many, while vs_pure_jax spreads by more than "
        f"+-{SPREAD_TARGET:.0%} over the repeats",
    )
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
        "--peak-size",
        type=int,
        default=None,
        help=f"N of the N x N fp32 matmul that measures the peak (default {PEAK_SIZE})",
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
        help="tiny smoke run: tiny zoo models, 10 steps of batch 16, one repeat, K=5 unroll=1",
    )
    args = parser.parse_args(argv)
    args.epoch_steps = 0  # per model
    if args.quick:
        args.steps = args.steps or QUICK["steps"]
        args.batch_size = args.batch_size or QUICK["batch_size"]
        args.repeats = args.max_repeats = QUICK["repeats"]
        args.epoch_steps, args.settings = QUICK["epoch_steps"], args.settings or QUICK["settings"]
        args.peak_size = args.peak_size or QUICK["peak_size"]
    args.peak_size = args.peak_size or PEAK_SIZE
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    args.max_repeats = max(args.max_repeats, args.repeats)
    if args.steps < 0 or args.repeats < 1 or args.threads < 1 or args.peak_size < 1:
        parser.error("--steps must be >= 0; --repeats, --threads and --peak-size >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    for name in args.models:
        try:
            resolve_sizes(MODELS[name], args.quick, args.seq_len)
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> list[ModelResult]:
    """Runs the benchmark: the peak, detail lines, then one RESULT line per model."""
    args = parse_args(argv)
    print(
        f"jdl {jdl.__version__} training throughput; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({args.threads} threads), "
        f"{os.cpu_count()} CPU cores; {args.repeats} repeats, medians",
        flush=True,
    )
    results = []
    with torch_threads(args.threads):
        peak_flops = measure_peak(args.peak_size)
        for name in args.models:
            results.append(benchmark_model(MODELS[name], args, peak_flops))
            print(results[-1].result_line(), flush=True)
    return results


if __name__ == "__main__":
    main()
