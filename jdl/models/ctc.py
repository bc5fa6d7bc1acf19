"""CTC acoustic models: waveforms in, per-frame log-probabilities over blank + symbols out.

`CTCAcousticModel` computes log-mel features with `jdl.audio` inside whatever program
calls it, normalises them per utterance over its valid frames, runs 2-D convolutions
over (time, mel) with stride 2 in both, a bidirectional GRU (`jdl.models.RNN`) and a
dense layer to `num_classes` logits per output frame. Class 0 is the CTC blank; class
k >= 1 is symbol k - 1 (for digits: class d + 1 is digit d).

`ctc_loss` wraps `optax.ctc_loss` with lengths instead of paddings. The decoders work
on host arrays of log-probabilities: `greedy_decode` (best path: argmax per frame,
collapse repeats, drop blanks) and `prefix_beam_search` (the standard CTC prefix beam
search, which sums over alignments and tracks, for every prefix, the probability of
ending in blank and in non-blank, in log space).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdl import audio
from jdl.errors import UserError
from jdl.models.rnn import RNN
from jdl.models.sizes import check_sizes

BLANK = 0


class CTCInputError(UserError, ValueError):
    """Labels or lengths that CTC cannot use (e.g. more labels than output frames allow)."""


def min_frames(labels: Sequence[int]) -> int:
    """Frames a CTC alignment of `labels` needs: one per label, plus a blank between repeats."""
    labels = list(labels)
    return len(labels) + sum(a == b for a, b in zip(labels, labels[1:], strict=False))


def check_alignable(
    output_lengths: np.ndarray, labels: np.ndarray, label_lengths: np.ndarray
) -> None:
    """Raises `CTCInputError` unless every sequence's labels fit in its output frames.

    Args:
      output_lengths: int (N,) valid output frames per sequence (model.output_lengths).
      labels: int (N, L) padded label sequences; label_lengths: int (N,) their lengths.
    """
    for n, (frames, row, size) in enumerate(
        zip(np.asarray(output_lengths), np.asarray(labels), np.asarray(label_lengths), strict=True)
    ):
        need = min_frames(row[: int(size)].tolist())
        if need > int(frames):
            raise CTCInputError(
                f"sequence {n} has {int(size)} labels, which need at least {need} output "
                f"frames, but the model gives {int(frames)}; use less time reduction "
                "(fewer strided layers, a smaller hop) or shorter label sequences"
            )


def ctc_loss(
    logits: jax.Array,
    logit_lengths: jax.Array,
    labels: jax.Array,
    label_lengths: jax.Array,
) -> jax.Array:
    """Per-sequence CTC negative log-likelihood, `optax.ctc_loss` with blank = class 0.

    Args:
      logits: float (B, T, C), unnormalised.
      logit_lengths: int (B,) valid frames; frames from there on are padding.
      labels: int (B, L) class ids in [1, C) (padding positions may hold anything).
      label_lengths: int (B,) valid labels, >= 1.

    Returns:
      float32 (B,): -log p(labels | logits), summed over all alignments.
    """
    t, length = logits.shape[1], labels.shape[1]
    logit_paddings = (jnp.arange(t)[None, :] >= logit_lengths[:, None]).astype(jnp.float32)
    label_paddings = (jnp.arange(length)[None, :] >= label_lengths[:, None]).astype(jnp.float32)
    labels = jnp.where(label_paddings > 0, 0, labels)
    return optax.ctc_loss(
        logits.astype(jnp.float32), logit_paddings, labels, label_paddings, blank_id=BLANK
    )


def greedy_decode(log_probs: np.ndarray, length: int | None = None) -> list[int]:
    """Best-path decoding of one sequence: argmax per frame, collapse repeats, drop blanks.

    Args:
      log_probs: (T, C) scores per frame (logits or log-probabilities: only the argmax counts).
      length: valid frames (default all T).

    Returns:
      The class ids (>= 1) of the decoded sequence.
    """
    best = np.argmax(np.asarray(log_probs)[: length if length is not None else None], axis=-1)
    out, previous = [], BLANK
    for c in best.tolist():
        if c != previous and c != BLANK:
            out.append(c)
        previous = c
    return out


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = (a, b) if a > b else (b, a)
    return high + math.log1p(math.exp(low - high))


def prefix_beam_search(
    log_probs: np.ndarray, length: int | None = None, *, beam_width: int = 8
) -> tuple[list[int], float]:
    """CTC prefix beam search over one sequence.

    Every kept prefix carries log p_b (its alignments so far end in blank) and log p_nb
    (they end in its last symbol). At each frame a prefix is extended by blank (stays,
    into p_b), by its own last symbol (stays, from p_nb; or grows, from p_b only, since
    a repeat needs a blank between), or by another symbol (grows, from both). Then the
    `beam_width` prefixes with the largest p_b + p_nb are kept. With a beam as wide as
    the number of prefixes this is exact: the most probable label sequence.

    Args:
      log_probs: (T, C) per-frame log-probabilities (log-softmax over C, blank = 0).
      length: valid frames (default all T).
      beam_width: prefixes kept per frame, >= 1.

    Returns:
      (the best prefix's class ids, its log-probability summed over alignments).
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    scores = np.asarray(log_probs, np.float64)[: length if length is not None else None]
    num_classes = scores.shape[-1]
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -math.inf)}
    for frame in scores.tolist():
        blank = frame[BLANK]
        grown: dict[tuple[int, ...], list[float]] = {}

        def add(prefix, blank_part, symbol_part, grown=grown):
            entry = grown.setdefault(prefix, [-math.inf, -math.inf])
            entry[0] = _logaddexp(entry[0], blank_part)
            entry[1] = _logaddexp(entry[1], symbol_part)

        for prefix, (p_b, p_nb) in beams.items():
            total = _logaddexp(p_b, p_nb)
            add(prefix, total + blank, -math.inf)
            last = prefix[-1] if prefix else None
            for c in range(num_classes):
                if c == BLANK:
                    continue
                p = frame[c]
                if c == last:
                    add(prefix, -math.inf, p_nb + p)  # the repeat collapses into the prefix
                    add(prefix + (c,), -math.inf, p_b + p)  # a blank separated the two
                else:
                    add(prefix + (c,), -math.inf, total + p)
        ranked = sorted(grown.items(), key=lambda kv: -_logaddexp(*kv[1]))
        beams = {prefix: (pb, pnb) for prefix, (pb, pnb) in ranked[:beam_width]}
    prefix, (p_b, p_nb) = max(beams.items(), key=lambda kv: _logaddexp(*kv[1]))
    return list(prefix), _logaddexp(p_b, p_nb)


def log_mel_features(
    waveforms: jax.Array,
    lengths: jax.Array,
    *,
    sr: int,
    n_fft: int,
    win_length: int,
    hop_length: int,
    n_mels: int,
) -> jax.Array:
    """(B, samples) waveforms with `lengths` valid samples -> (B, n_mels, frames) log-mel.

    Each utterance is normalised to zero mean and unit variance over its own valid
    frames (1 + length // hop_length), so loudness and padding do not matter; frames
    past the end are set to 0.
    """
    log_mel = audio.log_mel_spectrogram(
        waveforms, sr=sr, n_fft=n_fft, win_length=win_length, hop_length=hop_length, n_mels=n_mels
    )
    frames = 1 + jnp.asarray(lengths) // hop_length
    valid = (jnp.arange(log_mel.shape[-1])[None, :] < frames[:, None])[:, None, :]
    count = jnp.sum(valid, axis=(-2, -1), keepdims=True) * log_mel.shape[-2]
    mean = jnp.sum(jnp.where(valid, log_mel, 0.0), axis=(-2, -1), keepdims=True) / count
    centred = jnp.where(valid, log_mel - mean, 0.0)
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=(-2, -1), keepdims=True) / count)
    return centred / (std + 1e-5)


class CTCAcousticModel(nnx.Module):
    """Waveforms -> per-frame CTC logits: log-mel, strided 2-D convs, BiGRU, dense.

    Args:
      num_classes: C, blank included (11 for digits).
      sample_rate: Hz of the waveforms.
      n_fft: FFT size of the log-mel front end (`jdl.audio.log_mel_spectrogram`).
      win_length: analysis window in samples.
      hop_length: samples between frames (centred frames: 1 + samples // hop_length).
      n_mels: mel bands.
      conv_channels: one 3x3 convolution (ReLU) per entry, each with stride 2 over time
        and mel, so output frames are the feature frames halved (rounding up) per entry.
      hidden_size: GRU units per direction.
      num_layers: stacked bidirectional GRU layers.
      dropout: on the GRU's input and output (and between its layers), 0 disables.
      rngs: NNX random streams (`params`, `dropout` when dropout > 0).

    Call: `x` float (B, samples) waveforms or (B, n_mels, frames) features from
    `features`, `lengths` int (B,) valid samples -> logits (B, T', C), with T' =
    `output_lengths(samples)` for the padded length and padded frames masked in the GRU.
    """

    def __init__(
        self,
        num_classes: int = 11,
        *,
        sample_rate: int = 8000,
        n_fft: int = 256,
        win_length: int = 200,
        hop_length: int = 160,
        n_mels: int = 32,
        conv_channels: Sequence[int] = (16, 16),
        hidden_size: int = 96,
        num_layers: int = 1,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            "CTCAcousticModel",
            num_classes=num_classes,
            n_fft=n_fft,
            hop_length=hop_length,
            n_mels=n_mels,
            hidden_size=hidden_size,
            num_layers=num_layers,
            conv_channels=tuple(conv_channels),
        )
        self.feature_options = (
            ("sr", sample_rate),
            ("n_fft", n_fft),
            ("win_length", win_length),
            ("hop_length", hop_length),
            ("n_mels", n_mels),
        )
        self.hop_length, self.num_strided = hop_length, len(conv_channels)
        convs, channels, mels = [], 1, n_mels
        for width in conv_channels:
            # Explicit padding, not "SAME": SAME pads by the parity of the padded length, which
            # would shift every frame's window with the amount of padding after the utterance.
            convs.append(
                nnx.Conv(
                    channels, width, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=rngs
                )
            )
            channels, mels = width, -(-mels // 2)
        self.convs = nnx.List(convs)
        self.rnn = RNN(
            "gru",
            channels * mels,
            hidden_size,
            num_layers=num_layers,
            bidirectional=True,
            dropout=dropout,
            rngs=rngs,
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.head = nnx.Linear(2 * hidden_size, num_classes, rngs=rngs)

    def frame_lengths(self, lengths):
        """Valid feature frames of waveforms with `lengths` samples (centred STFT)."""
        return 1 + lengths // self.hop_length

    def output_lengths(self, lengths):
        """Valid output frames for `lengths` samples (int or array, NumPy or JAX)."""
        frames = self.frame_lengths(lengths)
        for _ in range(self.num_strided):
            frames = (frames + 1) // 2  # kernel 3, padding 1, stride 2: ceil(frames / 2)
        return frames

    def features(self, waveforms: jax.Array, lengths: jax.Array) -> jax.Array:
        """`log_mel_features` with this model's front end."""
        return log_mel_features(waveforms, lengths, **dict(self.feature_options))

    def __call__(
        self, x: jax.Array, lengths: jax.Array, *, deterministic: bool | None = None
    ) -> jax.Array:
        lengths = jnp.asarray(lengths)
        if x.ndim == 2:
            x = self.features(x, lengths)
        h = jnp.swapaxes(x, 1, 2)[..., None]  # (B, frames, n_mels, 1)
        for conv in self.convs:
            h = jax.nn.relu(conv(h))
        h = h.reshape(*h.shape[:2], -1)  # (B, T', mels' * channels)
        if self.dropout is not None:
            h = self.dropout(h, deterministic=deterministic)
        h, _ = self.rnn(h, lengths=self.output_lengths(lengths), deterministic=deterministic)
        if self.dropout is not None:
            h = self.dropout(h, deterministic=deterministic)
        return self.head(h)


def ctc_model_loss(model: nnx.Module, batch) -> dict[str, jax.Array]:
    """The loss function (`jdl.make_train_step`) for a `CTCAcousticModel` on digit strings.

    Reads batch["x"] (waveforms or features), "length" (samples), "labels" (digits 0-9,
    padded) and "label_length". "loss" is the CTC negative log-likelihood divided by
    the utterance's label length (so long and short utterances weigh alike per digit;
    the train step then averages over utterances); "nll" is the undivided value.
    """
    logits = model(batch["x"], batch["length"])
    nll = ctc_loss(
        logits,
        model.output_lengths(batch["length"]),
        batch["labels"] + 1,  # digit d is class d + 1: class 0 is the blank
        batch["label_length"],
    )
    return {"loss": nll / batch["label_length"], "nll": nll}


__all__ = [
    "BLANK",
    "CTCAcousticModel",
    "CTCInputError",
    "check_alignable",
    "ctc_loss",
    "ctc_model_loss",
    "greedy_decode",
    "log_mel_features",
    "min_frames",
    "prefix_beam_search",
]
