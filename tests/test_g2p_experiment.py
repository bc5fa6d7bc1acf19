"""The G2P experiment runs end to end through its command line (both models) on a small
dictionary in the cmudict format, and rejects bad settings before anything compiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import g2p_cmudict

ROOT = Path(__file__).resolve().parents[1]
SOUNDS = {"a": "AE1", "b": "B", "c": "K", "d": "D", "e": "EH0", "k": "K", "l": "L"}
SOUNDS |= {"m": "M", "n": "N", "o": "OW1", "p": "P", "r": "R", "s": "S", "t": "T"}


def small_dictionary(path: Path, words: int = 300) -> Path:
    """`words` random words with one phoneme per letter, every 7th with a variant."""
    rng = np.random.default_rng(0)
    letters = sorted(SOUNDS)
    lines, seen = [], set()
    while len(seen) < words:
        word = "".join(rng.choice(letters, rng.integers(2, 9)))
        if word in seen:
            continue
        seen.add(word)
        lines.append(f"{word} " + " ".join(SOUNDS[c] for c in word))
        if len(seen) % 7 == 0:
            lines.append(f"{word}(2) " + " ".join(SOUNDS[c] for c in word[::-1]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


TINY = [
    "--config.duration=4",
    "--config.warmup_steps=0",
    "--config.batch_size=16",
    "--config.steps_per_dispatch=2",
    "--config.embed_dim=16",
    "--config.num_heads=2",
    "--config.num_encoder_layers=1",
    "--config.num_decoder_layers=1",
    "--config.gru_embed_dim=8",
    "--config.hidden_size=16",
    "--config.beam_size=2",
    "--config.decode_batch_size=8",
    "--config.max_test_words=12",
    "--config.progress=false",
    "--config.compilation_cache=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["transformer", "gru"])
def test_tiny_run_through_the_command_line(tmp_path, model):
    assert "python -m experiments.g2p_cmudict" in g2p_cmudict.__doc__
    dictionary = small_dictionary(tmp_path / "small.dict")
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.g2p_cmudict", *TINY]
    command += [f"--config.model={model}", f"--config.dict_path={dictionary}"]
    done = subprocess.run(
        [*command, "--workdir", str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("FINAL ")
    final = json.loads(last[len("FINAL ") :])
    assert final["model"] == model and final["steps"] == 4 and final["test_words"] == 12
    for key in ("word_error_rate", "greedy_word_error_rate"):
        assert 0.0 <= final[key] <= 1.0
    for key in ("phoneme_error_rate", "greedy_phoneme_error_rate"):
        assert 0.0 <= final[key] < 10.0  # predictions may be longer than the reference
    assert final["val_loss"] > 0 and final["params"] > 0
    recorded = json.loads((workdir / "final.json").read_text())
    assert recorded["phoneme_error_rate"] == final["phoneme_error_rate"]
    assert (workdir / "checkpoints").is_dir() and (workdir / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model=lstm", r"config.model"),
        ("--config.num_heads=3", r"config.embed_dim=128 must be a multiple of"),
        ("--config.train_max_len=40", r"config.max_positions >= 41"),
        ("--config.beam_size=0", r"config.beam_size=0"),
        ("--config.length_alpha=-1.0", r"config.length_alpha=-1.0 must be >= 0"),
        ("--config.max_test_words=-1", r"config.max_test_words=-1 must be >= 0"),
    ],
)
def test_bad_settings_are_rejected_before_anything_runs(override, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        g2p_cmudict.main([override, "--workdir", str(tmp_path)])
    assert not (tmp_path / "config.json").exists()


def test_presets():
    assert g2p_cmudict.get_config("long").duration != g2p_cmudict.get_config().duration
    with pytest.raises(Exception, match="unknown preset 'huge'"):
        g2p_cmudict.get_config("huge")
