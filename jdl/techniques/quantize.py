"""Int8 quantization of jdl models with qwix: post-training (PTQ) and quantization-aware training.

Three modes, one function each, all returning a new NNX model (the input is not changed):

* `quantize_ptq(model, x)`: weights to int8 with one float32 scale per output channel
  (symmetric, absmax). Matmuls take float activations. The model's `nnx.Param`s become
  int8 `qvalue`s plus `scale`s: about 4x fewer bytes for the weights.
* `quantize_ptq(model, x, activations=True)`: weights as above, and every matmul and
  convolution input quantized to int8 on the fly (dynamic range, one scale per example
  and channel group), so the matmuls run int8 x int8.
* `quantize_qat(model, x)`: the same int8 arithmetic simulated in the forward pass
  ("fake quantization" with straight-through gradients) while the float weights train;
  the model goes through `jdl.TrainState.create` and `jdl.make_train_step` unchanged. Train,
  then `quantize_ptq` the trained model for int8 weights that the network has adapted to.

qwix intercepts `jax.lax.dot_general` and `jax.lax.conv_general_dilated` inside the
model's `__call__`, so every `nnx.Linear`, `nnx.Conv`, `nnx.Einsum` and attention
projection is covered. qwix's PTQ convolution needs quantized activations as well, so
weight-only mode quantizes the dense layers and leaves convolutions in float32.

`x` is one example batch: qwix runs the model once on it to find the layers and to
replace their weights; its values do not matter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

if TYPE_CHECKING:
    import qwix

# The ops of dense layers; convolutions are named "conv_general_dilated".
DENSE_OPS = ("dot_general", "einsum", "dot")


def int8_rules(
    *, activations: bool, module_path: str = ".*", qat: bool = False
) -> list[qwix.QuantizationRule]:
    """The qwix rules of jdl's int8 modes.

    Args:
      activations: also quantize the inputs of every matmul/convolution (dynamic range).
        Without it, only dense layers are quantized (qwix has no weight-only int8 conv).
      module_path: regex over module paths ("hidden/0", "stages/1/0/conv1") selecting the
        layers to quantize; e.g. "^(?!head).*" keeps the head in float.
      qat: rules for quantization-aware training (`qwix.QtRule`) instead of PTQ.

    Returns:
      A one-rule list for `qwix.PtqProvider` / `qwix.QtProvider`.
    """
    import qwix  # on first use: importing qwix is slow, and `import jdl` must not pay for it

    rule_type = qwix.QtRule if qat else qwix.QuantizationRule
    return [
        rule_type(
            module_path=module_path,
            op_names=() if activations else DENSE_OPS,
            weight_qtype=jnp.int8,
            act_qtype=jnp.int8 if activations else None,
        )
    ]


def quantize_ptq(
    model: nnx.Module, x: Any, *, activations: bool = False, module_path: str = ".*"
) -> nnx.Module:
    """Post-training int8 quantization: a copy of `model` with int8 weights.

    Args:
      model: a trained jdl model (a QAT model from `quantize_qat` works too).
      x: an example input batch, as the model takes it (values unused beyond tracing).
      activations: also quantize activations (int8 x int8 matmuls); else weights only.
      module_path: regex of the layers to quantize (see `int8_rules`).

    Returns:
      The quantized model in eval mode. Its `nnx.Param`s hold int8 `qvalue`s and float32
      `scale`s; `nnx.split` / `nnx.merge` and `jax.jit` work as for any NNX model.
    """
    import qwix

    provider = qwix.PtqProvider(int8_rules(activations=activations, module_path=module_path))
    model = nnx.clone(model)
    model.eval()
    quantized = qwix.quantize_model(model, provider, x)
    quantized.eval()
    return quantized


def quantize_qat(
    model: nnx.Module, x: Any, *, activations: bool = True, module_path: str = ".*"
) -> nnx.Module:
    """A copy of `model` that trains with int8 quantization simulated in its forward pass.

    The float32 weights stay the parameters (gradients pass straight through the
    rounding), so `jdl.TrainState.create(qat_model, tx)` and `jdl.make_train_step` work
    as usual. After training, `quantize_ptq(trained, x, activations=...)` gives the
    deployable int8 model.

    Args:
      model: a jdl model, typically already trained in float32.
      x: an example input batch.
      activations: simulate int8 activations too (match `quantize_ptq`'s mode).
      module_path: regex of the layers to quantize.
    """
    import qwix

    provider = qwix.QtProvider(
        int8_rules(activations=activations, module_path=module_path, qat=True)
    )
    model = nnx.clone(model)
    model.eval()  # the tracing call must not update batch statistics
    return qwix.quantize_model(model, provider, x)


def model_size_bytes(model: nnx.Module) -> int:
    """Bytes of all `nnx.Param` arrays of `model` (int8 values and their scales included)."""
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def dequantized_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Each quantized weight of a PTQ model as float32 (`qvalue * scale`), by "a/b/kernel" path.

    Useful to inspect the rounding error per layer; layers left in float are skipped.
    """
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for path, variable in flat.items():
        if path[-1] != "qvalue":
            continue
        scale = flat[path[:-1] + ("scale",)].get_value()
        name = "/".join(str(p) for p in path[:-2])  # drop ("array", "qvalue")
        out[name] = variable.get_value().astype(jnp.float32) * scale
    return out
