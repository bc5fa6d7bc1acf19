"""jdl.jsonio: records never hold NaN or Infinity, and say which values were not finite."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jdl import jsonio


def test_nonfinite_values_become_null_with_reasons(tmp_path):
    payload = {"loss": float("nan"), "eval": {"acc": np.float32(0.5), "ppl": np.inf}, "n": 3}
    path = tmp_path / "final.json"
    jsonio.write_json(path, payload)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)  # strict readers accept it
    assert record["loss"] is None and record["eval"]["ppl"] is None
    assert record["eval"]["acc"] == 0.5 and record["n"] == 3
    assert record["nonfinite"] == {"loss": "nan", "eval.ppl": "inf"}


def test_finite_payload_is_unchanged_and_lists_are_walked():
    assert jsonio.to_json_safe({"a": [1.0, 2]}) == {"a": [1.0, 2]}
    assert jsonio.to_json_safe({"a": [1.0, -np.inf]}) == {
        "a": [1.0, None],
        "nonfinite": {"a.1": "-inf"},
    }


def test_dumps_refuses_nothing_and_writes_strict_json():
    text = jsonio.dumps({"x": np.float64("nan")})
    assert json.loads(text) == {"x": None, "nonfinite": {"x": "nan"}}
    with pytest.raises(ValueError):
        json.dumps({"x": float("nan")}, allow_nan=False)  # what a strict writer would do
