"""Character language modelling: corpus, vocabulary, windows, loss, sampling, experiments."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdl
from experiments import charlm_common, charlm_lstm, charlm_transformer
from jdl.data import text as text_data

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 8


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def test_vocab_round_trip_and_order():
    vocab = text_data.CharVocab.from_text("banana\n")
    assert vocab.chars == ["\n", "a", "b", "n"]  # sorted by code point
    ids = vocab.encode("nab\nba")
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [3, 1, 2, 0, 2, 1])
    assert vocab.decode(ids) == "nab\nba"
    assert vocab.decode(jnp.asarray(ids)) == "nab\nba"
    assert text_data.CharVocab.from_json(json.loads(json.dumps(vocab.to_json()))).chars == (
        vocab.chars
    )


def test_vocab_unknown_character_is_one_clear_error():
    vocab = text_data.CharVocab.from_text("abc")
    with pytest.raises(text_data.UnknownCharacterError, match=r"'Z' \(U\+005A\) at position 2"):
        vocab.encode("abZc")
    with pytest.raises(ValueError, match="token id 3 is outside the vocabulary"):
        vocab.decode([0, 3])


# ---------------------------------------------------------------------------------------------
# Corpus and split
# ---------------------------------------------------------------------------------------------


def test_stdlib_corpus_is_deterministic_and_capped():
    first = text_data.load_stdlib_source(50_000)
    assert len(first) == 50_000
    assert first == text_data.load_stdlib_source(50_000)
    assert text_data.load_stdlib_source(60_000).startswith(first)  # a prefix of longer caps


def test_stdlib_files_sorted_and_third_party_skipped(tmp_path):
    for name, body in {
        "b.py": "B",
        "a.py": "A",
        "pkg/z.py": "Z",
        "pkg/README": "not python",
        "site-packages/third.py": "T",
        "test/test_a.py": "X",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    paths = text_data.stdlib_source_files(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in paths] == ["a.py", "b.py", "pkg/z.py"]
    assert text_data.load_stdlib_source(0, str(tmp_path)) == "A\nB\nZ\n"
    assert text_data.load_stdlib_source(3, str(tmp_path)) == "A\nB"


def test_split_is_contiguous_ninety_ten():
    ids = np.arange(1000, dtype=np.int32)
    train, val = text_data.split_text(ids, 0.1)
    np.testing.assert_array_equal(train, ids[:900])
    np.testing.assert_array_equal(val, ids[900:])
    with pytest.raises(ValueError, match="too short"):
        text_data.split_text(ids[:5], 0.1)


def test_load_text_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        text_data.load_text(str(tmp_path / "nope.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        text_data.load_text(str(tmp_path / "bin.txt"))


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


def _batch_of_step(data, step):
    """The batch `jdl.fit` trains step `step` on: the windows at that step's starts."""
    return data.take_batch(data.arrays, data.chunk_indices(step, 1)[0])


def test_random_windows_are_shifted_substrings_and_depend_only_on_seed_and_step():
    ids = np.arange(500, dtype=np.int32)  # id == position, so a window shows its start
    data = text_data.RandomWindows(ids, batch_size=8, seq_len=16, seed=3)
    assert data.steps_per_epoch == 500 // (8 * 16)
    batch = jax.jit(lambda step: _batch_of_step(data, step))(jnp.int32(7))
    x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
    assert x.shape == y.shape == (8, 16)
    np.testing.assert_array_equal(y, x + 1)  # next character
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)  # contiguous windows
    assert x.min() >= 0 and y.max() <= 499
    again = text_data.RandomWindows(ids, batch_size=8, seq_len=16, seed=3)
    np.testing.assert_array_equal(_batch_of_step(again, jnp.int32(7))["x"], x)
    other_step = _batch_of_step(data, jnp.int32(8))["x"]
    other_seed = text_data.RandomWindows(ids, batch_size=8, seq_len=16, seed=4)
    assert not np.array_equal(other_step, x)
    assert not np.array_equal(_batch_of_step(other_seed, 7)["x"], x)


def test_random_windows_chunk_indices_match_each_steps_draw():
    # The chunk program takes every step's window starts from `chunk_indices` before its
    # loop; they must be the per-step draws from fold_in(key(seed), step) that define
    # the stream (and that checkpoints of earlier runs resume into).
    ids = np.arange(500, dtype=np.int32)
    data = text_data.RandomWindows(ids, batch_size=8, seq_len=16, seed=3)
    starts = np.asarray(jax.jit(data.chunk_indices, static_argnums=1)(jnp.int32(5), 4))
    key = jax.random.fold_in(jax.random.PRNGKey(3), text_data._WINDOW_SALT)
    for k in range(4):
        expected = jax.random.randint(jax.random.fold_in(key, 5 + k), (8,), 0, 500 - 16)
        np.testing.assert_array_equal(starts[k], expected)
        batch = data.take_batch(data.arrays, starts[k])
        np.testing.assert_array_equal(batch["x"][:, 0], expected)


def test_eval_windows_score_every_character_once_with_exact_weights():
    ids = np.arange(1, 24, dtype=np.int32)  # 23 ids, 22 targets; windows of 5 -> 5 windows
    windows = text_data.eval_windows(ids, 5)
    assert windows["x"].shape == windows["y"].shape == windows["weight"].shape == (5, 5)
    valid = windows["weight"] > 0
    np.testing.assert_array_equal(windows["y"][valid], ids[1:])  # each target exactly once
    np.testing.assert_array_equal(windows["x"][valid], ids[:-1])
    per_position = np.random.RandomState(0).rand(5, 5)  # stand-in per-character losses
    mean_over_windows = np.mean(np.sum(windows["weight"] * per_position, axis=1))
    np.testing.assert_allclose(mean_over_windows, per_position[valid].mean(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


class FixedLogits(nnx.Module):
    """A stand-in model that returns the same logits for any input."""

    def __init__(self, logits: np.ndarray):
        self.logits = nnx.Variable(jnp.asarray(logits))

    def __call__(self, tokens):
        return self.logits[...]


def test_loss_matches_hand_computed_cross_entropy():
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 4, 6).astype(np.float32)
    y = rng.randint(0, 6, (3, 4)).astype(np.int32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]  # (3, 4)
    loss_fn = charlm_common.lm_loss()
    model = FixedLogits(logits)
    got = loss_fn(model, {"x": y, "y": y})
    np.testing.assert_allclose(got["loss"], nll.mean(axis=1), rtol=1e-5)  # per window
    np.testing.assert_allclose(got["accuracy"], (logits.argmax(-1) == y).mean(axis=1))
    weight = rng.rand(3, 4).astype(np.float32) * (rng.rand(3, 4) > 0.3)
    weighted = loss_fn(model, {"x": y, "y": y, "weight": weight})
    np.testing.assert_allclose(weighted["loss"], (weight * nll).sum(axis=1), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def test_lstm_top_k_one_is_greedy_and_samples_stay_in_top_k():
    model = jdl.models.CharLM(7, 8, 16, rngs=nnx.Rngs(0))
    model.eval()
    prompt = np.array([1, 2, 3], np.int32)
    key = jax.random.PRNGKey(0)
    greedy = charlm_lstm.sample(model, key, prompt, 6, 0.0, None)
    np.testing.assert_array_equal(charlm_lstm.sample(model, key, prompt, 6, 1.0, 1), greedy)
    tokens = np.asarray(charlm_lstm.sample(model, key, prompt, 6, 1.0, 2))
    state = None
    context = prompt
    for token in tokens:  # each sampled token is one of the 2 most likely given its past
        logits, state = model.run(jnp.asarray(context)[None], state, deterministic=True)
        assert token in np.argsort(np.asarray(logits[0, -1]))[-2:]
        context = np.array([token], np.int32)


def test_transformer_sample_slides_past_the_context_length():
    model = jdl.models.GPT(7, 8, 16, 2, 1, rngs=nnx.Rngs(0))
    model.eval()
    prompt = np.array([1, 2, 3], np.int32)
    tokens = np.asarray(charlm_transformer.sample(model, jax.random.PRNGKey(0), prompt, 13, 0.0, 1))
    assert tokens.shape == (13,) and tokens.min() >= 0 and tokens.max() < 7
    # Within the first context, greedy sliding generation equals one greedy generate call.
    direct = jdl.models.generate(model, jax.random.PRNGKey(1), prompt[None], 5, temperature=0.0)
    np.testing.assert_array_equal(tokens[:5], np.asarray(direct)[0, 3:])


# ---------------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------------

SMOKE = [
    "--config.duration=3",
    "--config.warmup_steps=0",
    "--config.progress=false",
    "--config.compilation_cache=false",
    "--config.steps_per_dispatch=1",
    "--config.seq_len=16",
    "--config.batch_size=4",
    "--config.log_every=1",
    "--config.eval_every=0",
    "--config.sample_chars=40",
    "--config.sample_prompt=Sp",
]
TINY = {
    "charlm_lstm": ["--config.hidden_size=16", "--config.embed_dim=8"],
    "charlm_transformer": [
        "--config.embed_dim=16",
        "--config.num_heads=2",
        "--config.num_layers=1",
    ],
}


@pytest.mark.parametrize("module", [charlm_lstm, charlm_transformer], ids=lambda m: m.__name__)
def test_experiment_smoke_run_prints_sample_and_final(module, tmp_path, capsys):
    name = module.__name__.split(".")[-1]
    assert f"python -m experiments.{name}" in module.__doc__
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    workdir = tmp_path / name
    argv = [*SMOKE, *TINY[name], f"--config.text_path={path}", "--workdir", str(workdir)]
    final = module.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("FINAL ")
    assert json.loads(lines[-1][len("FINAL ") :]) == final
    assert final["steps"] == 3 and final["vocab_size"] == len(set(TEXT))
    assert 0 < final["val_loss"] < 2 * np.log(final["vocab_size"])
    sample_at = next(i for i, line in enumerate(lines) if line.startswith("SAMPLE"))
    sample = "\n".join(lines[sample_at + 1 : -1])
    assert sample.startswith("Sp") and set(sample) <= set(TEXT)
    saved = json.loads((workdir / "final.json").read_text())
    assert len(saved["sample"]) == 2 + 40
    assert json.loads((workdir / "vocab.json").read_text())["chars"] == "".join(sorted(set(TEXT)))


@pytest.mark.slow  # one more training run; the corpus itself is tested above
def test_default_corpus_is_the_standard_library(capsys, tmp_path):
    argv = [*SMOKE, *TINY["charlm_lstm"], "--config.max_chars=20000"]
    argv += ["--config.sample_prompt=def ", "--workdir", str(tmp_path)]
    final = charlm_lstm.main(argv)
    assert "standard library source: 20,000 characters" in capsys.readouterr().out
    assert final["steps"] == 3


def test_unknown_prompt_character_fails_before_training(tmp_path, capsys):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    argv = [f"--config.text_path={path}", "--config.sample_prompt=Speak\u00e9", "--workdir"]
    with pytest.raises(SystemExit, match=r"error: character '\u00e9' \(U\+00E9\) at position 5"):
        charlm_transformer.main([*argv, str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_config_values_are_rejected(tmp_path):
    for override, message in [
        ("--config.validation_fraction=0", "validation_fraction=0.0 must be in"),
        ("--config.seq_len=1", "seq_len=1 must be >= 2"),
        ("--config.sample_top_k=-1", "sample_top_k=-1"),
        (f"--config.text_path={tmp_path / 'missing.txt'}", "missing.txt'"),
    ]:
        with pytest.raises(SystemExit, match=message):
            charlm_lstm.main([override, "--workdir", str(tmp_path / "run")])


# ---------------------------------------------------------------------------------------------
# Shared config fields: honoured by the language models, or refused
# ---------------------------------------------------------------------------------------------


def _charlm_argv(tmp_path, name: str, *extra: str) -> list[str]:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return [
        *SMOKE,
        *TINY["charlm_transformer"],
        "--config.sample_chars=0",
        f"--config.text_path={path}",
        *extra,
        "--workdir",
        str(tmp_path / name),
    ]


def _recorded_losses(workdir) -> tuple[float, float]:
    """(last train loss, final validation loss), unrounded, from the run's final.json."""
    final = json.loads((workdir / "final.json").read_text())
    return final["train"]["loss"], final["eval"]["loss"]


def test_charlm_honours_micro_batches_and_precision(tmp_path, capsys):
    charlm_transformer.main(_charlm_argv(tmp_path, "plain"))
    charlm_transformer.main(_charlm_argv(tmp_path, "micro", "--config.micro_batches=2"))
    charlm_transformer.main(_charlm_argv(tmp_path, "bf16", "--config.precision=bf16"))
    plain = _recorded_losses(tmp_path / "plain")
    # Two accumulated micro-batches make the full batch's update.
    np.testing.assert_allclose(_recorded_losses(tmp_path / "micro"), plain, rtol=0, atol=1e-5)
    bf16 = _recorded_losses(tmp_path / "bf16")
    assert bf16 != plain  # bfloat16 rounding changes the losses ...
    np.testing.assert_allclose(bf16, plain, rtol=0.02)  # ... a little


@pytest.mark.slow  # a subprocess with two devices: a fresh compile
def test_charlm_trains_on_a_data_mesh_like_on_one_device(tmp_path, capsys):
    charlm_transformer.main(_charlm_argv(tmp_path, "single"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    argv = _charlm_argv(tmp_path, "mesh", "--config.mesh_shape=data:2")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.charlm_transformer", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("FINAL ")
    mesh = _recorded_losses(tmp_path / "mesh")
    assert all(np.isfinite(mesh))
    np.testing.assert_allclose(mesh, _recorded_losses(tmp_path / "single"), rtol=0, atol=1e-5)


def test_charlm_refuses_the_shared_fields_it_cannot_honour(tmp_path):
    argv = _charlm_argv(tmp_path, "run", "--config.num_processes=2")
    with pytest.raises(SystemExit) as raised:
        charlm_transformer.main(argv)
    message = str(raised.value)
    assert "config.num_processes=2 is not supported" in message and "leave it at 0" in message
    assert "\n" not in message.strip()
    assert not (tmp_path / "run").exists()
