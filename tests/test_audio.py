"""jdl.audio: features against librosa on real FSDD recordings, and the on-device augmentations."""

from __future__ import annotations

import wave
from pathlib import Path

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl import audio

RECORDINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "recordings"
SR = 8000
LENGTH = 6000  # the batched checks crop or zero-pad to this many samples

# Option sets covering each choice librosa offers that jdl.audio supports.
OPTIONS = [
    dict(n_fft=256, hop_length=80, win_length=200),  # the speech setting: 25 ms / 10 ms
    dict(n_fft=512, hop_length=128, center=False, window="hamming"),
    dict(n_fft=256, hop_length=64, pad_mode="reflect", window="ones"),
    dict(n_fft=2048, hop_length=512),  # librosa's defaults
]


def _read(path: Path) -> np.ndarray:
    with wave.open(str(path)) as f:
        assert (f.getframerate(), f.getsampwidth(), f.getnchannels()) == (SR, 2, 1)
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768


@pytest.fixture(scope="module")
def recordings() -> list[np.ndarray]:
    """12 real recordings: every speaker, several digits, lengths 0.2-0.8 s."""
    names = [
        f"{digit}_{speaker}_{take}.wav"
        for digit, speaker, take in [
            (0, "george", 0),
            (1, "jackson", 7),
            (2, "lucas", 13),
            (3, "nicolas", 21),
            (4, "theo", 33),
            (5, "yweweler", 49),
            (6, "george", 5),
            (7, "jackson", 2),
            (8, "lucas", 40),
            (9, "nicolas", 9),
            (9, "theo", 1),
            (0, "yweweler", 17),
        ]
    ]
    return [_read(RECORDINGS / name) for name in names]


@pytest.fixture(scope="module")
def batch(recordings) -> np.ndarray:
    out = np.zeros((len(recordings), LENGTH), np.float32)
    for row, y in zip(out, recordings, strict=True):
        row[: min(len(y), LENGTH)] = y[:LENGTH]
    return out


def _relative(actual, expected) -> float:
    """Largest absolute difference over the largest magnitude of the reference."""
    expected = np.asarray(expected)
    return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


# --------------------------------------------------------------------- parity with librosa


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_stft_matches_librosa_per_recording(recordings, options):
    for y in recordings:
        expected = librosa.stft(y.astype(np.float64), **options)
        actual = audio.stft(y, **options)
        assert actual.shape == expected.shape
        assert actual.dtype == jnp.complex64
        assert _relative(actual, expected) <= 1e-4


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_batched_features_match_librosa_row_by_row(batch, options):
    mel_options = dict(sr=SR, n_mels=40, fmax=3800.0, **options)
    mel = audio.melspectrogram(batch, **mel_options)
    log_mel = audio.power_to_db(mel)
    log_mel_max_ref = audio.power_to_db(mel, ref=jnp.max, top_db=60.0)
    cepstra = audio.mfcc(batch, n_mfcc=13, lifter=22, **mel_options)
    assert mel.shape[:2] == cepstra.shape[:1] + (40,)
    for row, y in enumerate(batch.astype(np.float64)):
        expected_mel = librosa.feature.melspectrogram(y=y, **mel_options)
        assert _relative(mel[row], expected_mel) <= 1e-4
        assert _relative(log_mel[row], librosa.power_to_db(expected_mel)) <= 1e-4
        assert (
            _relative(
                log_mel_max_ref[row], librosa.power_to_db(expected_mel, ref=np.max, top_db=60.0)
            )
            <= 1e-4
        )
        expected_mfcc = librosa.feature.mfcc(y=y, n_mfcc=13, lifter=22, **mel_options)
        assert _relative(cepstra[row], expected_mfcc) <= 1e-4


def test_mfcc_defaults_match_librosa(recordings):
    y = recordings[3]
    expected = librosa.feature.mfcc(y=y.astype(np.float64), sr=SR)
    assert _relative(audio.mfcc(y, sr=SR), expected) <= 1e-4
    expected_htk = librosa.feature.mfcc(
        y=y.astype(np.float64), sr=SR, n_mels=64, htk=True, norm=None, mel_norm=None, n_fft=512
    )
    actual_htk = audio.mfcc(y, sr=SR, n_mels=64, htk=True, norm=None, mel_norm=None, n_fft=512)
    assert _relative(actual_htk, expected_htk) <= 1e-4


@pytest.mark.parametrize("htk", [False, True])
@pytest.mark.parametrize("norm", [None, "slaney"])
@pytest.mark.parametrize(
    "sr,n_fft,n_mels,fmin,fmax", [(8000, 256, 40, 0.0, None), (22050, 2048, 128, 30.0, 8000.0)]
)
def test_mel_filterbank_matches_librosa(htk, norm, sr, n_fft, n_mels, fmin, fmax):
    expected = librosa.filters.mel(
        sr=sr,
        n_fft=n_fft,
        n_mels=n_mels,
        fmin=fmin,
        fmax=fmax,
        htk=htk,
        norm=norm,
        dtype=np.float64,
    )
    actual = audio.mel_filterbank(
        sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk, norm=norm
    )
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["ortho", None])
def test_dct_matrix_matches_scipy(norm):
    import scipy.fft

    x = np.random.default_rng(0).standard_normal((40, 7))
    expected = scipy.fft.dct(x, type=2, norm=norm, axis=0)[:13]
    np.testing.assert_allclose(audio.dct_matrix(40, 13, norm=norm) @ x, expected, atol=1e-10)


def test_window_matches_librosa():
    for name in audio.WINDOWS:
        expected = librosa.util.pad_center(
            librosa.filters.get_window(name, 200, fftbins=True), size=256
        )
        np.testing.assert_allclose(audio.get_window(name, 200, 256), expected, atol=1e-12)


# ---------------------------------------------------------------------- on-device, batched


def test_features_compile_into_the_enclosing_program(batch):
    """Inside a jitted function the whole pipeline is one XLA program with an FFT op."""

    def features(x):
        return audio.log_mel_spectrogram(x, sr=SR, n_fft=256, hop_length=80, n_mels=40)

    lowered = jax.jit(features).lower(jnp.asarray(batch))
    assert "fft" in lowered.as_text().lower()
    compiled = jax.jit(features)(jnp.asarray(batch))
    assert compiled.shape == (len(batch), 40, audio.num_frames(LENGTH, n_fft=256, hop_length=80))
    # Two leading batch axes give the same numbers as one.
    stacked = features(jnp.asarray(batch).reshape(3, 4, LENGTH)).reshape(compiled.shape)
    np.testing.assert_allclose(stacked, compiled, rtol=1e-5, atol=1e-4)


def test_power_to_db_floors_each_spectrogram_at_its_own_peak(batch):
    """An example's features do not depend on the rest of its batch."""
    mel = audio.melspectrogram(batch, sr=SR, n_fft=256, hop_length=80, n_mels=40)
    together = audio.power_to_db(mel, ref=jnp.max, top_db=40.0)
    for row in range(len(batch)):
        alone = audio.power_to_db(mel[row : row + 1], ref=jnp.max, top_db=40.0)
        np.testing.assert_allclose(together[row], alone[0], atol=1e-5)
        assert float(together[row].max()) == pytest.approx(0.0, abs=1e-5)
        assert float(together[row].min()) >= -40.0 - 1e-4


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: audio.stft(np.zeros(100), n_fft=256, pad_mode="wrap"), "pad_mode"),
        (lambda: audio.stft(np.zeros(100), n_fft=256, pad_mode="reflect"), "reflect"),
        (lambda: audio.stft(np.zeros(100), n_fft=256, center=False), "at least"),
        (lambda: audio.stft(np.zeros(1000), n_fft=256, window="kaiser"), "window"),
        (lambda: audio.stft(np.zeros(1000), n_fft=256, win_length=300), "win_length"),
        (lambda: audio.mel_filterbank(sr=8000, n_fft=256, fmin=5000.0), "fmin"),
        (lambda: audio.mel_filterbank(sr=8000, n_fft=256, norm="l2"), "norm"),
        (lambda: audio.mfcc(np.zeros(4000), sr=8000, n_mels=10, n_mfcc=20), "n_mfcc"),
        (lambda: audio.power_to_db(np.ones((2, 2)), amin=0.0), "amin"),
    ],
)
def test_bad_arguments_raise_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- augmentations


def test_spec_augment_is_deterministic_under_its_key():
    x = jax.random.normal(jax.random.key(0), (16, 40, 101))
    kwargs = dict(num_freq_masks=2, freq_mask_width=8, num_time_masks=2, time_mask_width=10)
    first = audio.spec_augment(jax.random.key(1), x, **kwargs)
    np.testing.assert_array_equal(first, audio.spec_augment(jax.random.key(1), x, **kwargs))
    assert not np.array_equal(first, audio.spec_augment(jax.random.key(2), x, **kwargs))
    # Examples get their own masks.
    masked = np.asarray(first == 0)
    assert len({row.tobytes() for row in masked}) > 1


@pytest.mark.parametrize("seed", range(5))
def test_spec_augment_masks_are_whole_bands_within_the_widths(seed):
    ones = jnp.ones((64, 40, 101))
    freq_only = np.asarray(
        audio.spec_augment(
            jax.random.key(seed), ones, num_freq_masks=1, freq_mask_width=7, num_time_masks=0
        )
    )
    time_only = np.asarray(
        audio.spec_augment(
            jax.random.key(seed), ones, num_freq_masks=0, num_time_masks=1, time_mask_width=12
        )
    )
    widths_seen = set()
    for spec, axis, limit in [(freq_only, 1, 7), (time_only, 0, 12)]:
        for example in spec:
            band = (example == 0).all(axis=axis)  # masked bins (axis=1) or frames (axis=0)
            # Every masked entry lies in a fully masked row or column: whole bands only.
            assert (example == 0).sum() == band.sum() * example.shape[axis]
            where = np.flatnonzero(band)
            if where.size:
                assert where[-1] - where[0] + 1 == where.size  # one contiguous band
            assert where.size <= limit
            widths_seen.add((limit, where.size))
    # Widths spread over [0, limit] rather than sticking to one value.
    assert len({w for limit, w in widths_seen if limit == 7}) >= 4
    assert len({w for limit, w in widths_seen if limit == 12}) >= 4


def test_spec_augment_with_no_masks_is_the_identity():
    x = jax.random.normal(jax.random.key(0), (4, 10, 20))
    out = audio.spec_augment(jax.random.key(3), x, num_freq_masks=0, num_time_masks=0)
    np.testing.assert_array_equal(out, x)
    with pytest.raises(ValueError, match="spectrograms must be"):
        audio.spec_augment(jax.random.key(3), x[0])
    with pytest.raises(ValueError, match="time_mask_width"):
        audio.spec_augment(jax.random.key(3), x, time_mask_width=-1)


def test_random_time_shift_shifts_each_example_within_the_bound(batch):
    x = jnp.asarray(batch)
    out = np.asarray(audio.random_time_shift(jax.random.key(0), x, max_shift=400))
    np.testing.assert_array_equal(
        out, np.asarray(audio.random_time_shift(jax.random.key(0), x, max_shift=400))
    )
    assert not np.array_equal(out, audio.random_time_shift(jax.random.key(1), x, max_shift=400))
    shifts = []
    for row, original in zip(out, batch, strict=True):
        matches = [
            s
            for s in range(-400, 401)
            if np.array_equal(row, np.roll(np.pad(original, 400), s)[400:-400])
        ]
        assert matches, "each output row is its input shifted by at most max_shift, zero-filled"
        shifts.append(matches[0])
    assert len(set(shifts)) > 1
    np.testing.assert_array_equal(audio.random_time_shift(jax.random.key(0), x, max_shift=0), x)


def test_add_noise_hits_the_drawn_snr_range():
    t = np.arange(16000) / SR
    x = jnp.asarray(np.stack([np.sin(2 * np.pi * 440 * t) * a for a in (0.1, 0.5, 1.0)] * 4))
    noisy = audio.add_noise(jax.random.key(0), x, min_snr_db=10.0, max_snr_db=20.0)
    np.testing.assert_array_equal(
        noisy, audio.add_noise(jax.random.key(0), x, min_snr_db=10.0, max_snr_db=20.0)
    )
    assert not np.array_equal(
        noisy, audio.add_noise(jax.random.key(1), x, min_snr_db=10.0, max_snr_db=20.0)
    )
    noise = np.asarray(noisy - x)
    snr_db = 10 * np.log10(np.mean(np.square(x), axis=1) / np.mean(np.square(noise), axis=1))
    assert np.all(snr_db > 10.0 - 0.3) and np.all(snr_db < 20.0 + 0.3)
    assert np.ptp(snr_db) > 1.0  # drawn per example
    silent = jnp.zeros((2, 100))
    np.testing.assert_array_equal(
        audio.add_noise(jax.random.key(0), silent, min_snr_db=0.0, max_snr_db=0.0), silent
    )


class _Linear(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(40, 10, rngs=rngs)

    def __call__(self, x):
        return self.dense(x.mean(axis=-1))


def test_augmentations_in_a_train_step_follow_the_step_rng(batch):
    """The same state and batch give the same update; another seed another one."""

    def augment(key, b):
        k1, k2, k3 = jax.random.split(key, 3)
        x = audio.random_time_shift(k1, b["x"], max_shift=200)
        x = audio.add_noise(k2, x, min_snr_db=10.0, max_snr_db=30.0)
        feats = audio.log_mel_spectrogram(x, sr=SR, n_fft=256, hop_length=80, n_mels=40)
        feats = audio.spec_augment(k3, feats / 20.0 + 2.0, freq_mask_width=8, time_mask_width=10)
        return {**b, "x": feats}

    step = jdl.make_train_step(jdl.classification_loss(), augment_fn=augment)
    data = {"x": jnp.asarray(batch), "y": jnp.arange(len(batch), dtype=jnp.int32) % 10}

    def params_after(seed):
        model = _Linear(nnx.Rngs(0))
        state = jdl.TrainState.create(model, optax.sgd(0.1), seed=seed)
        new_state, _ = step(state, data)
        return jax.tree.leaves(new_state.params)

    first, again, other = params_after(0), params_after(0), params_after(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
