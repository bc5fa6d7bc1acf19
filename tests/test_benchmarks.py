"""benchmarks.throughput: a --quick run prints one well-formed RESULT line per model."""

from __future__ import annotations

import argparse
import math
import re

import pytest

from benchmarks import throughput

RESULT = re.compile(
    r"RESULT model=(?P<model>\S+) jdl_samples_per_s=(?P<jdl>\S+) vs_pure_jax=(?P<pure_jax>\S+) "
    r"vs_torch_eager=(?P<torch_eager>\S+) vs_torch_compile=(?P<torch_compile>\S+)"
)
# mlp_512 runs the same code as mnist_mlp; leaving it out keeps the test well under a minute.
QUICK_MODELS = ("mnist_mlp", "mnist_cnn")


def parse_results(output: str) -> dict[str, dict[str, float]]:
    """{model: {"jdl": samples/s, "pure_jax": ratio, ...}} from the RESULT lines of `output`."""
    results = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            match = RESULT.fullmatch(line)
            assert match, f"malformed RESULT line: {line!r}"
            fields = match.groupdict()
            model = fields.pop("model")
            results[model] = {name: float(value) for name, value in fields.items()}
    return results


def test_quick_run_reports_every_model(capsys):
    # torch.compile takes longer than the rest of the run: skipped, it reports nan.
    returned = throughput.main(
        ["--quick", "--no-torch-compile", "--models", ",".join(QUICK_MODELS)]
    )
    output = capsys.readouterr().out
    results = parse_results(output)
    assert list(results) == list(QUICK_MODELS)
    for model, values in results.items():
        for name in ("jdl", "pure_jax", "torch_eager"):
            assert math.isfinite(values[name]) and values[name] > 0, (model, name, output)
        assert math.isnan(values["torch_compile"])
    assert [result.name for result in returned] == list(QUICK_MODELS)
    assert "settings: jdl.fit K=5 unroll=1" in output


def test_a_failing_torch_compile_is_reported_not_raised(capsys):
    def broken() -> throughput.Peer:
        raise RuntimeError("no C++ compiler")

    assert "no C++ compiler" in throughput.start_peer("torch_compile", broken)
    assert "torch_compile unavailable" in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        throughput.start_peer("pure_jax", broken)


def test_a_missing_peer_gives_a_nan_ratio():
    result = throughput.ModelResult(
        "mnist_mlp",
        steps=10,
        setting=throughput.Setting(5, 1),
        rates={"jdl": [300.0, 100.0, 200.0], "pure_jax": [100.0], "torch_eager": [400.0]},
        unavailable={"torch_compile": "skipped"},
    )
    values = parse_results(result.result_line())["mnist_mlp"]
    assert values["jdl"] == 200.0  # the median
    assert values["pure_jax"] == 2.0 and values["torch_eager"] == 0.5
    assert math.isnan(values["torch_compile"])


def test_settings_parse():
    Setting = throughput.Setting
    assert throughput.parse_settings("50:1,10:full,10:1:cpu") == (
        Setting(50, 1),
        Setting(10, True),
        Setting(10, 1, cpu_kernels=True),
    )
    assert str(Setting(10, True, cpu_kernels=True)) == "K=10 unroll=full cpu_kernels"
    for bad in ("fifty:1", "10", "10:1:gpu"):
        with pytest.raises(argparse.ArgumentTypeError, match="K:U"):
            throughput.parse_settings(bad)
