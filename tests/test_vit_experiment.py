"""The MNIST ViT experiment runs end to end for two steps and rejects bad model settings."""

from __future__ import annotations

import json

import pytest

from experiments import vit_mnist


@pytest.fixture(autouse=True)
def _no_real_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "no-data"))


def test_two_step_smoke_run(tmp_path, capsys):
    assert "python -m experiments.vit_mnist" in vit_mnist.__doc__  # the docstring is its README
    workdir = tmp_path / "run"
    argv = [
        "--config.duration=2",
        "--config.warmup_steps=0",
        "--config.progress=false",
        "--config.compilation_cache=false",
        "--config.steps_per_dispatch=1",
        "--config.download=false",
        "--config.num_layers=1",
        "--workdir",
        str(workdir),
    ]
    final = vit_mnist.main(argv)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == "FINAL " + json.dumps(final)
    assert final["steps"] == 2 and 0.0 <= final["test_accuracy"] <= 1.0
    for produced in ("config.json", "metrics.jsonl", "final.json", "checkpoints"):
        assert (workdir / produced).exists(), produced


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.patch_size=5", r"config.patch_size=5 must divide 28"),
        ("--config.num_heads=3", r"config.embed_dim=64 must be a multiple of config.num_heads=3"),
        ("--config.dropout=1.0", r"config.dropout=1.0 must be in \[0, 1\)"),
        ("--config.num_layers=0", r"config.num_layers=0 must be >= 1"),
    ],
)
def test_bad_model_settings_are_rejected_before_anything_runs(override, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        vit_mnist.main([override, "--workdir", str(tmp_path)])
    assert not (tmp_path / "config.json").exists()
