"""CTC on digit strings: the utterance builder, the acoustic model, the loss and decoders."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl.data import fsdd, utterances
from jdl.models import ctc

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"


def _fake_recordings(speakers: int = 2, takes: int = 10, seed: int = 0) -> dict:
    """Tones of 400-1200 samples, one frequency per digit, shaped like load_fsdd_recordings."""
    rng = np.random.default_rng(seed)
    waves, digits, spk, take_ids = [], [], [], []
    for speaker in range(speakers):
        for digit in range(10):
            for take in range(takes):
                t = np.arange(rng.integers(400, 1201)) / 8000
                waves.append((0.5 * np.sin(2 * np.pi * (300 + 150 * digit) * t)).astype(np.float32))
                digits.append(digit)
                spk.append(speaker)
                take_ids.append(take)
    as_int = lambda values: np.asarray(values, np.int32)  # noqa: E731
    return {
        "waves": waves,
        "digit": as_int(digits),
        "speaker": as_int(spk),
        "take": as_int(take_ids),
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def _brute_force(log_probs: np.ndarray) -> dict[tuple[int, ...], float]:
    """log p(labels) for every label sequence: a sum over all C**T paths, each collapsed."""
    frames, classes = log_probs.shape
    totals: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(classes), repeat=frames):
        collapsed = tuple(c for i, c in enumerate(path) if c != 0 and (i == 0 or path[i - 1] != c))
        score = sum(log_probs[t, c] for t, c in enumerate(path))
        totals[collapsed] = float(np.logaddexp(totals.get(collapsed, -np.inf), score))
    return totals


# ---------------------------------------------------------------------------- recordings


def test_load_fsdd_recordings_gives_every_recording_at_its_own_length():
    raw = fsdd.load_fsdd_recordings(data_dir=SHARED, download=False)
    assert len(raw["waves"]) == 3000
    lengths = np.array([len(w) for w in raw["waves"]])
    assert lengths.min() == 1148 and lengths.max() == 18262  # 0.14 s and 2.28 s at 8 kHz
    assert sorted(set(raw["take"].tolist())) == list(range(50))
    # The same order and samples as load_fsdd, which pads or crops them to one length.
    fixed = fsdd.load_fsdd(data_dir=SHARED, download=False, length=20000)
    train_first = np.flatnonzero(raw["take"] >= fsdd.TEST_TAKES)[0]
    wave = raw["waves"][train_first]
    np.testing.assert_array_equal(fixed["train"]["x"][0, : len(wave)], wave)
    assert fixed["train"]["y"][0] == raw["digit"][train_first]


# --------------------------------------------------------------------------- utterances


def test_utterances_keep_train_and_test_takes_apart_and_one_speaker_each():
    data = utterances.load_fsdd_utterances(
        data_dir=SHARED, download=False, num_train=60, num_test=30, seed=3
    )
    train, test = data["train"], data["test"]
    for split, allowed in ((train, range(5, 50)), (test, range(0, 5))):
        used = split["take"][split["take"] >= 0]
        assert set(used.tolist()) <= set(allowed)
        assert np.all((split["label_length"] >= 3) & (split["label_length"] <= 7))
    assert train["x"].shape == (60, utterances.DEFAULT_MAX_SAMPLES)
    assert "60 train utterances" in data.source and "30 test utterances" in data.source


def test_build_utterances_is_deterministic_and_seed_dependent():
    recordings = _fake_recordings()
    make = lambda seed: utterances.build_utterances(  # noqa: E731
        recordings, takes=range(10), num_utterances=12, seed=seed, max_samples=20000
    )
    first, again, other = make(5), make(5), make(6)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["labels"], other["labels"])


def test_utterance_lengths_labels_and_padding_are_consistent():
    recordings = _fake_recordings()
    lengths = np.array([len(w) for w in recordings["waves"]])
    out = utterances.build_utterances(
        recordings, takes=range(10), num_utterances=40, seed=1, max_samples=20000
    )
    for n in range(40):
        size, total = out["label_length"][n], out["length"][n]
        labels, takes = out["labels"][n], out["take"][n]
        assert 3 <= size <= 7 and np.all(labels[size:] == -1) and np.all(takes[size:] == -1)
        assert np.all((labels[:size] >= 0) & (labels[:size] <= 9))
        assert total <= 20000 and np.all(out["x"][n, total:] == 0)
        # The digits' recordings plus size + 1 gaps of 0.05-0.25 s (400-2000 samples).
        picked = [
            np.flatnonzero(
                (recordings["digit"] == d)
                & (recordings["speaker"] == out["speaker"][n])
                & (recordings["take"] == t)
            )[0]
            for d, t in zip(labels[:size], takes[:size], strict=True)
        ]
        gaps = total - lengths[picked].sum()
        assert 400 * (size + 1) <= gaps <= 2000 * (size + 1)
        assert np.abs(out["x"][n, :total]).max() > 0.1  # speech is there, and noise


def test_compose_lays_out_gaps_and_pieces():
    out = utterances.compose([np.ones(2), 2 * np.ones(3)], [1, 2, 1])
    np.testing.assert_array_equal(out, [0, 1, 1, 0, 0, 2, 2, 2, 0])
    with pytest.raises(ValueError, match="need 3 gaps"):
        utterances.compose([np.ones(2), np.ones(2)], [1, 1])


@pytest.mark.parametrize(
    "transcript, message",
    [([], "the transcript is empty"), ([3, 10, 1], "label 10 is not a digit 0-9")],
)
def test_bad_transcripts_are_one_line_user_errors(transcript, message):
    with pytest.raises(utterances.UtteranceError, match=message) as caught:
        utterances.check_transcript(transcript)
    assert isinstance(caught.value, jdl.UserError) and "\n" not in str(caught.value)


def test_a_length_limit_no_draw_fits_is_a_user_error():
    with pytest.raises(utterances.UtteranceError, match="max_samples=1000 is too short"):
        utterances.build_utterances(
            _fake_recordings(), takes=range(10), num_utterances=1, seed=0, max_samples=1000
        )


# ------------------------------------------------------------------------------- model


def _tiny_model(**overrides) -> ctc.CTCAcousticModel:
    options = dict(n_mels=16, conv_channels=(4, 4), hidden_size=8, rngs=nnx.Rngs(0))
    return ctc.CTCAcousticModel(11, **{**options, **overrides})


def test_model_gives_logits_per_output_frame_and_ignores_padding():
    model = _tiny_model()
    model.eval()
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(6000).astype(np.float32) * 0.1
    short = np.zeros((2, 8000), np.float32)
    long = np.zeros((2, 12000), np.float32)
    short[0, :6000] = long[0, :6000] = wave
    short[1, :] = long[1, :8000] = rng.standard_normal(8000) * 0.1
    lengths = jnp.array([6000, 8000])
    out_short, out_long = model(short, lengths), model(long, lengths)
    assert out_short.shape == (2, int(model.output_lengths(8000)), 11)
    assert out_long.shape == (2, int(model.output_lengths(12000)), 11)
    # 8000 samples at hop 160: 51 frames, halved twice rounding up: 26, then 13.
    assert int(model.output_lengths(8000)) == 13
    frames = np.asarray(model.output_lengths(np.array([6000, 8000])))
    for row in range(2):
        np.testing.assert_allclose(
            out_short[row, : frames[row]], out_long[row, : frames[row]], atol=1e-4
        )


def test_ctc_loss_is_minus_log_of_the_brute_force_sum_over_alignments():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 3)).astype(np.float32) * 2
    log_probs = _log_softmax(logits.astype(np.float64))
    labels = np.array([[1, 2, 0], [1, 1, 0]], np.int32)  # row 1: a repeat needs a blank between
    label_lengths = np.array([2, 2])
    logit_lengths = np.array([5, 4])  # row 1 has one padding frame
    loss = ctc.ctc_loss(
        jnp.asarray(logits), jnp.asarray(logit_lengths), jnp.asarray(labels), label_lengths
    )
    expected = [
        -_brute_force(log_probs[0])[(1, 2)],
        -_brute_force(log_probs[1, :4])[(1, 1)],
    ]
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-4)


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    best = [1, 1, 0, 1, 2, 2, 0, 0, 3]
    logits = np.full((len(best), 4), -5.0)
    logits[np.arange(len(best)), best] = 1.0
    assert ctc.greedy_decode(logits) == [1, 1, 2, 3]
    assert ctc.greedy_decode(logits, 6) == [1, 1, 2]
    assert ctc.greedy_decode(np.zeros((0, 4))) == []


@pytest.mark.parametrize("seed", range(6))
def test_prefix_beam_search_finds_the_most_probable_sequence_exhaustively(seed):
    rng = np.random.default_rng(seed)
    log_probs = _log_softmax(rng.normal(size=(5, 3)) * 2)
    totals = _brute_force(log_probs)
    best = max(totals, key=totals.get)
    prefix, score = ctc.prefix_beam_search(log_probs, beam_width=len(totals))
    assert tuple(prefix) == best
    assert math.isclose(score, totals[best], abs_tol=1e-9)
    # A narrower beam drops alignments with the prefixes it prunes: a lower bound.
    narrow, narrow_score = ctc.prefix_beam_search(log_probs, beam_width=2)
    assert narrow_score <= totals[tuple(narrow)] + 1e-9


def test_prefix_beam_search_sums_alignments_where_the_best_path_does_not():
    # Per frame p(blank) = 0.6, p(a) = 0.4: the best path is blank-blank (0.36), but "a"
    # has three alignments (0.16 + 0.24 + 0.24 = 0.64).
    log_probs = np.log(np.array([[0.6, 0.4], [0.6, 0.4]]))
    assert ctc.greedy_decode(log_probs) == []
    prefix, score = ctc.prefix_beam_search(log_probs, beam_width=4)
    assert prefix == [1] and math.isclose(score, math.log(0.64))
    assert ctc.prefix_beam_search(log_probs, 1, beam_width=4)[0] == []  # first frame: 0.6 > 0.4
    with pytest.raises(ValueError, match="beam_width must be >= 1"):
        ctc.prefix_beam_search(log_probs, beam_width=0)


def test_labels_that_need_more_frames_than_the_model_gives_are_a_user_error():
    assert ctc.min_frames([1, 1, 2]) == 4 and ctc.min_frames([1, 2, 1]) == 3
    model = _tiny_model(conv_channels=(4, 4, 4))
    frames = model.output_lengths(np.array([1600, 8000]))  # 11 feature frames -> 2; 51 -> 7
    assert frames.tolist() == [2, 7]
    labels = np.array([[1, 2, 3, -1], [4, 4, 4, 4]])
    with pytest.raises(ctc.CTCInputError, match="sequence 0 has 3 labels") as caught:
        ctc.check_alignable(frames, labels, np.array([3, 4]))
    assert isinstance(caught.value, jdl.UserError) and "\n" not in str(caught.value)
    ctc.check_alignable(frames, labels, np.array([2, 4]))  # 1, 2 needs 2; 4, 4, 4, 4 needs 7
    with pytest.raises(ctc.CTCInputError, match="need at least 7 output frames, but the model"):
        ctc.check_alignable(np.array([2, 6]), labels, np.array([2, 4]))


def test_the_train_step_through_fit_lowers_the_ctc_loss():
    data = utterances.build_utterances(
        _fake_recordings(),
        takes=range(10),
        num_utterances=16,
        seed=0,
        max_samples=12000,
        max_digits=4,
    )
    arrays = {key: data[key] for key in ("x", "length", "labels", "label_length")}
    model = _tiny_model(hidden_size=16)
    state = jdl.TrainState.create(model, optax.adam(1e-2), seed=0)
    evaluate = jdl.make_evaluator(jdl.make_eval_step(ctc.ctc_model_loss), 16)
    before = evaluate(state, arrays)["loss"]
    result = jdl.fit(
        state,
        train_step=jdl.make_train_step(ctc.ctc_model_loss),
        train_data=jdl.InMemoryData(arrays, batch_size=8, seed=0),
        num_steps=30,
        log_every=0,
        progress=False,
    )
    after = evaluate(result.state, arrays)["loss"]
    assert np.isfinite(before) and after < 0.7 * before, (before, after)
