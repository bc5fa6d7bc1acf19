"""Continuous spoken digit strings built from FSDD recordings, for CTC training.

An utterance is 3-7 digits (by default) said by ONE speaker: that speaker's recordings
of the digits, in order, with a random stretch of silence (0.05-0.25 s by default)
before the first, between each two and after the last, plus light white noise over
the whole utterance (SNR uniform in 20-40 dB against the utterance's mean power).
Train utterances use only the official split's train takes (5-49), test utterances
only its test takes (0-4), so no recording is heard in both. Everything is drawn from
one seeded NumPy generator per split: the same arguments give the same arrays.

Sizes with `load_fsdd_utterances`' defaults: 2,000 train and 300 test utterances of
up to 5 s (40,000 samples, float32 (N, 40000): 320 MB for train; mean length 3.1 s);
an utterance whose recordings and gaps would run longer is drawn again, which happens
to about 16% of 7-digit draws, so slow speakers' long recordings are somewhat rarer in
the longest strings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from jdl.data import fsdd
from jdl.data.dataset import Dataset
from jdl.errors import UserError

NUM_DIGITS = 10
DEFAULT_MAX_SAMPLES = 40_000  # 5 s at 8 kHz
MAX_REDRAWS = 100  # draws of one utterance before the length limit is declared too tight


class UtteranceError(UserError, ValueError):
    """A transcript or utterance setting that cannot make an utterance."""


def check_transcript(digits: Sequence[int]) -> np.ndarray:
    """The transcript as int32 (L,) digits; raises `UtteranceError` if empty or not 0-9."""
    labels = np.asarray(list(digits))
    if labels.size == 0:
        raise UtteranceError("the transcript is empty; an utterance needs at least one digit")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9:
        bad = next(d for d in list(digits) if not (isinstance(d, int | np.integer) and 0 <= d <= 9))
        raise UtteranceError(f"transcript label {bad!r} is not a digit 0-9; use digits 0-9 only")
    return labels.astype(np.int32)


def compose(
    pieces: Sequence[np.ndarray], gaps: Sequence[int], *, noise: np.ndarray | None = None
) -> np.ndarray:
    """`gaps[0]` zeros, pieces[0], `gaps[1]` zeros, ..., pieces[-1], `gaps[-1]` zeros.

    `gaps` has one more entry than `pieces`; `noise`, if given, is added to the result
    (same length). Returns float32 (sum of lengths,).
    """
    if len(gaps) != len(pieces) + 1:
        raise ValueError(f"need {len(pieces) + 1} gaps for {len(pieces)} pieces, got {len(gaps)}")
    parts = [np.zeros(gaps[0], np.float32)]
    for piece, gap in zip(pieces, gaps[1:], strict=True):
        parts += [np.asarray(piece, np.float32), np.zeros(gap, np.float32)]
    out = np.concatenate(parts)
    return out if noise is None else out + noise.astype(np.float32)


def build_utterances(
    recordings: Mapping[str, object],
    *,
    takes: Sequence[int],
    num_utterances: int,
    seed: int,
    min_digits: int = 3,
    max_digits: int = 7,
    min_gap_s: float = 0.05,
    max_gap_s: float = 0.25,
    min_snr_db: float = 20.0,
    max_snr_db: float = 40.0,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    sample_rate: int = fsdd.SAMPLE_RATE,
) -> dict[str, np.ndarray]:
    """`num_utterances` digit strings from the recordings whose take is in `takes`.

    Each utterance: a speaker uniform over those present, a digit count uniform in
    [min_digits, max_digits], digits uniform over 0-9, for each digit one of that
    speaker's recordings of it (uniform over `takes`), gaps uniform in
    [min_gap_s, max_gap_s], noise as the module docstring says. A draw longer than
    `max_samples` is replaced by a fresh draw of the same digit string.

    Args:
      recordings: `jdl.data.fsdd.load_fsdd_recordings()`'s dict ("waves", "digit",
        "speaker", "take"), or any dict shaped like it.
      takes: the take numbers that may be used (e.g. range(5, 50) for train).
      num_utterances: N >= 1.
      seed: the generator's seed; same arguments, same arrays.

    Returns:
      {"x": float32 (N, max_samples) waveforms, zero after each utterance's end;
       "length": int32 (N,) samples; "labels": int32 (N, max_digits) digits 0-9,
       -1 after the end; "label_length": int32 (N,); "speaker": int32 (N,);
       "take": int32 (N, max_digits) the take of each digit's recording, -1 after the end}.

    Raises:
      UtteranceError: a bad size or range, no recording for a needed (speaker, digit),
        or `max_samples` too short for the recordings after `MAX_REDRAWS` draws.
    """
    if not (isinstance(num_utterances, int) and num_utterances >= 1):
        raise UtteranceError(f"num_utterances={num_utterances!r} must be an integer >= 1")
    if not 1 <= min_digits <= max_digits:
        raise UtteranceError(
            f"need 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}"
        )
    if not 0 <= min_gap_s <= max_gap_s:
        raise UtteranceError(f"need 0 <= min_gap_s <= max_gap_s, got {min_gap_s}, {max_gap_s}")
    if min_snr_db > max_snr_db:
        raise UtteranceError(f"min_snr_db={min_snr_db} must be <= max_snr_db={max_snr_db}")
    rng = np.random.default_rng(seed)
    chosen = np.isin(np.asarray(recordings["take"]), np.asarray(list(takes)))
    pool: dict[tuple[int, int], list[int]] = {}
    for index in np.flatnonzero(chosen):
        key = (int(recordings["digit"][index]), int(recordings["speaker"][index]))
        pool.setdefault(key, []).append(int(index))
    speakers = sorted({speaker for _, speaker in pool})
    if not speakers:
        raise UtteranceError(f"no recordings have a take in {list(takes)}; check takes")
    gap_range = (round(min_gap_s * sample_rate), round(max_gap_s * sample_rate))
    out = {
        "x": np.zeros((num_utterances, max_samples), np.float32),
        "length": np.zeros(num_utterances, np.int32),
        "labels": np.full((num_utterances, max_digits), -1, np.int32),
        "label_length": np.zeros(num_utterances, np.int32),
        "speaker": np.zeros(num_utterances, np.int32),
        "take": np.full((num_utterances, max_digits), -1, np.int32),
    }
    waves = recordings["waves"]
    for n in range(num_utterances):
        speaker = speakers[rng.integers(len(speakers))]
        digits = rng.integers(0, NUM_DIGITS, rng.integers(min_digits, max_digits + 1))
        for _ in range(MAX_REDRAWS):
            picks = []
            for digit in digits:
                options = pool.get((int(digit), speaker))
                if not options:
                    raise UtteranceError(
                        f"no recording of digit {digit} by speaker {speaker} among takes "
                        f"{list(takes)}; every speaker needs every digit"
                    )
                picks.append(options[rng.integers(len(options))])
            gaps = rng.integers(gap_range[0], gap_range[1] + 1, len(digits) + 1)
            total = int(gaps.sum()) + sum(len(waves[i]) for i in picks)
            if total <= max_samples:
                break
        else:
            raise UtteranceError(
                f"max_samples={max_samples} is too short: {MAX_REDRAWS} draws of a "
                f"{len(digits)}-digit utterance all ran longer; raise it"
            )
        clean = compose([waves[i] for i in picks], gaps)
        power = float(np.mean(np.square(clean)))
        snr_db = rng.uniform(min_snr_db, max_snr_db)
        noise = rng.standard_normal(total) * np.sqrt(power / 10.0 ** (snr_db / 10.0))
        out["x"][n, :total] = clean + noise.astype(np.float32)
        out["length"][n] = total
        out["labels"][n, : len(digits)] = check_transcript(digits.tolist())
        out["label_length"][n] = len(digits)
        out["speaker"][n] = speaker
        out["take"][n, : len(digits)] = np.asarray(recordings["take"])[picks]
    return out


def load_fsdd_utterances(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    num_train: int = 2000,
    num_test: int = 300,
    seed: int = 0,
    **options,
) -> Dataset:
    """FSDD digit strings: "train" from takes 5-49, "test" from takes 0-4.

    Args:
      data_dir, download: as `jdl.data.load_fsdd`.
      num_train, num_test: utterances per split.
      seed: the train split uses `seed`, the test split `seed + 1`.
      options: passed to `build_utterances` (digit counts, gaps, SNR, max_samples).

    Returns:
      A `Dataset` (num_classes 10) whose splits are `build_utterances`' dicts, plus
      "y": the number of digits (so generic tools that read "y" find one label).
    """
    recordings = fsdd.load_fsdd_recordings(data_dir=data_dir, download=download)
    splits = {}
    for name, takes, count, split_seed in (
        ("train", range(fsdd.TEST_TAKES, fsdd.NUM_TAKES), num_train, seed),
        ("test", range(fsdd.TEST_TAKES), num_test, seed + 1),
    ):
        arrays = build_utterances(
            recordings, takes=takes, num_utterances=count, seed=split_seed, **options
        )
        splits[name] = {**arrays, "y": arrays["label_length"]}
    max_samples = splits["train"]["x"].shape[1]
    digits = {name: int(split["label_length"].sum()) for name, split in splits.items()}
    return Dataset(
        name="fsdd_utterances",
        splits=splits,
        num_classes=NUM_DIGITS,
        source=(
            f"fsdd {fsdd.RELEASE} digit strings from {recordings['folder']}: "
            f"{num_train} train utterances ({digits['train']} digits, takes "
            f"{fsdd.TEST_TAKES}-{fsdd.NUM_TAKES - 1}) and {num_test} test utterances "
            f"({digits['test']} digits, takes 0-{fsdd.TEST_TAKES - 1}), one speaker each, "
            f"padded to {max_samples} samples ({max_samples / fsdd.SAMPLE_RATE:g} s)"
        ),
    )


__all__ = [
    "UtteranceError",
    "build_utterances",
    "check_transcript",
    "compose",
    "load_fsdd_utterances",
]
