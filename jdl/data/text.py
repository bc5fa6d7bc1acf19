"""Character-level text: corpora, a character vocabulary, and language-model windows.

The default corpus needs no download: the Python standard library's own `.py` source
files, read in sorted path order and cut at a fixed number of characters, so the same
Python version always gives the same text. Any UTF-8 text file works as well.

Training batches are random windows of the training text, drawn on the device inside
the jitted training chunk (`RandomWindows`, a drop-in for `InMemoryData` in `jdl.fit`);
the window starts are a pure function of the seed and the step. Evaluation cuts the
validation text into consecutive windows that score every character once
(`eval_windows`).
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdl.data.mnist import DatasetUnavailableError
from jdl.data.pipeline import MeshPlacement, check_same_setup
from jdl.errors import UserError

# Folders of the standard library that are not its own source, or that some
# distributions leave out (tests): skipping them keeps the corpus the same everywhere.
_SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)

_WINDOW_SALT = 0x7E47


class UnknownCharacterError(UserError, ValueError):
    """Text contains a character that the vocabulary does not have."""


def stdlib_source_files(stdlib_dir: str | None = None) -> list[str]:
    """The `.py` files of the standard library, sorted by their path relative to it.

    Args:
      stdlib_dir: the standard library folder (default: this interpreter's).

    Returns:
      Absolute paths; third-party packages (site-packages), caches and test suites
      are skipped.
    """
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_STDLIB_DIRS]
        found += [os.path.join(folder, name) for name in files if name.endswith(".py")]
    return sorted(found, key=lambda path: os.path.relpath(path, root).split(os.sep))


def load_stdlib_source(max_chars: int = 2_000_000, stdlib_dir: str | None = None) -> str:
    """The standard library's source, files concatenated in sorted order.

    Each file is followed by a newline. Deterministic for a given Python version.

    Args:
      max_chars: keep the first `max_chars` characters (0: all of it, tens of MB).
      stdlib_dir: the standard library folder (default: this interpreter's).

    Raises:
      DatasetUnavailableError: no source files were found (e.g. a stripped install
        with only `.pyc` files); pass a text file instead.
    """
    paths = stdlib_source_files(stdlib_dir)
    if not paths:
        raise DatasetUnavailableError(
            f"no .py files under {stdlib_dir or sysconfig.get_paths()['stdlib']}; "
            "train on a text file instead (text_path)"
        )
    pieces, size = [], 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            pieces.append(f.read() + "\n")
        size += len(pieces[-1])
        if max_chars and size >= max_chars:
            break
    text = "".join(pieces)
    return text[:max_chars] if max_chars else text


def load_text(path: str, max_chars: int = 0) -> str:
    """The contents of the UTF-8 text file at `path` (the first `max_chars`; 0: all).

    Raises:
      FileNotFoundError: no such file (the message names it).
      ValueError: the file is not UTF-8 text, or it is empty.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(max_chars) if max_chars else f.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None
    if not text:
        raise ValueError(f"{path} is empty")
    return text


class CharVocab:
    """A character vocabulary: ids `0 .. size - 1` for sorted distinct characters.

    Args:
      chars: the characters, each once (see `from_text`).
    """

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("a vocabulary needs at least one character")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("vocabulary entries must be distinct single characters")
        self.chars = chars
        self.ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The vocabulary of every character that occurs in `text`, in code-point order."""
        return cls(sorted(set(text)))

    @property
    def size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """`text` as int32 ids, shape (len(text),).

        Raises:
          UnknownCharacterError: a character is not in the vocabulary; the message
            names it and its position.
        """
        try:
            return np.fromiter((self.ids[c] for c in text), np.int32, count=len(text))
        except KeyError as error:
            char = error.args[0]
            raise UnknownCharacterError(
                f"character {char!r} (U+{ord(char):04X}) at position {text.index(char)} is "
                f"not in the vocabulary of {self.size} characters; use only characters of "
                "the training text"
            ) from None

    def decode(self, ids: Sequence[int] | np.ndarray | jax.Array) -> str:
        """The text of a 1-D sequence of ids.

        Raises:
          ValueError: an id is outside `[0, size)`.
        """
        ids = np.asarray(ids).reshape(-1)
        bad = (ids < 0) | (ids >= self.size)
        if bad.any():
            raise ValueError(
                f"token id {int(ids[np.argmax(bad)])} is outside the vocabulary [0, {self.size})"
            )
        return "".join(self.chars[i] for i in ids.tolist())

    def to_json(self) -> dict:
        """The vocabulary as JSON-able data; `from_json` reads it back."""
        return {"chars": "".join(self.chars)}

    @classmethod
    def from_json(cls, data: Mapping) -> CharVocab:
        return cls(list(data["chars"]))


def split_text(ids: np.ndarray, validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous split: the first `1 - validation_fraction` for training, the rest for
    validation (no shuffling, so no window straddles both).

    Raises:
      ValueError: the fraction is outside (0, 1) or a part would be under 2 ids.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    cut = int(round(len(ids) * (1 - validation_fraction)))
    if cut < 2 or len(ids) - cut < 2:
        raise ValueError(f"a text of {len(ids)} characters is too short to split")
    return ids[:cut], ids[cut:]


def eval_windows(ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Consecutive windows that predict every character of `ids` after the first, once.

    Window i reads `ids[i*T : i*T + T]` and predicts `ids[i*T + 1 : i*T + T + 1]`; the
    last one is right-padded. The per-position "weight" is 0 at padding and otherwise
    `num_windows / num_targets`, so that the *mean over windows* of
    `sum_t weight * loss` (how `jdl.make_evaluator` averages) is exactly the mean loss
    per predicted character.

    Returns:
      {"x": int32 (W, T), "y": int32 (W, T), "weight": float32 (W, T)}.
    """
    num_targets = len(ids) - 1
    if num_targets < 1:
        raise ValueError("evaluation needs at least 2 characters")
    num_windows = -(-num_targets // seq_len)
    padded = np.zeros(num_windows * seq_len + 1, np.int32)
    padded[: len(ids)] = ids
    valid = np.arange(num_windows * seq_len) < num_targets
    weight = valid * np.float32(num_windows / num_targets)
    return {
        "x": padded[:-1].reshape(num_windows, seq_len),
        "y": padded[1:].reshape(num_windows, seq_len),
        "weight": weight.astype(np.float32).reshape(num_windows, seq_len),
    }


@dataclass(frozen=True)
class WindowSampler:
    """Where the windows of each step start: the array-free part of `RandomWindows`.

    Its `DataProgram` (`RandomWindows.program`): hashable and small, so compiled programs
    are cached on it; two `RandomWindows` of the same text length, batch, window length
    and seed share one compile.
    """

    seed: int
    num_examples: int  # the length of the token sequence
    batch_size: int
    seq_len: int

    def chunk_indices(self, first_step: jax.Array, length: int) -> jax.Array:
        """Window starts, int32 (length, batch_size), of steps `first_step + i`. Traceable."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), _WINDOW_SALT)
        high = self.num_examples - self.seq_len
        return jax.vmap(
            lambda step: jax.random.randint(
                jax.random.fold_in(key, step), (self.batch_size,), 0, high
            )
        )(first_step + jnp.arange(length))

    def take_batch(self, arrays: Mapping[str, jax.Array], starts: jax.Array):
        """The windows at `starts` (one row of `chunk_indices`): {"x", "y"} int32 (B, T)."""
        ids = arrays["ids"]
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice(ids, (s,), (self.seq_len + 1,)))(
            starts
        )  # (B, T + 1)
        return {"x": windows[:, :-1], "y": windows[:, 1:]}

    def step_inputs(self, first_step: jax.Array, arrays: Mapping[str, jax.Array], length: int):
        """`DataProgram.step_inputs`: the chunk's window starts (`chunk_indices`)."""
        del arrays
        return self.chunk_indices(first_step, length)

    def step_batch(self, arrays: Mapping[str, jax.Array], starts: jax.Array):
        """`DataProgram.step_batch`: the windows at one step's `starts` (`take_batch`)."""
        return self.take_batch(arrays, starts)


class RandomWindows:
    """Random windows of a token sequence, drawn on the device: the data of a language model.

    A `jdl.TrainData` like `jdl.InMemoryData`, so `jdl.fit` takes it as `train_data`. The
    batch of step s holds `batch_size` windows at uniformly random starts drawn from
    `fold_in(key(seed), s)`: resuming at step s sees exactly the batches an uninterrupted
    run sees, and no host work happens per step. An "epoch" is `len(ids) // (batch_size
    * seq_len)` steps (as many characters as the text holds; used by durations in epochs).

    Args:
      ids: int (N,) token ids, N > seq_len.
      batch_size: windows per batch.
      seq_len: T, inputs per window.
      seed: seed of the window starts.

    Batches: {"x": int32 (B, T) inputs, "y": int32 (B, T) the next ids}.
    """

    def __init__(self, ids: np.ndarray, *, batch_size: int, seq_len: int, seed: int):
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if len(ids) <= seq_len:
            raise ValueError(
                f"the text ({len(ids)} characters) must be longer than seq_len {seq_len}"
            )
        self.num_examples = len(ids)  # characters, for the data position record
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.steps_per_epoch = max(1, len(ids) // (batch_size * seq_len))
        self.program = WindowSampler(seed, self.num_examples, batch_size, seq_len)
        self.arrays = {"ids": jax.device_put(ids.astype(np.int32))}

    def chunk_indices(self, first_step: jax.Array, length: int) -> jax.Array:
        """Window starts, int32 (length, batch_size), of steps `first_step + i`. Traceable."""
        return self.program.chunk_indices(first_step, length)

    def take_batch(self, arrays: Mapping[str, jax.Array], starts: jax.Array):
        """The windows at `starts` (one row of `chunk_indices`): {"x", "y"} int32 (B, T)."""
        return self.program.take_batch(arrays, starts)

    def data_state(self, step: int) -> dict:
        """The JSON-able data position after `step` steps (saved in checkpoints)."""
        return {
            "kind": "random_windows",
            "step": int(step),
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }

    def restore_data_state(self, data_state: Mapping[str, Any]) -> None:
        """Checks a checkpoint's data set-up; the position itself follows from the step.

        Raises:
          jdl.DataSetupMismatchError: another kind of data, seed, text length, batch size
            or window length.
        """
        check_same_setup(
            data_state,
            self.data_state(0),
            keys=("kind", "seed", "num_examples", "batch_size", "seq_len"),
        )

    def chunk_inputs(self, count: int, length: int) -> Mapping[str, jax.Array]:
        """The data argument of a chunk program: the stored ids (windows are cut inside)."""
        del count, length
        return self.arrays

    def place_on_mesh(self, placement: MeshPlacement) -> None:
        """Places the token array on the mesh (replicated)."""
        self.arrays = placement.place_arrays(self.arrays)

    def close(self) -> None:
        """Nothing to release (part of `jdl.TrainData`)."""
