"""Audio features and on-device audio augmentations in JAX, safe to call inside `jax.jit`.

Features follow librosa's definitions and defaults (`librosa.stft`,
`librosa.filters.mel`, `librosa.feature.melspectrogram`, `librosa.power_to_db`,
`librosa.feature.mfcc`), so a model trained on these features can be served with
librosa's and the reverse; the tests hold them to librosa within 1e-4 of each output's
scale on real recordings. Layouts match librosa's: a waveform batch is (..., samples),
a spectrogram (..., frequency bins, frames). Every leading axis is a batch axis.

The fixed matrices (window, mel filterbank, DCT) are computed once in float64 NumPy
at trace time and enter the compiled program as float32 constants; everything that
depends on the signal is jax.numpy and runs on the device inside the compiled step.
Size arguments (`n_fft`, `hop_length`, `n_mels`, ...) are static.

Augmentations have the form of `jdl.data.augment`'s: `fn(key, x, ...) -> x`, one PRNG
key for the whole batch from which each example gets its own draw, so the same key
gives the same output. Use them in a train step's `augment_fn`.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PAD_MODES = ("constant", "reflect", "edge")
WINDOWS = ("hann", "hamming", "ones")
MEL_NORMS = (None, "slaney")
DCT_NORMS = ("ortho", None)


# ------------------------------------------------------------------------------ features


def get_window(name: str, win_length: int, n_fft: int) -> np.ndarray:
    """A periodic window of `win_length` samples, zero-padded on both sides to `n_fft`.

    The same array as `librosa.util.pad_center(scipy.signal.get_window(name, win_length,
    fftbins=True), size=n_fft)`, in float64. `name`: "hann", "hamming" or "ones"
    (rectangular).
    """
    if name not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {name!r}")
    if not 1 <= win_length <= n_fft:
        raise ValueError(f"win_length must be in [1, n_fft={n_fft}], got {win_length}")
    phase = 2 * np.pi * np.arange(win_length) / win_length
    if name == "hann":
        values = 0.5 - 0.5 * np.cos(phase)
    elif name == "hamming":
        values = 0.54 - 0.46 * np.cos(phase)
    else:
        values = np.ones(win_length)
    left = (n_fft - win_length) // 2
    return np.pad(values, (left, n_fft - win_length - left))


def num_frames(num_samples: int, *, n_fft: int, hop_length: int, center: bool = True) -> int:
    """How many frames `stft` gives for `num_samples` samples."""
    padded = num_samples + 2 * (n_fft // 2) if center else num_samples
    return 1 + (padded - n_fft) // hop_length


@functools.partial(
    jax.jit, static_argnames=("n_fft", "hop_length", "win_length", "window", "center", "pad_mode")
)
def stft(
    waveforms: Array,
    *,
    n_fft: int = 2048,
    hop_length: int | None = None,
    win_length: int | None = None,
    window: str = "hann",
    center: bool = True,
    pad_mode: str = "constant",
) -> Array:
    """Short-time Fourier transform, as `librosa.stft` with the same options.

    Args:
      waveforms: float (..., samples).
      n_fft: FFT size; the frequency bins are 0, sr/n_fft, ..., sr/2.
      hop_length: samples between frames; None means win_length // 4.
      win_length: window length (<= n_fft, centred in the frame); None means n_fft.
      window: "hann" (periodic, librosa's default), "hamming" or "ones".
      center: pad n_fft // 2 samples on both sides so frame t is centred on sample
        t * hop_length (librosa's default); else frame t starts there.
      pad_mode: with `center`: "constant" (zeros, librosa's default since 0.10),
        "reflect" or "edge".

    Returns:
      complex64 (..., 1 + n_fft // 2, frames), frames = `num_frames(samples, ...)`.

    Raises:
      ValueError: bad sizes or names, or fewer samples than one frame needs.
    """
    win_length = n_fft if win_length is None else win_length
    hop_length = win_length // 4 if hop_length is None else hop_length
    _check_positive(n_fft=n_fft, hop_length=hop_length, win_length=win_length)
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    x = jnp.asarray(waveforms, jnp.float32)
    if center:
        if pad_mode == "reflect" and x.shape[-1] <= n_fft // 2:
            raise ValueError(
                f"pad_mode='reflect' needs more than n_fft // 2 = {n_fft // 2} samples, "
                f"got {x.shape[-1]}; use pad_mode='constant' or a smaller n_fft"
            )
        pad = [(0, 0)] * (x.ndim - 1) + [(n_fft // 2, n_fft // 2)]
        x = jnp.pad(x, pad, mode=pad_mode)
    frames = num_frames(x.shape[-1], n_fft=n_fft, hop_length=hop_length, center=False)
    if frames < 1:
        raise ValueError(
            f"stft needs at least n_fft={n_fft} samples (after centring), got {x.shape[-1]}"
        )
    # (frames, n_fft) sample indices: a gather, cheap next to the FFT on any device.
    index = np.arange(frames)[:, None] * hop_length + np.arange(n_fft)[None, :]
    windowed = x[..., index] * jnp.asarray(get_window(window, win_length, n_fft), jnp.float32)
    spectrum = jnp.fft.rfft(windowed, axis=-1)  # (..., frames, bins)
    return jnp.swapaxes(spectrum, -1, -2)


def hz_to_mel(frequencies, *, htk: bool = False) -> np.ndarray:
    """Hz to mels, as `librosa.hz_to_mel`: HTK's formula or Slaney's (linear below 1 kHz)."""
    f = np.asarray(frequencies, np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    log_part = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log_part, f / f_sp)


def mel_to_hz(mels, *, htk: bool = False) -> np.ndarray:
    """Mels to Hz, the inverse of `hz_to_mel`."""
    m = np.asarray(mels, np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    log_part = min_log_hz * np.exp(logstep * (np.maximum(m, min_log_mel) - min_log_mel))
    return np.where(m >= min_log_mel, log_part, f_sp * m)


def mel_filterbank(
    *,
    sr: float,
    n_fft: int,
    n_mels: int = 128,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
    norm: str | None = "slaney",
) -> np.ndarray:
    """Triangular mel filters, the same matrix as `librosa.filters.mel` (in float64).

    Args:
      sr: sampling rate in Hz.
      n_fft: FFT size of the spectrogram the filters apply to.
      n_mels: number of filters.
      fmin: lowest frequency in Hz.
      fmax: highest frequency in Hz; None means sr / 2.
      htk: HTK's mel scale instead of Slaney's.
      norm: "slaney" divides each filter by its width in Hz (constant energy per
        filter, librosa's default); None leaves peaks at 1.

    Returns:
      float64 (n_mels, 1 + n_fft // 2).
    """
    _check_positive(sr=sr, n_fft=n_fft, n_mels=n_mels)
    if norm not in MEL_NORMS:
        raise ValueError(f"norm must be one of {MEL_NORMS}, got {norm!r}")
    fmax = sr / 2.0 if fmax is None else float(fmax)
    if not 0 <= fmin < fmax:
        raise ValueError(f"need 0 <= fmin < fmax, got fmin={fmin}, fmax={fmax}")
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    mels = np.linspace(hz_to_mel(fmin, htk=htk), hz_to_mel(fmax, htk=htk), n_mels + 2)
    mel_f = mel_to_hz(mels, htk=htk)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights


@functools.partial(
    jax.jit,
    static_argnames=(
        "sr",
        "n_fft",
        "hop_length",
        "win_length",
        "window",
        "center",
        "pad_mode",
        "power",
        "n_mels",
        "fmin",
        "fmax",
        "htk",
        "norm",
    ),
)
def melspectrogram(
    waveforms: Array,
    *,
    sr: float,
    n_fft: int = 2048,
    hop_length: int = 512,
    win_length: int | None = None,
    window: str = "hann",
    center: bool = True,
    pad_mode: str = "constant",
    power: float = 2.0,
    n_mels: int = 128,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
    norm: str | None = "slaney",
) -> Array:
    """Mel spectrogram, as `librosa.feature.melspectrogram(y=...)` with the same options.

    `mel_filterbank(...) @ |stft(...)| ** power`; see `stft` and `mel_filterbank` for the
    arguments (librosa's defaults). Returns float32 (..., n_mels, frames).
    """
    spectrum = stft(
        waveforms,
        n_fft=n_fft,
        hop_length=hop_length,
        win_length=win_length,
        window=window,
        center=center,
        pad_mode=pad_mode,
    )
    magnitude = jnp.abs(spectrum)
    spec = magnitude**2 if power == 2.0 else magnitude**power
    basis = mel_filterbank(
        sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk, norm=norm
    )
    return jnp.einsum("mf,...ft->...mt", jnp.asarray(basis, jnp.float32), spec)


def power_to_db(
    spectrograms: Array,
    *,
    ref: float | Callable[[Array], Array] = 1.0,
    amin: float = 1e-10,
    top_db: float | None = 80.0,
) -> Array:
    """Power to decibels, as `librosa.power_to_db` applied to each spectrogram separately.

    `10 log10(max(amin, S)) - 10 log10(max(amin, ref))`, then floored at `top_db` below
    each spectrogram's own maximum. librosa takes that maximum (and a callable `ref`)
    over its whole input; here both are per spectrogram (the last two axes), so an
    example's features do not depend on the rest of its batch.

    Args:
      spectrograms: float (..., bins, frames), non-negative.
      ref: the power that maps to 0 dB, or a function of one spectrogram (e.g. `jnp.max`)
        returning it.
      amin: floor on the power (and ref) before the logarithm; > 0.
      top_db: dynamic range kept in dB; None keeps everything.

    Returns:
      float32 (..., bins, frames).
    """
    if amin <= 0:
        raise ValueError(f"amin must be > 0, got {amin}")
    if top_db is not None and top_db < 0:
        raise ValueError(f"top_db must be >= 0 or None, got {top_db}")
    s = jnp.asarray(spectrograms, jnp.float32)
    if callable(ref):
        flat = s.reshape(*s.shape[:-2], -1)
        ref_value = jax.vmap(ref)(flat.reshape(-1, flat.shape[-1])).reshape(s.shape[:-2])
        ref_value = ref_value[..., None, None]
    else:
        ref_value = jnp.float32(abs(ref))
    log_spec = 10.0 * jnp.log10(jnp.maximum(amin, s))
    log_spec = log_spec - 10.0 * jnp.log10(jnp.maximum(amin, ref_value))
    if top_db is not None:
        peak = jnp.max(log_spec, axis=(-2, -1), keepdims=True)
        log_spec = jnp.maximum(log_spec, peak - top_db)
    return log_spec


def log_mel_spectrogram(
    waveforms: Array,
    *,
    sr: float,
    ref: float | Callable[[Array], Array] = 1.0,
    amin: float = 1e-10,
    top_db: float | None = 80.0,
    **mel_options,
) -> Array:
    """Log-mel spectrogram in dB: float32 (..., n_mels, frames).

    `power_to_db(melspectrogram(waveforms, sr=sr, **mel_options), ref=..., amin=...,
    top_db=...)`, as librosa's `power_to_db(melspectrogram(y=...))` per spectrogram.
    """
    mel = melspectrogram(waveforms, sr=sr, **mel_options)
    return power_to_db(mel, ref=ref, amin=amin, top_db=top_db)


def dct_matrix(n_in: int, n_out: int, *, norm: str | None = "ortho") -> np.ndarray:
    """The DCT-II as an (n_out, n_in) float64 matrix.

    `scipy.fft.dct(x, type=2, norm=norm)[:n_out]` is `dct_matrix(len(x), n_out, norm=norm)
    @ x`; `norm` is "ortho" (orthonormal rows) or None (scipy's unscaled 2 * sum).
    """
    _check_positive(n_in=n_in, n_out=n_out)
    if norm not in DCT_NORMS:
        raise ValueError(f"norm must be one of {DCT_NORMS}, got {norm!r}")
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    basis = 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * n_in))
    if norm == "ortho":
        basis *= np.sqrt(1.0 / (2.0 * n_in))
        basis[0] /= np.sqrt(2.0)
    return basis


def mfcc(
    waveforms: Array,
    *,
    sr: float,
    n_mfcc: int = 20,
    norm: str | None = "ortho",
    lifter: float = 0.0,
    mel_norm: str | None = "slaney",
    top_db: float | None = 80.0,
    **mel_options,
) -> Array:
    """Mel-frequency cepstral coefficients, as `librosa.feature.mfcc(y=...)`.

    The DCT-II (librosa's `dct_type=2`; `norm` "ortho" or None as there) over the mel
    axis of `log_mel_spectrogram` (ref 1.0, `top_db` per spectrogram: see
    `power_to_db`), keeping the first `n_mfcc` coefficients, then librosa's sinusoidal
    liftering when `lifter` > 0. `mel_norm` is the filterbank's `norm` (as librosa
    names it here); the other `mel_options` are `melspectrogram`'s (n_mels defaults
    to 128 there).

    Returns:
      float32 (..., n_mfcc, frames).
    """
    if lifter < 0:
        raise ValueError(f"lifter must be >= 0, got {lifter}")
    log_mel = log_mel_spectrogram(waveforms, sr=sr, top_db=top_db, norm=mel_norm, **mel_options)
    n_mels = log_mel.shape[-2]
    if not 1 <= n_mfcc <= n_mels:
        raise ValueError(f"n_mfcc must be in [1, n_mels={n_mels}], got {n_mfcc}")
    basis = dct_matrix(n_mels, n_mfcc, norm=norm)
    if lifter > 0:
        basis = (
            basis * (1 + (lifter / 2) * np.sin(np.pi * np.arange(1, 1 + n_mfcc) / lifter))[:, None]
        )
    return jnp.einsum("km,...mt->...kt", jnp.asarray(basis, jnp.float32), log_mel)


# -------------------------------------------------------------------------- augmentations


@functools.partial(
    jax.jit,
    static_argnames=("num_freq_masks", "freq_mask_width", "num_time_masks", "time_mask_width"),
)
def spec_augment(
    key: Array,
    spectrograms: Array,
    *,
    num_freq_masks: int = 2,
    freq_mask_width: int = 8,
    num_time_masks: int = 2,
    time_mask_width: int = 10,
    mask_value: float = 0.0,
) -> Array:
    """SpecAugment's frequency and time masking (Park et al., 2019), per example.

    Each example gets `num_freq_masks` bands of consecutive frequency bins and
    `num_time_masks` bands of consecutive frames set to `mask_value`; each band's width
    is uniform in [0, width] and its start uniform over the positions where it fits.
    Bands may overlap. Use `mask_value=0` on features normalised to zero mean.

    Args:
      key: PRNG key; the draws for the whole batch come from it.
      spectrograms: float (N, bins, frames).
      num_freq_masks: static count of frequency masks >= 0.
      freq_mask_width: static maximum width of each, >= 0 (clipped to the axis).
      num_time_masks: static count of time masks >= 0.
      time_mask_width: static maximum width of each, >= 0 (clipped to the axis).
      mask_value: what masked entries become.

    Returns:
      (N, bins, frames), same dtype.
    """
    _check_batched(spectrograms, 3, "spectrograms must be (N, bins, frames)")
    _check_non_negative(
        num_freq_masks=num_freq_masks,
        freq_mask_width=freq_mask_width,
        num_time_masks=num_time_masks,
        time_mask_width=time_mask_width,
    )
    n, bins, frames = spectrograms.shape
    freq_key, time_key = jax.random.split(key)
    freq = _band_masks(freq_key, n, bins, num_freq_masks, min(freq_mask_width, bins))
    time = _band_masks(time_key, n, frames, num_time_masks, min(time_mask_width, frames))
    masked = freq[:, :, None] | time[:, None, :]
    return jnp.where(masked, jnp.asarray(mask_value, spectrograms.dtype), spectrograms)


@functools.partial(jax.jit, static_argnames=("max_shift",))
def random_time_shift(key: Array, waveforms: Array, *, max_shift: int) -> Array:
    """Shifts each waveform by its own whole number of samples in [-max_shift, max_shift].

    Positive shifts delay the signal (output sample t is input sample t - shift); the
    samples shifted in are zeros and those shifted past either end are dropped.

    Args:
      key: PRNG key; the draws for the whole batch come from it.
      waveforms: float (N, samples).
      max_shift: static int >= 0; 0 returns `waveforms` unchanged.

    Returns:
      (N, samples), same dtype.
    """
    _check_batched(waveforms, 2, "waveforms must be (N, samples)")
    _check_non_negative(max_shift=max_shift)
    if max_shift == 0:
        return waveforms
    n, samples = waveforms.shape
    bound = min(max_shift, samples)
    shifts = _uniform_ints(key, (n,), -max_shift, max_shift)
    shifts = jnp.clip(shifts, -bound, bound)  # a shift of the whole clip already blanks it
    padded = jnp.pad(waveforms, ((0, 0), (bound, bound)))

    def one(row: Array, start: Array) -> Array:
        return jax.lax.dynamic_slice(row, (start,), (samples,))

    return jax.vmap(one)(padded, bound - shifts)


@jax.jit
def add_noise(key: Array, waveforms: Array, *, min_snr_db: float, max_snr_db: float) -> Array:
    """Adds white Gaussian noise at a signal-to-noise ratio drawn per example.

    Each example's SNR is uniform in [min_snr_db, max_snr_db] dB, measured against
    that example's mean power over the whole clip (a silent clip stays silent).

    Args:
      key: PRNG key; the draws for the whole batch come from it.
      waveforms: float (N, samples).
      min_snr_db: the lowest SNR in dB.
      max_snr_db: the highest SNR in dB, >= min_snr_db.

    Returns:
      (N, samples), same dtype.
    """
    _check_batched(waveforms, 2, "waveforms must be (N, samples)")
    snr_key, noise_key = jax.random.split(key)
    n = waveforms.shape[0]
    snr_db = jax.random.uniform(snr_key, (n, 1), minval=min_snr_db, maxval=max_snr_db)
    signal_power = jnp.mean(jnp.square(waveforms.astype(jnp.float32)), axis=-1, keepdims=True)
    noise_std = jnp.sqrt(signal_power / 10.0 ** (snr_db / 10.0))
    noise = jax.random.normal(noise_key, waveforms.shape, jnp.float32) * noise_std
    return (waveforms + noise).astype(waveforms.dtype)


def _band_masks(key: Array, n: int, size: int, count: int, max_width: int) -> Array:
    """bool (n, size): the union of `count` random bands of width <= max_width per row."""
    mask = jnp.zeros((n, size), bool)
    if count == 0 or max_width == 0:
        return mask
    width_key, start_key = jax.random.split(key)
    widths = _uniform_ints(width_key, (n, count), 0, max_width)
    # The start is uniform over [0, size - width]: a uniform fraction of that range.
    fraction = jax.random.uniform(start_key, (n, count))
    starts = jnp.floor(fraction * (size - widths + 1)).astype(jnp.int32)
    starts = jnp.minimum(starts, size - widths)
    positions = jnp.arange(size)[None, None, :]
    bands = (positions >= starts[..., None]) & (positions < (starts + widths)[..., None])
    return mask | jnp.any(bands, axis=1)


def _uniform_ints(key: Array, shape: tuple[int, ...], low: int, high: int) -> Array:
    """int32 draws uniform on [low, high] (inclusive); modulo bias below span / 2**32."""
    span = high - low + 1
    return (jax.random.bits(key, shape, jnp.uint32) % jnp.uint32(span)).astype(jnp.int32) + low


def _check_batched(x: Array, ndim: int, message: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{message}, got shape {x.shape}")


def _check_positive(**sizes) -> None:
    for name, value in sizes.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_non_negative(**sizes) -> None:
    for name, value in sizes.items():
        try:
            valid = operator.index(value) >= 0
        except TypeError:
            valid = False
        if not valid:
            raise ValueError(f"{name} must be a static int >= 0, got {value!r}")
