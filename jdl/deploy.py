"""From a trained workdir to a deployed model: `load_model` and `export`.

`load_model(workdir)` rebuilds the model a run trained and loads its weights and model
state (batch-norm statistics, ...) from one of its checkpoints, without the optimizer:

    model = jdl.load_model("workdirs/mnist_cnn")
    logits = jdl.predict(model, images)

`export(workdir_or_model, path, format=...)` writes that model as one file another
program runs without jdl or the model's Python code:

- "stablehlo": `jax.export` with a symbolic batch size, for CPU, CUDA and TPU in one
  artifact; load it with `jdl.export.load(path)` or with plain JAX:
  ``jax.export.deserialize(open(path, "rb").read()).call(x)``.
- "onnx": an ONNX model (jax2onnx, opset `ONNX_OPSET`) with a dynamic batch size, for
  onnxruntime and other ONNX runtimes.
- "onnx-int8": the ONNX model with its weights quantized to int8 by onnxruntime's dynamic
  quantization (activations quantized per batch at run time).

How the model is rebuilt, in this order:

1. ``model=`` given: that module is the template (its structure, not its weights).
2. The run was started as ``python -m PACKAGE.MODULE`` (recorded in `run.json`) and that
   module has ``build_model(config, size, rngs)``, as every single-model experiment in
   `experiments/` has: it is called with the run's `config.json`. Its second argument
   (the data set, or the vocabulary size) is used only for the number of classes or the
   vocabulary size, which is read off the checkpoint's array shapes.
3. `config.json` has ``"model"``, a name in `jdl.models.MODELS`, and optionally
   ``"model_kwargs"``: ``MODELS[model](**model_kwargs, rngs=...)``. A run of your own records
   this by passing ``run_config={"model": "mnist_cnn", "model_kwargs": {...}}`` to `jdl.fit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jdl.checkpoint import Checkpointer, _quiet_library_logs, path_name
from jdl.errors import UserError

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_OPSET",
    "ExportError",
    "ModelLoadError",
    "NoCheckpointError",
    "export",
    "input_spec",
    "load_model",
]

EXPORT_FORMATS = ("stablehlo", "onnx", "onnx-int8")
# ONNX opset of exported models: 21 is read by onnxruntime >= 1.16 and covers every
# operator the zoo models need (LayerNormalization, Gelu via Erf, dynamic Reshape).
ONNX_OPSET = 21
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")
CHECKPOINTS_DIR = "checkpoints"


class ModelLoadError(UserError, ValueError):
    """A workdir whose model cannot be rebuilt or whose checkpoint cannot be chosen."""


class NoCheckpointError(UserError, FileNotFoundError):
    """No workdir, or no checkpoint (at the step asked for) in it."""


class ExportError(UserError, ValueError):
    """An export that cannot be made: unknown format, unknown input shape, missing package."""


@dataclasses.dataclass(frozen=True)
class _Weights:
    """The part of a `TrainState` that `Checkpointer.restore_weights` reads and replaces."""

    params: Any
    model_state: Any

    def replace(self, **changes: Any) -> _Weights:
        return dataclasses.replace(self, **changes)


def load_model(
    workdir: str | os.PathLike,
    step: str | int = "latest",
    *,
    model: nnx.Module | None = None,
) -> nnx.Module:
    """The model a run trained, in eval mode, with the weights of one of its checkpoints.

    Reads only the parameters and the other model state (batch-norm statistics, ...),
    never the optimizer state, from `workdir/checkpoints`; each array is verified
    against its saved checksum. See the module docstring for how the model is rebuilt
    and what a run of your own must record (``run_config={"model": NAME,
    "model_kwargs": {...}}``), or pass `model`.

    Args:
      workdir: a run directory written by `jdl.fit` (an experiment's or your own).
      step: "latest" (the newest readable checkpoint), "best" (the checkpoint of the
        best evaluation by the run's `best_metric`), or a step number.
      model: a module of the same architecture to load the weights into (its own weights
        are ignored and it is not changed); None rebuilds it from the workdir's records.

    Returns:
      A new NNX module in eval mode (dropout off, batch norm on its running averages).

    Raises:
      NoCheckpointError: (a FileNotFoundError) `workdir` does not exist, holds no
        checkpoint, or none at `step`.
      ModelLoadError: (a ValueError) step "best" for a run without a best metric, a
        model name not in `jdl.models.MODELS`, or nothing that says how to build it.
      jdl.CheckpointMismatchError: the checkpoint holds another model than `model`.
    """
    workdir = os.fspath(workdir)
    checkpointer = _open_checkpoints(workdir)
    try:
        chosen = _choose_step(checkpointer, workdir, step)
        if model is None:
            template = _rebuild(workdir, checkpointer.saved_shapes(chosen))
        elif isinstance(model, nnx.Module):
            template = nnx.merge(*nnx.split(model), copy=True)  # the caller's stays untouched
        else:
            raise TypeError(f"model must be an NNX module or None, got {type(model).__name__}")
        graphdef, params, model_state = nnx.split(template, nnx.Param, ...)
        loaded = checkpointer.restore_weights(_Weights(params, model_state), step=chosen)
    finally:
        checkpointer.close(raise_errors=False)
    result = nnx.merge(graphdef, loaded.params, loaded.model_state)
    result.eval()
    return result


def _open_checkpoints(workdir: str) -> Checkpointer:
    if not os.path.isdir(workdir):
        raise NoCheckpointError(f"no workdir {workdir!r}; give the --workdir of a trained run")
    directory = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
        raise NoCheckpointError(
            f"no checkpoint in {directory}; train the run (it saves one at its end) or give "
            "another workdir"
        )
    with _quiet_library_logs():  # Orbax notes the read-only mode at warning level
        return Checkpointer(directory, read_only=True)  # the run may still be writing


def _choose_step(checkpointer: Checkpointer, workdir: str, step: str | int) -> int:
    steps = checkpointer.all_steps()
    if step == "latest":
        return steps[-1]
    if step == "best":
        best = _recorded_best(checkpointer.run_state(steps[-1]))
        if not best:
            raise ModelLoadError(
                f"the run in {workdir} recorded no best evaluation (it ran without a "
                "best_metric, e.g. without a validation split); use step='latest' or a step "
                f"number of {steps}"
            )
        step = int(best["step"])
        if step not in steps:
            raise NoCheckpointError(
                f"the best checkpoint of {workdir} (step {step}) is no longer on disk; "
                f"available steps: {steps}"
            )
        return step
    if isinstance(step, bool) or not isinstance(step, int | np.integer):
        raise ModelLoadError(f"step must be 'latest', 'best' or a step number, got {step!r}")
    if int(step) not in steps:
        raise NoCheckpointError(
            f"no checkpoint at step {step} in {checkpointer.directory}; available: {steps}"
        )
    return int(step)


def _recorded_best(run_state: dict) -> dict | None:
    """{"step": ..., metric: ...} of the best evaluation a checkpoint's run state holds:
    under its main evaluation's hook state, or at the top level in the older layout."""
    main_eval = (run_state.get("hooks") or {}).get("eval") or {}
    for tracker in (main_eval.get("best_tracker"), run_state.get("best_tracker")):
        if isinstance(tracker, dict) and tracker.get("best"):
            return tracker["best"]
    return None


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error}); pass model=") from None


def _as_tuples(value: Any) -> Any:
    """JSON lists back into the tuples configs hold (layer widths, ...)."""
    if isinstance(value, Mapping):
        return {k: _as_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    return value


def _experiment_builder(workdir: str) -> Callable | None:
    """`build_model` of the module the run was started with (`python -m MODULE`), if any."""
    record = _read_json(os.path.join(workdir, "run.json"))
    command = record.get("command", "") if isinstance(record, dict) else ""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    if "-m" not in words[:3] or words.index("-m") + 1 >= len(words):
        return None
    module_name = words[words.index("-m") + 1]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    builder = getattr(module, "build_model", None)
    return builder if callable(builder) else None


class _Size(int):
    """The number of classes (or vocabulary size) handed to an experiment's `build_model`
    in place of its data set: an int that also answers `.num_classes`."""

    @property
    def num_classes(self) -> int:
        return int(self)


def _shapes(module_fn: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
    abstract = nnx.eval_shape(module_fn)
    _, params, rest = nnx.split(abstract, nnx.Param, ...)
    leaves = jax.tree_util.tree_flatten_with_path({"params": params, "model_state": rest})[0]
    return {path_name(path): tuple(leaf.shape) for path, leaf in leaves}


def _solve_size(build: Callable[[int], nnx.Module], saved: dict[str, tuple[int, ...]]) -> int:
    """The size argument for which `build(size)` has the checkpoint's shapes.

    Every array dimension that depends on it is affine in it (a classifier's head, an
    embedding table): two abstract builds give the slope and the offset.
    """
    two, three = _shapes(lambda: build(_Size(2))), _shapes(lambda: build(_Size(3)))
    for path, shape in two.items():
        for axis, (a, b) in enumerate(zip(shape, three[path], strict=True)):
            if a != b and path in saved and len(saved[path]) == len(shape):
                slope = b - a
                size, rest = divmod(saved[path][axis] - (a - 2 * slope), slope)
                if rest == 0 and size >= 1:
                    return size
    return 2  # no array depends on it


def _rebuild(workdir: str, saved: dict[str, tuple[int, ...]]) -> nnx.Module:
    """The model of `workdir`, freshly initialised (its weights are loaded afterwards)."""
    import ml_collections

    from jdl import models

    raw = _read_json(os.path.join(workdir, "config.json"))
    if not isinstance(raw, dict):
        raise ModelLoadError(
            f"{workdir} has no config.json to rebuild the model from; pass model= (a module "
            "of the same architecture) or train with run_config={'model': NAME, ...}"
        )
    seed = raw.get("seed", 0) if isinstance(raw.get("seed", 0), int) else 0
    rngs = lambda: nnx.Rngs(params=seed, dropout=seed + 1)  # noqa: E731 - one per build
    builder = _experiment_builder(workdir)
    if builder is not None:
        config = ml_collections.ConfigDict(_as_tuples(raw))
        try:
            size = _solve_size(lambda n: builder(config, n, rngs()), saved)
            return builder(config, _Size(size), rngs())
        except AttributeError as error:
            raise ModelLoadError(
                f"the build_model of the experiment that trained {workdir} needs its data "
                f"to build the model ({error}); pass model= instead"
            ) from None
    name = raw.get("model")
    if not isinstance(name, str):
        raise ModelLoadError(
            f"{workdir}/config.json does not say which model was trained (no 'model' key and "
            "no experiment module with build_model in run.json); pass model= or train with "
            "run_config={'model': NAME, 'model_kwargs': {...}}"
        )
    if name not in models.MODELS:
        raise ModelLoadError(
            f"unknown model {name!r} in {workdir}/config.json; known: "
            f"{', '.join(sorted(models.MODELS))} (or pass model=)"
        )
    kwargs = _as_tuples(raw.get("model_kwargs") or {})
    if not isinstance(kwargs, dict):
        raise ModelLoadError(f"model_kwargs in {workdir}/config.json must be a dict")
    try:
        return models.MODELS[name](**kwargs, rngs=rngs())
    except TypeError as error:
        raise ModelLoadError(
            f"model {name!r} does not take model_kwargs {kwargs} from {workdir}/config.json "
            f"({error})"
        ) from None


def input_spec(
    workdir: str | os.PathLike | None,
    input_shape: Sequence[int] | None = None,
    input_dtype: str | None = None,
) -> tuple[tuple[int, ...], np.dtype]:
    """The shape of one example and its dtype: `input_shape`/`input_dtype` when given,
    else what the run recorded in `workdir/summary.json` (the experiments write it).

    Raises:
      ExportError: neither is available.
    """
    recorded = None
    if workdir is not None:
        summary = _read_json(os.path.join(os.fspath(workdir), "summary.json"))
        if isinstance(summary, dict) and isinstance(summary.get("input"), dict):
            recorded = summary["input"]
    if input_shape is None:
        if recorded is None or not isinstance(recorded.get("shape"), list):
            where = f"{workdir}/summary.json" if workdir is not None else "a module"
            raise ExportError(
                f"the input shape of one example is unknown ({where} records none); pass "
                "input_shape=(...) (command line: --input-shape 28,28,1)"
            )
        input_shape = recorded["shape"][1:]  # recorded with a batch of one
    dtype = input_dtype or (recorded or {}).get("dtype") or "float32"
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise ExportError(f"unknown input dtype {dtype!r}; e.g. float32 or int32") from None
    return tuple(int(d) for d in input_shape), dtype


def export(
    source: str | os.PathLike | nnx.Module,
    path: str | os.PathLike,
    *,
    format: str = "stablehlo",  # noqa: A002 - the command line's --format
    step: str | int = "latest",
    input_shape: Sequence[int] | None = None,
    input_dtype: str | None = None,
) -> str:
    """Writes a model's eval-mode forward pass, weights included, to one file.

    The batch size stays free (symbolic in StableHLO, dynamic in ONNX); the rest of the
    input shape is fixed. The file needs neither jdl nor the model's code to run: load it
    with `jdl.export.load(path)` (a file `jdl/export.py` that imports only JAX, NumPy and,
    for ONNX, onnxruntime) or with plain JAX / onnxruntime.

    Args:
      source: a run's workdir (`load_model(source, step)`) or an NNX module (not changed).
      path: the file to write (parent directories are created).
      format: "stablehlo" (serialized `jax.export`, for cpu, cuda and tpu), "onnx" (opset
        `ONNX_OPSET`) or "onnx-int8" (ONNX with int8 weights, onnxruntime dynamic
        quantization of MatMul/Gemm).
      step: the checkpoint, as for `load_model`, when `source` is a workdir.
      input_shape: one example's shape, without the batch axis, e.g. (28, 28, 1); default:
        the workdir's recorded input (`summary.json`).
      input_dtype: e.g. "float32" (images) or "int32" (token ids); default: recorded, else
        float32.

    Returns:
      `path`, as a string.

    Raises:
      ExportError: unknown format, unknown input shape, the ONNX packages missing (``pip
        install 'jdl[export]'``), or an operation the ONNX converter cannot express.
      NoCheckpointError, ModelLoadError: as `load_model`.
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; use one of {EXPORT_FORMATS}")
    if isinstance(source, nnx.Module):
        model, workdir = nnx.merge(*nnx.split(source), copy=True), None
        model.eval()
    else:
        workdir = os.fspath(source)
        model = load_model(workdir, step)
    shape, dtype = input_spec(workdir, input_shape, input_dtype)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if format == "stablehlo":
        data = _stablehlo_bytes(model, shape, dtype)
        with open(path, "wb") as f:
            f.write(data)
    else:
        proto = _onnx_model(model, shape, dtype)
        if format == "onnx":
            with _quiet_converter_logs():
                _write_onnx(proto, path)
        else:
            with _quiet_converter_logs():
                _quantize_onnx(proto, path)
    return path


def _forward_fn(model: nnx.Module) -> Callable[[jax.Array], Any]:
    """The eval-mode forward pass with the weights as constants of the traced program."""
    graphdef, state = nnx.split(model)
    return lambda x: nnx.merge(graphdef, state)(x)


def _stablehlo_bytes(model: nnx.Module, shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *shape), dtype)
    exported = jax.export.export(jax.jit(_forward_fn(model)), platforms=STABLEHLO_PLATFORMS)(spec)
    return bytes(exported.serialize())


# flax.nnx.Conv.__call__ as flax defines it, taken before any converter patches the class.
_NNX_CONV_CALL = nnx.Conv.__call__


class _LaxConv(nnx.Conv):
    """nnx.Conv traced as its lax convolution: jax2onnx's own nnx.Conv rule rejects the
    explicit ((lo, hi), ...) paddings that the ResNets use; the lax rule handles them."""

    __call__ = _NNX_CONV_CALL


def _onnx_model(model: nnx.Module, shape: tuple[int, ...], dtype: np.dtype):
    try:
        import jax2onnx
    except ImportError:
        raise ExportError(
            "ONNX export needs jax2onnx, onnx and onnxruntime: pip install -e '.[export]'"
        ) from None
    for _, module in model.iter_modules():  # `model` is our own copy: changing it is safe
        if type(module) is nnx.Conv:
            module.__class__ = _LaxConv
    spec = jax.ShapeDtypeStruct(("batch", *shape), dtype)  # "batch": a dynamic ONNX dim
    # jax2onnx prints a debug line per convolution (a print, not a log); not for the user.
    with _quiet_converter_logs(), contextlib.redirect_stdout(io.StringIO()):
        try:
            return jax2onnx.to_onnx(
                _forward_fn(model),
                [spec],
                opset=ONNX_OPSET,
                model_name=type(model).__name__,
                input_names=["x"],
                output_names=["y"],
            )
        except (NotImplementedError, TypeError, ValueError) as error:
            from jdl.export.unsupported import converter_error  # names the operation

            raise converter_error(error, type(model).__name__) from None


def _write_onnx(proto: Any, path: str) -> None:
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())


def _quantize_onnx(proto: Any, path: str) -> None:
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as scratch:
        float_path = os.path.join(scratch, "float.onnx")
        _write_onnx(proto, float_path)
        # Weights of the matrix products to int8; convolutions stay float (onnxruntime's
        # CPU ConvInteger is slower than its float Conv and loses more accuracy).
        quantize_dynamic(
            float_path, path, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
        )


class _quiet_converter_logs:
    """Converter chatter below ERROR, muted: jax2onnx logs a traceback for each optional
    plugin it cannot import (dm_pix's, on this JAX), none of which is used here."""

    def __enter__(self):
        import logging

        # onnx_ir notes shape values without a type; onnxruntime's quantizer suggests a
        # pre-processing pass on the root logger. Neither changes the exported model.
        self._loggers = [logging.getLogger(n) for n in ("jax2onnx", "onnx_ir", "")]
        self._levels = [logger.level for logger in self._loggers]
        for logger in self._loggers:
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for logger, level in zip(self._loggers, self._levels, strict=True):
            logger.setLevel(level)
