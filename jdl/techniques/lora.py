"""Low-rank adaptation (LoRA): train small adapters next to frozen weights, then merge them in.

Each selected dense layer `y = x W + b` becomes `y = x W + b + (alpha / rank) * x A B`,
with A (in, rank) drawn at random and B (rank, out) zeros, so an adapted model starts out
computing exactly what the base model computes. Only A and B are trained; `merge` folds
them into W for export, giving back the plain model class with the original layout.

    model = jdl.models.GPT(...)                      # e.g. pretrained weights
    lora.add_lora(model, rank=8)                     # attention + MLP layers, in place
    tx = lora.optimizer(optax.adamw(1e-3))           # updates the adapters only
    state = jdl.TrainState.create(model, tx)         # optimizer state: adapters only
    result = jdl.fit(state, ...)
    lora.save_adapters("adapters/", result.state)    # a few hundred KB, not the model
    merged = lora.merge(result.state.eval_model())   # a plain GPT with W + alpha/rank A B

The adapters are `nnx.LoRA` modules; their arrays are `nnx.LoRAParam`s (a kind of
`nnx.Param`, so `jdl.TrainState` and its checkpoints hold them with everything else). The
base weights stay `nnx.Param`s and are frozen by the optimizer: `optimizer` gives them
`optax.set_to_zero()` updates and no optimizer state, so their values stay bit for bit
and their gradients, being unused, are removed by XLA from the compiled step.

Layers are named by their path in the model joined with "/", e.g. "blocks/0/attn/qkv",
and selected with `fnmatch` patterns: the default, `DEFAULT_TARGETS`, matches the
attention projections and both MLP layers of every block of `GPT`, `ViT` and
`EncoderClassifier`; add "head" to adapt an untied output layer as well.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdl.errors import UserError
from jdl.jsonio import write_json
from jdl.state import TrainState

__all__ = [
    "ADAPTERS_FILE",
    "CONFIG_FILE",
    "DEFAULT_TARGETS",
    "LoRAError",
    "LoRALinear",
    "add_lora",
    "adapter_params",
    "count_adapter_params",
    "count_trainable_params",
    "load_adapters",
    "lora_layers",
    "merge",
    "optimizer",
    "save_adapters",
]

DEFAULT_TARGETS = ("*attn/qkv", "*attn/out", "*mlp/fc1", "*mlp/fc2")
ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
_FORMAT = "jdl-lora-1"
ADAPTER = "adapter"
FROZEN = "frozen"


class LoRAError(UserError, ValueError):
    """A LoRA request that cannot be met: no layer matches, a wrong file or shape, twice applied."""


class LoRALinear(nnx.Module):
    """A frozen `nnx.Linear` plus a trainable low-rank update: `base(x) + scale * x A B`.

    Args:
      base: the dense layer to adapt; it is kept as `self.base`, unchanged.
      rank: r, the inner width of the adapter.
      alpha: the scale is `alpha / rank`; None means `alpha = rank` (scale 1).
      rngs: NNX random streams; `params` draws A (he-uniform, `nnx.LoRA`'s default).

    Attributes:
      base: the original layer (its `kernel` and `bias` keep their dtype and values).
      lora: an `nnx.LoRA` with `lora_a` (in, r) and `lora_b` (r, out), both `nnx.LoRAParam`.
      scale: alpha / rank.

    Call: `(..., in)` -> `(..., out)` in the base layer's output dtype.
    """

    def __init__(self, base: nnx.Linear, rank: int, *, alpha: float | None = None, rngs: nnx.Rngs):
        if not isinstance(base, nnx.Linear):
            raise LoRAError(f"LoRA adapts nnx.Linear layers, got {type(base).__name__}")
        if rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / self.rank
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora = nnx.LoRA(
            base.in_features,
            rank,
            base.out_features,
            param_dtype=base.kernel[...].dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)  # (..., out)
        return y + (self.scale * self.lora(x)).astype(y.dtype)

    def merged(self) -> nnx.Linear:
        """A new `nnx.Linear` computing the same function: kernel `W + scale * A B`.

        The product is formed in float32 and cast to the kernel's dtype; the bias and
        every other setting of the base layer are kept.
        """
        kernel = self.base.kernel[...]
        delta = self.scale * (
            self.lora.lora_a[...].astype(jnp.float32) @ self.lora.lora_b[...].astype(jnp.float32)
        )
        merged = nnx.clone(self.base)
        merged.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
        return merged


# ---------------------------------------------------------------------------------------------
# Adding, finding and merging adapters
# ---------------------------------------------------------------------------------------------


def _path_name(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def lora_layers(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    """Every `LoRALinear` in `model` with its path ("blocks/0/attn/qkv"), in graph order."""
    return [
        (_path_name(path), module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, LoRALinear)
    ]


def _set_child(model: nnx.Module, path: tuple, child: nnx.Module) -> None:
    """Replaces the submodule at `path` (attribute names and list indices) by `child`."""
    parent = model
    for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    last = path[-1]
    if isinstance(last, int):
        parent[last] = child
    else:
        setattr(parent, last, child)


def add_lora(
    model: nnx.Module,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] | Callable[[str, nnx.Linear], bool] = DEFAULT_TARGETS,
    seed: int = 0,
) -> nnx.Module:
    """Wraps the selected dense layers of `model` in `LoRALinear` adapters, in place.

    The model computes exactly what it did before (B starts at zero).

    Args:
      model: any NNX module; its `nnx.Linear` layers are the candidates.
      rank: r of every adapter.
      alpha: adapter scale numerator (`alpha / rank`); None: scale 1.
      targets: `fnmatch` patterns over the layers' paths ("*" also matches "/"),
        e.g. `("*attn/qkv", "head")`, or a predicate `(path, layer) -> bool`.
      seed: seed of the A matrices, drawn in the layers' graph order.

    Returns:
      `model`, modified in place.

    Raises:
      LoRAError: no dense layer matches `targets`, a match already has an adapter, or
        `rank < 1`.
    """
    if rank < 1:
        raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
    if callable(targets):
        matches = targets
    else:
        patterns = (targets,) if isinstance(targets, str) else tuple(targets)

        def matches(name: str, _) -> bool:
            return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    found = [
        (path, module)
        for path, module in nnx.iter_modules(model)
        if path
        and isinstance(module, nnx.Linear | LoRALinear)
        and matches(_path_name(path), module)
    ]
    # A base layer inside an adapter matches as ".../base"; report the adapter, not that.
    adapted = [_path_name(p) for p, m in found if isinstance(m, LoRALinear) or p[-1] == "base"]
    if adapted:
        raise LoRAError(f"{adapted[0]} already has a LoRA adapter; merge it first or skip it")
    if not found:
        dense = [_path_name(p) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
        raise LoRAError(
            f"no dense layer of {type(model).__name__} matches {targets!r}; "
            f"its dense layers: {dense[:8]}{' ...' if len(dense) > 8 else ''}"
        )
    rngs = nnx.Rngs(params=seed)
    for path, module in found:
        _set_child(model, path, LoRALinear(module, rank, alpha=alpha, rngs=rngs))
    return model


def merge(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with every adapter folded into its layer: plain `nnx.Linear`s again.

    The copy has the original model's structure and parameter paths (what `add_lora`
    started from), so it exports, checkpoints and loads like a model that never had
    adapters; it computes the adapted model's function up to float rounding. `model`
    itself is not modified.
    """
    merged = nnx.clone(model)
    for path, module in list(nnx.iter_modules(merged)):
        if isinstance(module, LoRALinear):
            _set_child(merged, path, module.merged())
    return merged


# ---------------------------------------------------------------------------------------------
# Training only the adapters
# ---------------------------------------------------------------------------------------------


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _under(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether the parameter `name` ("blocks/0/ln1/scale") or a module holding it
    ("blocks/0/ln1", "blocks/0", ...) matches one of the `fnmatch` `patterns`."""
    parts = name.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return any(
        fnmatch.fnmatchcase(prefix, pattern.strip("/"))
        for pattern in patterns
        for prefix in prefixes
    )


def _labels(params, also_train: tuple[str, ...]):
    """ "adapter" for every LoRAParam and every param under `also_train`; "frozen" otherwise."""
    from jdl.techniques.transfer import param_path  # the one path spelling of jdl

    def label(path, variable) -> str:
        trainable = isinstance(variable, nnx.LoRAParam) or _under(param_path(path), also_train)
        return ADAPTER if trainable else FROZEN

    labels = jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_variable)
    if ADAPTER not in jax.tree.leaves(labels):
        raise LoRAError(
            "the parameters hold no LoRA adapter (call lora.add_lora(model) before "
            "TrainState.create) and no path under also_train"
        )
    return labels


def optimizer(
    tx: optax.GradientTransformation, *, also_train: Sequence[str] = ()
) -> optax.GradientTransformation:
    """`tx` on the adapters (and the `also_train` parameters); every other parameter frozen.

    Frozen parameters get `optax.set_to_zero()` updates and no optimizer state (their
    leaves in `tx`'s state are `optax.MaskedNode`s), so the optimizer's memory is that of
    the adapters, and weight decay inside `tx` does not touch the frozen weights.

    Args:
      tx: the optimizer of the adapters, e.g. `optax.adamw(1e-3)`.
      also_train: parameters to train as well, named by their path or a module's path
        ("head", "ln_f", "blocks/0/ln1/scale"), or by `fnmatch` patterns over those paths
        ("*ln1": the first LayerNorm of every block; "*" also matches "/").

    Raises (when the optimizer is initialised):
      LoRAError: the parameters have no adapter and nothing matches `also_train`.
    """
    also_train = tuple(also_train)
    return optax.multi_transform(
        {ADAPTER: tx, FROZEN: optax.set_to_zero()}, lambda params: _labels(params, also_train)
    )


def _params_of(model_or_state) -> nnx.State:
    if isinstance(model_or_state, TrainState):
        return model_or_state.params
    if isinstance(model_or_state, nnx.Module):
        return nnx.state(model_or_state, nnx.Param)
    return model_or_state


def adapter_params(model_or_state) -> nnx.State:
    """The `nnx.LoRAParam`s of a model, a `TrainState` or a params `nnx.State`."""
    return nnx.filter_state(_params_of(model_or_state), nnx.LoRAParam)


def count_adapter_params(model_or_state) -> tuple[int, int]:
    """(adapter parameters, all parameters) of a model, `TrainState` or params state."""
    params = _params_of(model_or_state)
    adapters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapter_params(params)))
    return adapters, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def count_trainable_params(model_or_state, *, also_train: Sequence[str] = ()) -> tuple[int, int]:
    """(trained parameters, all parameters) under `optimizer(tx, also_train=also_train)`.

    The trained ones are the adapters plus every parameter `also_train` names, counted
    once; pass the same `also_train` as to `optimizer`.
    """
    from jdl.techniques.transfer import param_path

    params = _params_of(model_or_state)
    also_train = tuple(also_train)
    trained = total = 0
    for path, value in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
        size = int(np.prod(value.shape))
        total += size
        if isinstance(value, nnx.LoRAParam) or _under(param_path(path), also_train):
            trained += size
    return trained, total


# ---------------------------------------------------------------------------------------------
# Adapter checkpoints
# ---------------------------------------------------------------------------------------------


def _flat_adapters(params: nnx.State) -> dict[str, np.ndarray]:
    from jdl.techniques.transfer import param_path

    flat = {}
    for path, value in jax.tree_util.tree_flatten_with_path(adapter_params(params))[0]:
        flat[param_path(path)] = np.asarray(jax.device_get(value))
    return flat


def save_adapters(
    directory: str | os.PathLike[str], model_or_state, *, also_train: Sequence[str] = ()
) -> Path:
    """Writes the adapters alone: `adapters.safetensors` and `adapter_config.json`.

    The safetensors file maps each adapter's path ("blocks/0/attn/qkv/lora/lora_a") to
    its array, and each parameter trained next to the adapters (`also_train`, as given to
    `optimizer`) to its whole array ("head/kernel"); the JSON file records the adapted
    layers, ranks and alphas and those parameters' paths (under "trained"), so that
    `load_adapters` can turn a fresh base model into the fine-tuned one. Each file is
    written to a temporary name and renamed, so a reader never sees half a file.

    Args:
      directory: created if needed.
      model_or_state: an adapted model, or a `TrainState` of one (its current params).
      also_train: the `also_train` of the optimizer that trained the adapters.

    Returns:
      The directory.

    Raises:
      LoRAError: there are no adapters to save.
    """
    from safetensors.numpy import save_file

    params = _params_of(model_or_state)
    flat = _flat_adapters(params)
    if not flat:
        raise LoRAError("the model has no LoRA adapters to save; call lora.add_lora first")
    layers = _layer_records(model_or_state, flat)
    trained = _flat_trained(params, tuple(also_train))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (ADAPTERS_FILE + ".tmp")
    save_file({**flat, **trained}, str(tmp), metadata={"format": _FORMAT})
    os.replace(tmp, directory / ADAPTERS_FILE)
    record = {"format": _FORMAT, "layers": layers, "trained": sorted(trained)}
    write_json(directory / CONFIG_FILE, record)
    return directory


def _flat_trained(params: nnx.State, also_train: tuple[str, ...]) -> dict[str, np.ndarray]:
    """{path: array} of the parameters `also_train` names (adapters excluded)."""
    from jdl.techniques.transfer import param_path

    flat = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
        name = param_path(path)
        if not isinstance(value, nnx.LoRAParam) and _under(name, also_train):
            flat[name] = np.asarray(jax.device_get(value[...]))
    return flat


def _layer_records(model_or_state, flat: dict[str, np.ndarray]) -> dict[str, dict]:
    """{layer path: {"rank", "alpha"}} of the adapted layers."""
    if isinstance(model_or_state, TrainState):
        model_or_state = nnx.merge(
            model_or_state.graphdef, model_or_state.params, model_or_state.model_state
        )
    if isinstance(model_or_state, nnx.Module):
        return {
            path: {"rank": layer.rank, "alpha": layer.alpha}
            for path, layer in lora_layers(model_or_state)
        }
    # A bare params state: the scale is unknown there, so alpha = rank is recorded.
    suffix = "/lora/lora_a"
    return {
        name[: -len(suffix)]: {"rank": int(value.shape[1]), "alpha": float(value.shape[1])}
        for name, value in flat.items()
        if name.endswith(suffix)
    }


def load_adapters(directory: str | os.PathLike[str], model: nnx.Module) -> nnx.Module:
    """Puts the adapters saved by `save_adapters` into `model`, in place.

    A model without adapters (the base model) first gets the recorded ones (`add_lora` on
    the recorded layers with their rank and alpha); a model with adapters must have
    exactly the recorded layers. Every saved array must fill an adapter of the same
    shape, and every adapter must be filled; the parameters saved whole (`also_train`)
    replace the model's.

    Returns:
      `model`.

    Raises:
      LoRAError: missing or unreadable files, or adapters that do not fit the model.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    try:
        with open(directory / CONFIG_FILE) as f:
            config = json.load(f)
        flat = load_file(str(directory / ADAPTERS_FILE))
    except FileNotFoundError as error:
        raise LoRAError(
            f"{directory} has no {Path(error.filename).name}; pass a directory written by "
            "lora.save_adapters"
        ) from error
    except (json.JSONDecodeError, SafetensorError, OSError) as error:
        raise LoRAError(f"cannot read the adapters in {directory}: {error}") from error
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        raise LoRAError(f"{directory / CONFIG_FILE} is not a jdl LoRA adapter config")
    layers = config["layers"]
    present = dict(lora_layers(model))
    if not present:
        for path, record in layers.items():
            add_lora(model, rank=record["rank"], alpha=record["alpha"], targets=[path])
    elif set(present) != set(layers):
        extra = sorted(set(present) ^ set(layers))
        raise LoRAError(
            f"the model's adapters differ from the saved ones at {extra[:4]}; load into the "
            "base model or one adapted the same way"
        )
    else:
        for path, record in layers.items():
            if present[path].alpha != record["alpha"]:
                raise LoRAError(
                    f"{path}: the model's adapter has alpha {present[path].alpha}, the saved "
                    f"one {record['alpha']}"
                )
    from jdl.techniques.transfer import param_path

    trained = set(config.get("trained", []))
    state = adapter_params(model)
    expected = {param_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
    if expected != set(flat) - trained:
        missing = sorted((set(flat) - trained) ^ expected)
        raise LoRAError(f"saved adapters and the model's adapters differ at {missing[:4]}")

    def fill(names: set[str]):
        def put(path, variable):
            name = param_path(path)
            if name not in names:
                return variable
            value = flat[name]
            if value.shape != variable.shape:
                raise LoRAError(
                    f"{name}: saved shape {value.shape} does not fit the model's {variable.shape}"
                )
            variable.set_value(jnp.asarray(value, variable.dtype))
            return variable

        return put

    jax.tree_util.tree_map_with_path(fill(expected), state, is_leaf=_is_variable)
    nnx.update(model, state)
    if trained:  # the parameters trained in full next to the adapters
        params = nnx.state(model, nnx.Param)
        names = {param_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        if not trained <= names:
            raise LoRAError(
                f"the saved parameters {sorted(trained - names)[:4]} are not parameters of "
                f"{type(model).__name__}; load into the base model the adapters were trained on"
            )
        jax.tree_util.tree_map_with_path(fill(trained), params, is_leaf=_is_variable)
        nnx.update(model, params)
    return model
