"""experiments.lora_charlm through its real command line: a tiny run reports every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments import lora_charlm
from jdl.techniques import lora

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config.duration=4 steps",
    "--config.finetune_duration=3 steps",
    "--config.warmup_steps=1",
    "--config.pretrain_max_chars=20000",
    "--config.max_chars=20000",
    "--config.embed_dim=32",
    "--config.num_heads=2",
    "--config.num_layers=1",
    "--config.seq_len=16",
    "--config.batch_size=8",
    "--config.eval_batch_size=256",
    "--config.sample_chars=12",
    "--config.progress=False",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "experiments.lora_charlm", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def final_of(stdout: str) -> dict:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("FINAL "), stdout[-2000:]
    return json.loads(last.removeprefix("FINAL "))


@pytest.mark.slow
def test_tiny_run_reports_three_fine_tunings_and_saves_the_adapters(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli(*TINY, "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    final = final_of(result.stdout)
    for mode in ("full", "lora", "head"):
        assert 0 < final[f"{mode}_val_loss"] < 6, final  # ln(vocab ~95) = 4.55 at chance
        assert final[f"{mode}_step_memory_mb"] > 0
    assert final["full_trainable_share"] == 1.0
    assert 0 < final["head_trainable_share"] < 1 and 0 < final["lora_trainable_share"] < 1
    # LoRA trains the head and the LayerNorms too: its share counts them with the adapters.
    assert final["lora_trainable_share"] > final["head_trainable_share"]
    assert final["lora_gap"] == pytest.approx(final["lora_val_loss"] - final["full_val_loss"])
    assert final["memory_source"] == "xla_memory_analysis_of_the_compiled_train_step"
    assert final["peak_rss_mb"] > 0 and final["seconds"] > 0
    assert {"pretrain_val_loss", "zero_shot_val_loss"} <= set(final)
    assert "SAMPLE (LoRA merged" in result.stdout

    # The adapters, with the head and LayerNorms trained next to them (a few KB), turn a
    # fresh base model of the same architecture into the fine-tuned one.
    adapters = workdir / "lora" / "adapters"
    config = json.loads((adapters / lora.CONFIG_FILE).read_text())
    assert sorted(config["layers"]) == [
        "blocks/0/attn/out",
        "blocks/0/attn/qkv",
        "blocks/0/mlp/fc1",
        "blocks/0/mlp/fc2",
    ]
    assert config["trained"] == [
        "blocks/0/ln1/bias",
        "blocks/0/ln1/scale",
        "blocks/0/ln2/bias",
        "blocks/0/ln2/scale",
        "head/kernel",
        "ln_f/bias",
        "ln_f/scale",
    ]
    saved = load_file(str(adapters / lora.ADAPTERS_FILE))
    assert all(name in config["trained"] or "/lora/lora_" in name for name in saved)
    assert np.abs(saved["blocks/0/mlp/fc2/lora/lora_b"]).max() > 0  # trained away from zero
    model_config = lora_charlm.get_config()
    model_config.update(dict(embed_dim=32, num_heads=2, num_layers=1, seq_len=16))
    base = lora_charlm.build_model(model_config, saved["head/kernel"].shape[1])
    lora.load_adapters(adapters, base)
    assert [path for path, _ in lora.lora_layers(base)] == sorted(config["layers"])
    np.testing.assert_array_equal(base.head.kernel[...], saved["head/kernel"])

    # A rerun of the finished workdir trains nothing and repeats the same FINAL line.
    again = run_cli(*TINY, "--workdir", str(workdir))
    assert again.returncode == 0, again.stderr[-3000:]
    repeated = final_of(again.stdout)
    assert {k: v for k, v in repeated.items() if k not in ("seconds", "peak_rss_mb")} == {
        k: v for k, v in final.items() if k not in ("seconds", "peak_rss_mb")
    }


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.modes=full,bogus", "config.modes='full,bogus': each must be one of"),
        ("--config.lora_rank=0", "config.lora_rank=0 must be >= 1"),
        ("--config.lora_targets=,", "config.lora_targets=',' must name at least one layer"),
        ("--config.init_from=/tmp/x", "config.init_from"),
        ("--config.mesh_shape=data:2", "config.mesh_shape='data:2' is not supported"),
    ],
)
def test_bad_settings_are_one_line_before_anything_runs(override, message, tmp_path):
    with pytest.raises(SystemExit) as raised:
        lora_charlm.main([override, "--workdir", str(tmp_path / "run")])
    text = str(raised.value).strip()
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not (tmp_path / "run").exists()
