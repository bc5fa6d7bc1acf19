"""JSON that stays valid: no NaN or Infinity in any file jdl writes.

Python's `json` writes `NaN` and `Infinity`, which are not JSON: `jq`, JavaScript and
most readers reject the file. jdl writes every record through `to_json_safe`, which
turns each non-finite float into `null` and says why next to it, under the key
`"nonfinite"` (a dict from the dotted path of each such value to "nan", "inf" or
"-inf"). This module imports nothing from jdl, so every other module may use it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

NONFINITE_KEY = "nonfinite"


def to_json_safe(payload: Any) -> Any:
    """`payload` with numpy scalars as Python numbers and non-finite floats as None.

    When `payload` is a dict and some float in it is not finite, the result gets a
    `"nonfinite"` entry mapping each such value's dotted path to "nan", "inf" or "-inf",
    so a reader can tell a missing value from a diverged one.
    """
    reasons: dict[str, str] = {}
    safe = _convert(payload, "", reasons)
    if reasons and isinstance(safe, dict):
        safe[NONFINITE_KEY] = {**safe.get(NONFINITE_KEY, {}), **reasons}
    return safe


def dumps(payload: Any, **kwargs) -> str:
    """`json.dumps` of `to_json_safe(payload)`; never writes NaN or Infinity."""
    return json.dumps(to_json_safe(payload), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Writes `payload` as indented JSON, atomically (a temporary file, then a rename)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _convert(value: Any, path: str, reasons: dict[str, str]) -> Any:
    if isinstance(value, Mapping):
        return {
            str(key): _convert(item, f"{path}.{key}" if path else str(key), reasons)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_convert(item, f"{path}.{i}", reasons) for i, item in enumerate(value)]
    if isinstance(value, np.ndarray) and value.ndim == 0 or isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        reasons[path] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    return value
