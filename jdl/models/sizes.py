"""The one check of the sizes a model is built from, made at construction.

A width, depth, channel count, head count or vocabulary of 0 or less does not fail
where it is given: flax builds empty layers or divides by zero deep inside, far from
the argument. Every model constructor checks its sizes first, before any parameter
is drawn, and names the argument.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from jdl.errors import UserError


class ModelSizeError(UserError, ValueError):
    """A model size (width, depth, channels, heads, vocabulary, patch) that is not an int >= 1."""


def check_sizes(model: str, **sizes: int | Sequence[int] | None) -> None:
    """Raises ModelSizeError for the first size that is not an int >= 1.

    Args:
      model: the class being built, for the message (e.g. "MLP").
      **sizes: argument name -> an int, a sequence of ints (each must be >= 1; an empty
        sequence is allowed), or None (not given, not checked).

    Example:
      >>> check_sizes("MLP", in_features=784, hidden_sizes=(128, 0))
      Traceback (most recent call last):
      ...
      jdl.models.sizes.ModelSizeError: MLP: hidden_sizes must hold ints >= 1, got (128, 0)
    """
    for name, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, Sequence) and not isinstance(value, str):
            if not all(_is_size(v) for v in value):
                raise ModelSizeError(f"{model}: {name} must hold ints >= 1, got {tuple(value)!r}")
        elif not _is_size(value):
            raise ModelSizeError(f"{model}: {name} must be an int >= 1, got {value!r}")


def _is_size(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
