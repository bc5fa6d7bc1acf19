"""The XLA compiler options jdl compiles its training and evaluation programs with.

On CPU, the installed jaxlib hands dots, convolutions and reductions to the YNNPACK
library. Measured on the zoo (BENCHMARKS.md, "XLA:CPU and YNNPACK convolutions"),
YNNPACK's convolutions make a convolutional training step 1.3 to 1.8 times slower than
XLA's own convolution kernels. jdl therefore compiles its programs on CPU with XLA's
default library choices less stand-alone convolutions (`CPU_OPTIONS`; a convolution that
feeds a reduction may still be fused with it); a model without convolutions compiles to
the same program as under XLA's defaults. Other platforms get no options.

A user's own choice wins: when `XLA_FLAGS` sets the same option, jdl passes nothing and
XLA reads the flag. A jaxlib that no longer knows the option gets nothing either (one
probe compile per process decides), so a jaxlib upgrade cannot break a run.

The options choose kernels, so a convolutional model's results can differ from a plain
`jax.jit` in the last bits; runs stay bitwise reproducible because every jdl program uses
the same options.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

__all__ = ["CPU_OPTIONS", "YNN_FUSION_OPTION", "compiler_options"]

#: The DebugOptions field that chooses which operations XLA:CPU gives to YNNPACK.
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"

#: jdl's CPU options: YNNPACK for dots and reductions, as XLA's default, but not for
#: convolutions on their own.
CPU_OPTIONS: dict[str, str] = {
    YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def compiler_options(platform: str | None = None) -> dict[str, str]:
    """The `compiler_options` for a `jax.jit` whose program runs on `platform`.

    Args:
      platform: "cpu", "gpu", "tpu", ...; None means JAX's default backend.

    Returns:
      `CPU_OPTIONS` (a fresh dict) for CPU, unless `XLA_FLAGS` names one of its options
      or this jaxlib rejects them; an empty dict otherwise. Safe to pass as
      `jax.jit(fn, compiler_options=compiler_options())`.
    """
    platform = platform or jax.default_backend()
    if platform != "cpu" or _set_by_user() or not _cpu_options_supported():
        return {}
    return dict(CPU_OPTIONS)


def _set_by_user() -> bool:
    flags = os.environ.get("XLA_FLAGS", "")
    return any(option in flags for option in CPU_OPTIONS)


@functools.cache
def _cpu_options_supported() -> bool:
    """Whether this jaxlib compiles a CPU program with `CPU_OPTIONS` (cached per process)."""
    cpu_zero = jax.device_put(jnp.zeros((), jnp.float32), jax.devices("cpu")[0])
    probe = jax.jit(lambda x: x + 1).lower(cpu_zero)
    try:
        probe.compile(compiler_options=CPU_OPTIONS)
    except Exception:  # an unknown option or value: XLA's defaults, not a failed run
        return False
    return True
