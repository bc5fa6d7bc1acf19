"""The English-French translation experiment: BLEU by sacrebleu, a tiny run end to end
through its command line on a small pair file, and bad settings rejected before anything
compiles."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

from experiments import translate_en_fr

ROOT = Path(__file__).resolve().parents[1]


def test_bleu_is_sacrebleus_corpus_bleu_on_known_strings():
    same = "the cat sat on the mat"
    assert translate_en_fr.corpus_bleu([same], [[same]]) == pytest.approx(100.0)
    # One substitution in six words: n-gram precisions 5/6, 3/5, 2/4, 1/3, no brevity
    # penalty, so BLEU = 100 * (1/12) ** (1/4).
    partial = translate_en_fr.corpus_bleu(["the cat sat on a mat"], [[same]])
    assert partial == pytest.approx(100 * (1 / 12) ** 0.25, abs=0.01)
    # Several references per sentence, in different numbers: the hypothesis matches the
    # second reference of sentence 1, so the corpus is perfect.
    hypotheses = ["the cat sat on the mat", "a dog ran in the park today"]
    references = [["a cat was on the mat", same], ["a dog ran in the park today"]]
    assert translate_en_fr.corpus_bleu(hypotheses, references) == pytest.approx(100.0)
    direct = sacrebleu.corpus_bleu(
        ["le chat est noir", "il pleut"], [["le chat est noir !", "il pleut beaucoup"]]
    ).score
    mine = translate_en_fr.corpus_bleu(
        ["le chat est noir", "il pleut"], [["le chat est noir !"], ["il pleut beaucoup"]]
    )
    assert mine == pytest.approx(direct) and 0 < mine < 100
    chrf = translate_en_fr.corpus_chrf(["le chat"], [["le chien", "le chat"]])
    assert chrf == pytest.approx(100.0)
    with pytest.raises(ValueError, match="one non-empty list of references"):
        translate_en_fr.corpus_bleu(["a", "b"], [["a"], []])


def small_pairs(path: Path) -> Path:
    """About 200 pairs in Tatoeba's format: one to three words, one or two translations."""
    words = {"cat": "chat", "dog": "chien", "sun": "soleil", "sea": "mer", "tree": "arbre"}
    words |= {"red": "rouge", "big": "grand", "old": "vieux"}
    english = sorted(words)
    lines = []
    for i, a in enumerate(english):
        for j, b in enumerate(english):
            for k, c in enumerate(english[:3]):
                source = f"{a} {b} {c}." if (i + j + k) % 2 else f"{a} {b}."
                target = " ".join(words[w] for w in source[:-1].split())
                number = 64 * i + 8 * j + k
                lines.append(f"{source}\t{target}.\tCC-BY 2.0 (France) #{number} & #{number}")
                if number % 5 == 0:
                    lines.append(f"{source}\t{target} !\tCC-BY 2.0 (France) #{number} & #1")
    path.write_text("\n".join(sorted(lines, key=lambda s: len(s.split("\t")[0]))) + "\n")
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
    "--config.max_positions=32",
    "--config.max_tgt_len=31",
    "--config.beam_size=2",
    "--config.decode_batch_size=8",
    "--config.max_test_sentences=10",
    "--config.progress=false",
    "--config.compilation_cache=false",
]


@pytest.mark.slow
def test_tiny_run_through_the_command_line(tmp_path):
    assert "python -m experiments.translate_en_fr" in translate_en_fr.__doc__
    pairs = small_pairs(tmp_path / "pairs.tsv")
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.translate_en_fr", *TINY]
    done = subprocess.run(
        [*command, f"--config.data_path={pairs}", "--workdir", str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("FINAL ")
    final = json.loads(last[len("FINAL ") :])
    for key in ("bleu", "bleu_greedy", "chrf"):
        assert 0.0 <= final[key] <= 100.0
    assert final["steps"] == 4 and final["test_sentences"] == 10 and final["beam_size"] == 2
    assert final["seconds"] > 0 and final["cpu_seconds"] > 0 and final["params"] > 0
    assert math.isfinite(final["val_loss"]) and final["val_loss"] > 0
    assert done.stdout.count("EXAMPLE ") == 10
    recorded = json.loads((workdir / "final.json").read_text())
    assert recorded["bleu"] == final["bleu"] and recorded["bleu_greedy"] == final["bleu_greedy"]
    assert (workdir / "checkpoints").is_dir() and (workdir / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.num_heads=3", r"config.embed_dim=128 must be a multiple of"),
        ("--config.max_tgt_len=80", r"config.max_positions >= 81"),
        ("--config.beam_size=0", r"config.beam_size=0"),
        ("--config.length_alpha=-1.0", r"config.length_alpha=-1.0 must be >= 0"),
        ("--config.max_pairs=-1", r"config.max_pairs=-1 must be >= 0"),
    ],
)
def test_bad_settings_are_rejected_before_anything_runs(override, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        translate_en_fr.main([override, "--workdir", str(tmp_path)])
    assert not (tmp_path / "config.json").exists()


def test_no_presets():
    with pytest.raises(Exception, match="unknown preset 'long'"):
        translate_en_fr.get_config("long")
