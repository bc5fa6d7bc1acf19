"""`summary(model, x)`: a model's layers, output shapes, parameter counts and FLOPs.

One trace of the model's forward pass (`jax.make_jaxpr`, nothing runs on a device)
gives everything:

- the layers: every `nnx.Module` in the model, with its path ("blocks/0/attn") and type;
- each layer's output shape: recorded when the layer is called during the trace (the
  first call, for a layer called several times; none for a layer the forward pass does
  not call);
- parameter counts: entries of the layer's `nnx.Param` variables ("params", what the
  optimizer trains) and of its other variables ("other state": batch-norm statistics,
  RNG keys and counters), the layer's whole subtree included. The model's totals equal
  `jdl.count_params` of a `TrainState`'s `params` and `model_state`;
- forward FLOPs per example, counted from the jaxpr as the benchmarks count them: matrix
  multiplications (`dot_general`: 2 x output size x contracted size) and convolutions
  (`conv_general_dilated`: 2 x output size x kernel size per output); elementwise work,
  normalisation, softmax and gathers are left out (a few percent on the model zoo). A
  `scan` body counts `length` times, the costlier branch of a `cond` once, a `while`
  body once (its trip count is not static). A layer's FLOPs include its sublayers'.

Layers are told apart in the jaxpr by a `jax.named_scope` opened around each call: while
the model is traced, the `__call__` of its module classes is wrapped (and restored
afterwards) in a function that does nothing for any module outside the summarised copy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.extend import core as jex_core

from jdl.errors import UserError

SUMMARY_TEXT_FILE = "summary.txt"
SUMMARY_JSON_FILE = "summary.json"

# A static attribute set on each module of the summarised copy: it survives nnx.split /
# nnx.merge (it is part of the graph definition), so modules re-created inside NNX
# transforms such as `nnx.remat` are still recognised.
_TAG_ATTRIBUTE = "_jdl_summary_index"
_SCOPE_PREFIX = "jdl_summary_layer_"
_SCOPE_PATTERN = re.compile(_SCOPE_PREFIX + r"(\d+)")


class SummaryInputError(UserError, ValueError):
    """The example input cannot be fed to the model (wrong type, rank or shape)."""


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One row of a `Summary`.

    Attributes:
      path: the module's path in the model, parts joined by "/" ("" for the model).
      type: the module's class name.
      outputs: (shape, dtype name) of each array the layer's first call returned, the
        batch axis included; empty when the forward pass did not call the layer.
      params: entries of the `nnx.Param` variables in the layer's subtree.
      other_state: entries of its other variables (batch statistics, RNG state, ...).
      flops: forward FLOPs per example of the layer's calls (sublayers included).
    """

    path: str
    type: str
    outputs: tuple[tuple[tuple[int, ...], str], ...]
    params: int
    other_state: int
    flops: int

    @property
    def depth(self) -> int:
        """0 for the model itself, 1 for its direct sublayers, and so on."""
        return 0 if not self.path else self.path.count("/") + 1

    def output_text(self) -> str:
        """The outputs as "float32[8,10]" (several joined by ", "; "-" when never called)."""
        if not self.outputs:
            return "-"
        return ", ".join(f"{dtype}[{','.join(map(str, shape))}]" for shape, dtype in self.outputs)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "type": self.type,
            "outputs": [{"shape": list(shape), "dtype": dtype} for shape, dtype in self.outputs],
            "params": self.params,
            "other_state": self.other_state,
            "flops": self.flops,
        }


@dataclasses.dataclass(frozen=True)
class Summary:
    """The summary of one model for one input shape; `str()` is the console table.

    Attributes:
      model_type: the model's class name.
      input_shape: shape of the example input (batch axis first).
      input_dtype: its dtype name.
      layers: one `LayerSummary` per module, the model first, then depth-first in
        definition order.
      total_params: `nnx.Param` entries of the whole model (what the optimizer trains).
      total_other_state: entries of every other variable.
      total_flops: forward FLOPs per example of the whole model.
    """

    model_type: str
    input_shape: tuple[int, ...]
    input_dtype: str
    layers: tuple[LayerSummary, ...]
    total_params: int
    total_other_state: int
    total_flops: int

    def headline(self) -> str:
        """One line: the totals, e.g. "CNN: 1,234 params, 5 other state; 2.1 MFLOPs/example"."""
        return (
            f"{self.model_type}: {self.total_params:,} params (trainable), "
            f"{self.total_other_state:,} other state; forward "
            f"{format_flops(self.total_flops)} per example (matmuls and convolutions)"
        )

    def format(self, depth: int | None = None, *, max_rows: int | None = None) -> str:
        """The headline and a plain-text table of the layers down to `depth` (None: all).

        With `max_rows` (and no `depth`), the table goes as deep as it can while holding
        at most that many rows (at least the model and its direct sublayers). Rows left
        out of the table still count in the totals; a last line says how many there are.
        """
        if depth is None and max_rows is not None:
            deepest = max(layer.depth for layer in self.layers)
            depth = 1
            while depth < deepest and self._rows_to(depth + 1) <= max_rows:
                depth += 1
        rows = [layer for layer in self.layers if depth is None or layer.depth <= depth]
        header = ("path", "type", "output", "params", "other state", "FLOPs/example")
        cells = [
            (
                "  " * layer.depth + (layer.path.rsplit("/", 1)[-1] if layer.path else "(model)"),
                layer.type,
                layer.output_text(),
                f"{layer.params:,}",
                f"{layer.other_state:,}",
                f"{layer.flops:,}",
            )
            for layer in rows
        ]
        total = ("total", "", "", f"{self.total_params:,}", f"{self.total_other_state:,}")
        total += (f"{self.total_flops:,}",)
        widths = [max(len(row[i]) for row in [header, *cells, total]) for i in range(6)]
        numeric = (False, False, False, True, True, True)

        def line(row):
            parts = [
                cell.rjust(width) if right else cell.ljust(width)
                for cell, width, right in zip(row, widths, numeric, strict=True)
            ]
            return "  ".join(parts).rstrip()

        rule = "-" * len(line(tuple("-" * w for w in widths)))
        shape = f"{self.input_dtype}[{','.join(map(str, self.input_shape))}]"
        lines = [self.headline(), f"input: {shape}", rule, line(header), rule]
        lines += [line(row) for row in cells]
        lines += [rule, line(total)]
        if len(rows) < len(self.layers):
            lines.append(f"({len(self.layers) - len(rows)} layers deeper than {depth} not shown)")
        return "\n".join(lines)

    def _rows_to(self, depth: int) -> int:
        return sum(layer.depth <= depth for layer in self.layers)

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict:
        """The summary as JSON-able Python values (ints, strings, lists, dicts)."""
        return {
            "model_type": self.model_type,
            "input": {"shape": list(self.input_shape), "dtype": self.input_dtype},
            "total_params": self.total_params,
            "total_other_state": self.total_other_state,
            "total_flops_per_example": self.total_flops,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def write(self, directory: str) -> tuple[str, str]:
        """Writes `summary.txt` (the full table) and `summary.json` (`to_dict`) to `directory`.

        Each file is written to a temporary name and renamed, so a reader never sees half.

        Returns:
          The two paths (text, JSON).
        """
        os.makedirs(directory, exist_ok=True)
        text_path = os.path.join(directory, SUMMARY_TEXT_FILE)
        json_path = os.path.join(directory, SUMMARY_JSON_FILE)
        _write_atomically(text_path, self.format() + "\n")
        _write_atomically(json_path, json.dumps(self.to_dict(), indent=2) + "\n")
        return text_path, json_path


def summary(model: nnx.Module, example: Any) -> Summary:
    """Summarises `model` for inputs like `example`; the model itself is left unchanged.

    The model is traced in its current mode (train or eval) on a copy: its variables,
    RNG counters and mode are the same afterwards, and nothing is computed on a device.

    Args:
      model: an initialised NNX module, called as `model(x)`.
      example: the input `x` with a leading batch axis (an array or a
        `jax.ShapeDtypeStruct`), or a data batch: a mapping whose "x" entry is the input.
        Only its shape and dtype matter; FLOPs are divided by its batch size.

    Returns:
      The `Summary`.

    Raises:
      SummaryInputError: `example` is not an array with a batch axis (or a batch with
        "x"), or the model cannot take an input of its shape.
    """
    x = _example_input(example)
    copy = nnx.clone(model)
    tagged = _modules(copy)
    for tag, (_, module) in enumerate(tagged):
        setattr(module, _TAG_ATTRIBUTE, tag)
    graphdef, state = nnx.split(copy)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    with _ScopedCalls({type(module) for _, module in tagged}) as calls:
        try:
            jaxpr = jax.make_jaxpr(forward)(state, x)
        except (TypeError, ValueError) as error:
            message = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise SummaryInputError(
                f"{type(model).__name__} cannot take an input of shape {tuple(x.shape)} and "
                f"dtype {x.dtype}: {message}; pass an example batch the model accepts"
            ) from error

    by_scopes: Counter[frozenset] = Counter()
    total = _count_flops(jaxpr.jaxpr, "", by_scopes)
    # An operation counts once for every layer that encloses it: the layers whose calls
    # it ran in and the containers (lists, blocks that are not called) holding those.
    paths = [path for path, _ in tagged]
    flops_by_path: Counter[tuple] = Counter()
    for tags, flops in by_scopes.items():
        enclosing = {paths[tag][:k] for tag in tags for k in range(len(paths[tag]) + 1)}
        for path in enclosing:
            flops_by_path[path] += flops
    batch = x.shape[0]
    layers = []
    for path, module in _modules_in_order(copy, calls.first_call):
        _, params, rest = nnx.split(module, nnx.Param, ...)
        layers.append(
            LayerSummary(
                path="/".join(map(str, path)),
                type=type(module).__name__,
                outputs=calls.outputs.get(getattr(module, _TAG_ATTRIBUTE), ()),
                params=_count(params),
                other_state=_count(rest),
                flops=_per_example(flops_by_path[path], batch),
            )
        )
    return Summary(
        model_type=type(model).__name__,
        input_shape=tuple(int(d) for d in x.shape),
        input_dtype=str(np.dtype(x.dtype)),
        layers=tuple(layers),
        total_params=layers[0].params,
        total_other_state=layers[0].other_state,
        total_flops=_per_example(total, batch),
    )


def format_flops(flops: float) -> str:
    """A FLOP count with a unit: "512 FLOPs", "1.57 MFLOPs", "4.10 GFLOPs"."""
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:,.0f} FLOPs"


# ----------------------------------------------------------------------------- tracing


def _example_input(example: Any) -> jax.ShapeDtypeStruct:
    if isinstance(example, Mapping):
        if "x" not in example:
            raise SummaryInputError(
                f"the example batch has keys {sorted(map(str, example))} but no 'x'; "
                "pass the model's input or a batch with an 'x' entry"
            )
        example = example["x"]
    shape, dtype = getattr(example, "shape", None), getattr(example, "dtype", None)
    if shape is None or dtype is None:
        if isinstance(example, list | tuple | int | float):
            example = np.asarray(example)
            shape, dtype = example.shape, example.dtype
        else:
            raise SummaryInputError(
                f"the example input is a {type(example).__name__}, not an array; pass an "
                "array (or jax.ShapeDtypeStruct) with a leading batch axis"
            )
    if len(shape) == 0 or shape[0] < 1:
        raise SummaryInputError(
            f"the example input has shape {tuple(shape)}; it needs a leading batch axis "
            "of at least one example, e.g. x[None] for a single example"
        )
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _modules_in_order(
    model: nnx.Module, call_order: dict[int, int]
) -> list[tuple[tuple, nnx.Module]]:
    """(path, module) of every module of `model`, parents before children.

    Siblings come in the order the forward pass first called them (or any module of
    theirs; `call_order` maps each tagged module's tag to its first call), so the table
    reads like the forward pass; modules it never calls come after, by path.
    """
    found = _modules(model)
    order: dict[tuple, tuple] = {}
    for position, (path, module) in enumerate(found):
        rank = (call_order.get(getattr(module, _TAG_ATTRIBUTE), math.inf), position)
        for k in range(len(path) + 1):
            order[path[:k]] = min(order.get(path[:k], rank), rank)

    def key(item):
        path = item[0]
        return tuple(order[path[: k + 1]] for k in range(len(path)))

    return sorted(found, key=key)


def _modules(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    return [
        (tuple(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)
    ]


class _ScopedCalls:
    """Within the block, each call of a tagged module of `types` runs in a named scope and
    records its first call (`first_call`: tag -> call number) and output shapes
    (`outputs`: tag -> ((shape, dtype), ...)); other instances run unchanged."""

    def __init__(self, types: set[type]):
        self.types = types
        self.first_call: dict[int, int] = {}
        self.outputs: dict[int, tuple] = {}
        self.saved: dict[type, Any] = {}
        self.active: list[int] = []

    def __enter__(self):
        # Resolved before any patching; a class with no __call__ of its own or inherited (a
        # container such as nnx.List) is skipped (cls.__call__ would be its metaclass's).
        originals = {
            cls: cls.__call__
            for cls in self.types
            if any("__call__" in base.__dict__ for base in cls.__mro__)
        }
        for cls, original in originals.items():
            self.saved[cls] = cls.__dict__.get("__call__", _MISSING)
            cls.__call__ = self._wrap(original)
        return self

    def __exit__(self, *exc_info):
        for cls, saved in self.saved.items():
            if saved is _MISSING:
                delattr(cls, "__call__")
            else:
                cls.__call__ = saved
        return False

    def _wrap(self, original):
        calls = self

        def call(module, *args, **kwargs):
            tag = getattr(module, _TAG_ATTRIBUTE, None)
            # An untagged module, or a subclass's __call__ reaching its base's: as before.
            if tag is None or (calls.active and calls.active[-1] == tag):
                return original(module, *args, **kwargs)
            calls.first_call.setdefault(tag, len(calls.first_call))
            calls.active.append(tag)
            try:
                with jax.named_scope(f"{_SCOPE_PREFIX}{tag}"):
                    out = original(module, *args, **kwargs)
            finally:
                calls.active.pop()
            if tag not in calls.outputs:
                calls.outputs[tag] = tuple(
                    (tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype)))
                    for leaf in jax.tree.leaves(out)
                    if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
                )
            return out

        return call


_MISSING = object()


# ----------------------------------------------------------------------------- FLOPs


def _count_flops(jaxpr: jex_core.Jaxpr, prefix: str, by_scopes: Counter) -> int:
    """Matmul and convolution FLOPs of `jaxpr`, also added up in `by_scopes` by the set of
    layer tags whose named scopes enclose each operation.

    Name stacks inside a sub-program are relative to the equation that holds it, hence
    `prefix`.
    """
    total = 0
    for eqn in jaxpr.eqns:
        stack = "/".join(part for part in (prefix, str(eqn.source_info.name_stack)) if part)
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            flops = _dot_general_flops(eqn) if name == "dot_general" else _conv_flops(eqn)
            by_scopes[frozenset(int(tag) for tag in _SCOPE_PATTERN.findall(stack))] += flops
            total += flops
        elif name == "scan":
            inner: Counter[frozenset] = Counter()
            body = _count_flops(eqn.params["jaxpr"].jaxpr, stack, inner)
            length = eqn.params["length"]
            by_scopes.update({tags: length * flops for tags, flops in inner.items()})
            total += length * body
        elif name == "cond":
            branches = []
            for branch in eqn.params["branches"]:
                inner = Counter()
                branches.append((_count_flops(branch.jaxpr, stack, inner), inner))
            flops, inner = max(branches, key=lambda item: item[0])
            by_scopes.update(inner)
            total += flops
        else:  # jit, closed_call, remat, custom_jvp/vjp, while (body once): once each
            total += sum(_count_flops(sub, stack, by_scopes) for sub in _sub_jaxprs(eqn.params))
    return total


def _sub_jaxprs(params: dict[str, Any]) -> list[jex_core.Jaxpr]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jex_core.Jaxpr):
                found.append(item)
    return found


def _dot_general_flops(eqn: jex_core.JaxprEqn) -> int:
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contracting)
    return 2 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _conv_flops(eqn: jex_core.JaxprEqn) -> int:
    # rhs_spec lists the kernel's (output feature, input feature, *spatial) dimensions; the
    # kernel's input-feature size is already in_channels / feature_group_count.
    _, rhs_spec, _ = eqn.params["dimension_numbers"]
    kernel_shape = eqn.invars[1].aval.shape
    per_output = math.prod(kernel_shape[d] for d in rhs_spec[1:])
    return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output


# ----------------------------------------------------------------------------- helpers


def _count(state: Any) -> int:
    return sum(int(leaf.size) for leaf in jax.tree.leaves(state))


def _per_example(flops: int, batch: int) -> int:
    return round(flops / batch)


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
