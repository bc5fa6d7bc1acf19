"""Batched inference from the command line, with a trained workdir's model.

    python -m jdl.predict --workdir workdirs/mnist_cnn --input digits.npy --output logits.npy
    python -m jdl.predict --workdir workdirs/mnist_cnn --input a.png b.png --output logits.npy

Inputs: one .npy array (N, ...); one .npz archive holding one array, or several of which
one is named "x" (or pass --key); or image files (PNG, JPEG, ... read with Pillow), which
become float32 in [0, 1] with the channels of the run's recorded input (summary.json:
1 = grayscale, 3 = RGB) and must already have its height and width. Inputs that need
other preprocessing (normalisation, resizing) go in as a prepared .npy.
Output: a .npy file of the model's outputs (N, ...), in input order. A progress bar
appears when the input is longer than a few batches.
Options: --step latest|best|N, --batch-size B (default 256), --precision fp32|bf16|auto.

This module is callable: ``jdl.predict(model_or_state, x)`` is `jdl.inference.predict`,
also after ``import jdl.predict``.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Sequence
from typing import Any

import numpy as np

from jdl import inference
from jdl.errors import UserError

ARRAY_SUFFIXES = (".npy", ".npz")
# Outputs are produced this many batches at a time between progress-bar updates; each
# part runs `jdl.inference.predict`, whose one compiled program serves every part.
BATCHES_PER_UPDATE = 4


class PredictFileError(UserError, ValueError):
    """An input or output file `python -m jdl.predict` cannot use."""


def read_inputs(paths: Sequence[str], example_shape: tuple[int, ...] | None, key: str | None):
    """The examples in `paths` as one array (N, ...): see the module docstring.

    Raises:
      PredictFileError: a missing file, a file of an unknown kind, an .npz without a
        single or an "x" array, an unreadable image, or images of another size.
    """
    for path in paths:
        if not os.path.isfile(path):
            raise PredictFileError(f"no input file {path}; give .npy, .npz or image files")
    suffixes = {os.path.splitext(path)[1].lower() for path in paths}
    if suffixes & set(ARRAY_SUFFIXES):
        if len(paths) != 1:
            raise PredictFileError("give one .npy or .npz file, or image files, not a mix")
        return _read_array(paths[0], key)
    return np.stack([_read_image(path, example_shape) for path in paths])


def _read_array(path: str, key: str | None) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise PredictFileError(f"{path} is not a readable NumPy file ({error})") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        names = list(loaded.files)
        if key is None:
            key = names[0] if len(names) == 1 else "x" if "x" in names else None
        if key not in names:
            raise PredictFileError(
                f"{path} holds arrays {names}; name the input with --key (one of them)"
            )
        return loaded[key]


def _read_image(path: str, example_shape: tuple[int, ...] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise PredictFileError(
            f"{path} is neither .npy/.npz nor a readable image ({type(error).__name__}); "
            "give .npy, .npz or image files"
        ) from None
    channels = example_shape[-1] if example_shape and len(example_shape) == 3 else None
    image = image.convert("L" if channels == 1 else "RGB")
    pixels = np.asarray(image, np.float32) / 255.0
    if channels == 1:
        pixels = pixels[..., None]
    if example_shape is not None and pixels.shape != tuple(example_shape):
        raise PredictFileError(
            f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels but the model takes "
            f"{tuple(example_shape)}; resize it first"
        )
    return pixels


def predict_with_progress(
    model: Any, x: np.ndarray, *, batch_size: int, precision: str | None, progress: bool
) -> np.ndarray:
    """`jdl.inference.predict` over `x`, a few batches at a time, with a tqdm bar."""
    from tqdm.auto import tqdm

    part = batch_size * BATCHES_PER_UPDATE
    bar = tqdm(
        total=len(x), unit="example", disable=not progress or len(x) <= part, file=sys.stderr
    )
    outputs = []
    with bar:
        for start in range(0, len(x), part):
            chunk = x[start : start + part]
            outputs.append(
                inference.predict(model, chunk, batch_size=batch_size, precision=precision)
            )
            bar.update(len(chunk))
    return np.concatenate(outputs, axis=0)


class _CallableModule(types.ModuleType):
    """Keeps ``jdl.predict(model_or_state, x)`` working once this module is imported:
    importing it makes `jdl.predict` this module, which calls `jdl.inference.predict`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return inference.predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
