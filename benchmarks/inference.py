"""Inference latency of the MNIST CNN: jdl's jitted model, its exports, and PyTorch.

Command:
    python -m benchmarks.inference --workdir /tmp/mnist_cnn   # a trained run (optional)

Without --workdir a freshly initialised CNN is timed (latency does not depend on the
weights) and the accuracy section is skipped. With one (e.g. trained by
`python -m experiments.mnist_cnn --workdir /tmp/mnist_cnn`), the accuracy of every
runtime on the held-out MNIST test digits is printed as well, which is how the int8
export's accuracy change is measured.

Runtimes, all on this CPU, all computing the same network with the same weights:
- jdl jit: the live model, `jax.jit` of its eval-mode forward pass;
- stablehlo: the `jax.export` artifact (`jdl.export.load`), run by XLA;
- onnx, onnx-int8: the ONNX exports on onnxruntime's CPU provider (default threads);
- torch eager: the CNN written by hand in torch.nn with the weights copied in, under
  `torch.inference_mode()` (PyTorch's default threads).

Each figure is the median wall time of `--repeats` calls at batch 1 and batch 64, after
warm-up calls, outputs copied to the host; ratios are against jdl jit (>1: slower).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import torch
from flax import nnx
from torch import nn

import jdl
import jdl.export
from jdl.deploy import load_model

INPUT_SHAPE = (28, 28, 1)
BATCH_SIZES = (1, 64)
FORMATS = ("stablehlo", "onnx", "onnx-int8")


class TorchCNN(nn.Module):
    """`jdl.models.CNN` with conv3x3 (SAME) - relu - maxpool2 blocks and dense layers, in
    torch.nn. NHWC inputs, as jdl's; the features are flattened in NHWC order too."""

    def __init__(self, conv_channels: Sequence[int], dense_sizes: Sequence[int], classes: int):
        super().__init__()
        channels = [INPUT_SHAPE[-1], *conv_channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, padding=1) for a, b in zip(channels[:-1], channels[1:], strict=True)
        )
        side = INPUT_SHAPE[0] // 2 ** len(conv_channels)
        sizes = [channels[-1] * side * side, *dense_sizes]
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)
        self.head = nn.Linear(sizes[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        for conv in self.convs:
            x = nn.functional.max_pool2d(torch.relu(conv(x)), 2)
        x = x.permute(0, 2, 3, 1).flatten(1)  # NHWC order, as jdl flattens
        for layer in self.dense:
            x = torch.relu(layer(x))
        return self.head(x)


def torch_twin(model: jdl.models.CNN) -> TorchCNN:
    """A `TorchCNN` holding `model`'s weights."""

    def tensor(variable) -> torch.Tensor:
        return torch.from_numpy(np.array(variable[...]))

    twin = TorchCNN(
        [int(conv.kernel.shape[-1]) for conv in model.convs],
        [int(layer.kernel.shape[-1]) for layer in model.dense],
        int(model.head.kernel.shape[-1]),
    )
    with torch.no_grad():
        for conv, theirs in zip(model.convs, twin.convs, strict=True):
            theirs.weight.copy_(tensor(conv.kernel).permute(3, 2, 0, 1))  # HWIO -> OIHW
            theirs.bias.copy_(tensor(conv.bias))
        for layer, theirs in zip([*model.dense, model.head], [*twin.dense, twin.head], strict=True):
            theirs.weight.copy_(tensor(layer.kernel).T)
            theirs.bias.copy_(tensor(layer.bias))
    return twin.eval()


def runners(model: nnx.Module, directory: str, formats: Sequence[str]) -> dict[str, Callable]:
    """name -> f(x: np.ndarray) -> np.ndarray, for every runtime."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    found = {"jdl jit": lambda x: np.asarray(forward(state, x))}
    for kind in formats:
        suffix = ".shlo" if kind == "stablehlo" else ".onnx"
        path = os.path.join(directory, kind + suffix)
        jdl.export(model, path, format=kind, input_shape=INPUT_SHAPE)
        found[kind] = jdl.export.load(path)
    twin = torch_twin(model)

    def run_torch(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return twin(torch.from_numpy(x)).numpy()

    found["torch eager"] = run_torch
    return found


def median_ms(run: Callable, x: np.ndarray, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference")
    parser.add_argument("--workdir", default=None, help="a trained mnist_cnn run (optional)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--formats", default=",".join(FORMATS), help="exports to time")
    parser.add_argument("--quick", action="store_true", help="a few repeats (smoke test)")
    options = parser.parse_args(argv)
    repeats = 3 if options.quick else options.repeats
    formats = [f for f in options.formats.split(",") if f]
    if options.workdir:
        model = load_model(options.workdir)
    else:
        model = jdl.models.MODELS["mnist_cnn"](rngs=nnx.Rngs(0))
        model.eval()
    print(f"devices: {jax.devices()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    results: dict = {"latency_ms": {}, "size_mb": {}, "accuracy": {}}
    with tempfile.TemporaryDirectory() as directory:
        found = runners(model, directory, formats)
        for name in os.listdir(directory):
            results["size_mb"][name] = os.path.getsize(os.path.join(directory, name)) / 1e6
        params = jdl.count_params(nnx.state(model, nnx.Param))
        print(f"float32 weights: {4 * params / 1e6:.2f} MB; files: {results['size_mb']}")
        probe = np.random.default_rng(0).random((4, *INPUT_SHAPE), dtype=np.float32)
        reference = found["jdl jit"](probe)
        for name, run in found.items():
            gap = float(np.abs(run(probe) - reference).max())
            print(f"  {name:12s} max |output - jdl jit| = {gap:.2e}")
        for batch in BATCH_SIZES:
            x = np.random.default_rng(batch).random((batch, *INPUT_SHAPE), dtype=np.float32)
            timings = {name: median_ms(run, x, repeats) for name, run in found.items()}
            results["latency_ms"][batch] = timings
            print(f"batch {batch}: median of {repeats} calls")
            for name, ms in timings.items():
                ratio = ms / timings["jdl jit"]
                print(f"  {name:12s} {ms:9.3f} ms  {ratio:6.2f}x jdl jit")
        if options.workdir:
            test = jdl.data.load_mnist(download=False)["test"]
            for name, run in found.items():
                logits = np.concatenate(
                    [run(test["x"][i : i + 64]) for i in range(0, len(test["x"]), 64)]
                )
                results["accuracy"][name] = float(np.mean(logits.argmax(-1) == test["y"]))
            print(f"test accuracy on {len(test['y'])} digits: {results['accuracy']}")
    return results


if __name__ == "__main__":
    main()
