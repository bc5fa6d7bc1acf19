"""Model FLOPs counted from a jaxpr, and the machine's measured fp32 matmul peak.

Model utilisation (MFU) is achieved model FLOP/s over the peak the machine reaches. The
numerator counts the arithmetic the model needs, not what a backend happens to run:

- `forward_flops(fn, *args)` traces `fn` with `jax.make_jaxpr` and sums the FLOPs of its
  matrix multiplications (`dot_general`: 2 * prod(output shape) * prod(contracting
  dims)) and convolutions (`conv_general_dilated`: 2 * prod(output shape) * prod(kernel
  spatial dims) * kernel input features, which are the input channels divided by
  `feature_group_count`). Everything else (activations, normalisation, softmax,
  gathers) is left out: on the models benchmarked here it is a few percent at most.
  Sub-programs are walked recursively: `jit`/`pjit`, `closed_call`, `remat`,
  `custom_jvp_call`/`custom_vjp_call` (the primal function) once, a `scan` body
  `length` times, the costlier branch of a `cond`. A `while` loop has no static trip
  count and raises `ValueError`.
- `training_flops(fn, *args)` is 3 x the forward count: the backward pass of a matmul
  or convolution costs two of them (the gradients of both operands), the usual
  convention (Kaplan et al. 2020; Chowdhery et al. 2022, appendix B). Recomputation
  (remat) is not counted as model FLOPs.

The denominator, `matmul_peak_xla` / `matmul_peak_torch`: the best of a few timed
N x N x N float32 matrix products (2 N^3 FLOPs each), after a warm-up, in FLOP/s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.extend import core as jex_core

# One counting rule for jdl.summary (jdl/model_summary.py) and the benchmarks.
from jdl.model_summary import _conv_flops, _dot_general_flops, _sub_jaxprs

TRAINING_FLOPS_PER_FORWARD = 3


def forward_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Matmul and convolution FLOPs of one call `fn(*args, **kwargs)`.

    Args:
      fn: a JAX-traceable function.
      args, kwargs: its arguments; arrays or `jax.ShapeDtypeStruct`s (only shapes and
        dtypes matter).

    Returns:
      The FLOP count (an int; a multiply-add counts 2).

    Raises:
      ValueError: `fn` contains a `while` loop (its trip count is not static).
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return jaxpr_flops(closed.jaxpr)


def training_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one training step whose forward pass is `fn`: 3 x `forward_flops`."""
    return TRAINING_FLOPS_PER_FORWARD * forward_flops(fn, *args, **kwargs)


def jaxpr_flops(jaxpr: jex_core.Jaxpr) -> int:
    """Matmul and convolution FLOPs of `jaxpr`, sub-programs included (see the module doc)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(jaxpr_flops(branch.jaxpr) for branch in eqn.params["branches"])
        elif name == "while":
            raise ValueError(
                "cannot count the FLOPs of a while loop (no static trip count); "
                "write the loop as a lax.scan"
            )
        else:  # jit, closed_call, remat, custom_jvp_call, custom_vjp_call, ...: once
            total += sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn.params))
    return total


# ----------------------------------------------------------------------------- peak


def matmul_peak_xla(size: int, repeats: int = 5, dtype: Any = jnp.float32, batch: int = 1) -> float:
    """Best FLOP/s of a jitted product of `batch` pairs of `dtype` (size, size) matrices.

    On an accelerator one product is over in about a millisecond, so a `batch` of them
    in one call keeps the dispatch out of the figure.
    """
    shape = (batch, size, size)
    a = jax.device_put(np.random.default_rng(0).standard_normal(shape, np.float32)).astype(dtype)
    b = jax.device_put(np.random.default_rng(1).standard_normal(shape, np.float32)).astype(dtype)
    matmul = jax.jit(jnp.matmul)
    return _best_rate(lambda: matmul(a, b).block_until_ready(), 2 * batch * size**3, repeats)


def matmul_peak_torch(size: int, repeats: int = 5) -> float:
    """Best FLOP/s of `torch.mm` of two float32 (size, size) matrices (current threads)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    return _best_rate(lambda: torch.mm(a, b), 2 * size**3, repeats)


def _best_rate(run: Callable[[], Any], flops: int, repeats: int) -> float:
    run()  # warm-up: compiles (XLA), allocates and touches the memory
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return flops / best
