"""Spoken digit strings: a CTC acoustic model (convs + BiGRU) on FSDD utterances.

Command:
    python -m experiments.speech_ctc --workdir workdirs/speech_ctc

Data (`jdl.data.load_fsdd_utterances`): 2,000 train utterances (about
10,000 digits) from takes 5-49 and 300 test utterances (about 1,500 digits) from takes
0-4 of the Free Spoken Digit Dataset; each is 3-7 digits of one speaker, joined by
0.05-0.25 s of silence, with white noise at 20-40 dB SNR, padded to 5 s with its length.
The model (`jdl.models.CTCAcousticModel`) takes the raw waveforms: inside the compiled
step, `jdl.audio` makes 32-band log-mel spectrograms (25 ms windows every 20 ms),
normalised per utterance over its valid frames; two 3x3 convolutions (16 channels,
stride 2 in time and mel) give one frame per 80 ms; a bidirectional GRU (96 per
direction) and a dense layer give logits over blank + 10 digits per frame. Loss:
`optax.ctc_loss` per utterance divided by its number of digits, averaged over the
batch. Training augments on the device: white noise at 15-40 dB SNR and SpecAugment
(2 frequency masks of up to 4 bands, 2 time masks of up to 5 frames). Adam 3e-3
one-cycle, batch 32, 30 epochs. Decoding: CTC prefix beam search (beam 8) and greedy.

FINAL: `digit_error_rate` (edit distance / reference digits over the test
utterances, prefix beam search; target <= 0.05), `digit_error_rate_greedy`,
`utterance_error_rate` (share of test utterances not exactly right), `steps`, `seconds`.

Measured (seed 0, default config, 2 CPU cores shared with other jobs, load 10-14):
digit_error_rate 0.0034 (5 edits over 1,471 test digits), greedy 0.0034, 5 of 300
utterances wrong (utterance_error_rate 0.0167); 1,860 steps; 13.3 min wall at 63% of
a core, i.e. 448 s user + 63 s system CPU time (`/usr/bin/time -v`), 2.0 GB peak
memory. On an idle 2-core machine expect roughly 5-8 minutes. An earlier run whose
convolutions padded "SAME" (the second layer's windows one input frame later) gave
0.0014 (2 edits).
Last line: FINAL {"digit_error_rate": ..., "digit_error_rate_greedy": ..., "steps": ...,
"seconds": ...}
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

import jdl
from experiments.common import (
    base_config,
    check_batch_fits,
    check_config,
    check_sizes,
    check_workdir,
    config_choices,
    default_workdir,
    finite_round,
    make_config_optimizer,
    parse_experiment_command_line,
    reject_init_from,
    report_final,
)
from jdl import audio
from jdl.cli import command
from jdl.config import ConfigError
from jdl.data.fsdd import SAMPLE_RATE
from jdl.models import ctc
from jdl.models.seq2seq import error_rates

# Shared fields this experiment does not support: one device, the test split for scoring.
_FIXED = ("mesh_shape", "coordinator_address", "num_processes", "validation_fraction")


def get_config(arg: str | None = None):
    c = base_config()
    c.batch_size = 32
    c.duration = "30 epochs"
    c.optimizer = "adam"
    c.learning_rate = 3e-3
    c.schedule = "one_cycle"
    c.clip_norm = 5.0
    c.log_every = 100
    c.steps_per_dispatch = 4
    c.unroll = 0  # written out in full: convolutions inside XLA:CPU loops are slow
    # Data.
    c.data_dir = ""  # empty: $JDL_DATA_DIR/fsdd, shared/data/fsdd, ~/.cache/jdl/fsdd
    c.download = True
    c.num_train = 2000
    c.num_test = 300
    c.min_digits = 3
    c.max_digits = 7
    c.max_seconds = 5.0  # utterances are padded to this; longer draws are drawn again
    # Features (jdl.audio, on the device).
    c.n_fft = 256
    c.win_length = 200  # 25 ms
    c.hop_length = 160  # 20 ms
    c.n_mels = 32
    # Augmentation (0 / False disables each).
    c.noise = True
    c.min_snr_db = 15.0
    c.max_snr_db = 40.0
    c.num_freq_masks = 2
    c.freq_mask_width = 4
    c.num_time_masks = 2
    c.time_mask_width = 5
    # Model.
    c.conv_channels = (16, 16)
    c.hidden_size = 96
    c.num_layers = 1
    c.dropout = 0.1
    # Decoding.
    c.beam_width = 8
    c.decode_batch_size = 100
    return c


def check_extra(config) -> None:
    """The experiment's own fields; one `ConfigError` before anything loads."""
    check_sizes(
        config,
        "conv_channels",
        "n_fft",
        "hop_length",
        "n_mels",
        "hidden_size",
        "num_layers",
        "num_train",
        "num_test",
        "min_digits",
        "max_digits",
        "beam_width",
        "decode_batch_size",
    )
    defaults = get_config()
    for key in _FIXED:
        if config[key] != defaults[key]:
            raise ConfigError(
                f"config.{key}={config[key]!r} is not supported by this experiment; "
                f"leave it at {defaults[key]!r}"
            )
    rules = [
        ("win_length", 1 <= config.win_length <= config.n_fft, "must be in [1, n_fft]"),
        ("max_digits", config.min_digits <= config.max_digits, "must be >= min_digits"),
        ("max_seconds", config.max_seconds > 0, "must be > 0"),
        ("max_snr_db", config.min_snr_db <= config.max_snr_db, "must be >= min_snr_db"),
        ("dropout", 0 <= config.dropout < 1, "must be in [0, 1)"),
    ]
    for key in ("num_freq_masks", "freq_mask_width", "num_time_masks", "time_mask_width"):
        rules.append((key, config[key] >= 0, "must be >= 0"))
    for key, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"config.{key}={config[key]!r} {requirement}")


def feature_options(config) -> dict:
    return dict(
        sr=SAMPLE_RATE,
        n_fft=config.n_fft,
        win_length=config.win_length,
        hop_length=config.hop_length,
        n_mels=config.n_mels,
    )


def build_model(config) -> ctc.CTCAcousticModel:
    options = feature_options(config)
    return ctc.CTCAcousticModel(
        11,
        sample_rate=options.pop("sr"),
        **options,
        conv_channels=config.conv_channels,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        dropout=config.dropout,
        rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1),
    )


def make_augment(config):
    """The train step's `augment_fn`: waveform noise, then features and SpecAugment."""

    def augment(key, batch):
        noise_key, mask_key = jax.random.split(key)
        x = batch["x"]
        if config.noise:
            x = audio.add_noise(
                noise_key, x, min_snr_db=config.min_snr_db, max_snr_db=config.max_snr_db
            )
        feats = audio.spec_augment(
            mask_key,
            ctc.log_mel_features(x, batch["length"], **feature_options(config)),
            num_freq_masks=config.num_freq_masks,
            freq_mask_width=config.freq_mask_width,
            num_time_masks=config.num_time_masks,
            time_mask_width=config.time_mask_width,
        )
        return {**batch, "x": feats}

    return augment


def decode(model: ctc.CTCAcousticModel, split: dict, *, batch_size: int, beam_width: int):
    """(greedy, beam) digit lists for every utterance of `split`."""
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def log_probs(state, x, lengths):
        return jax.nn.log_softmax(nnx.merge(graphdef, state)(x, lengths), axis=-1)

    greedy, beam = [], []
    count = len(split["length"])
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        x = np.zeros((batch_size, split["x"].shape[1]), np.float32)
        lengths = np.full(batch_size, split["x"].shape[1], np.int32)  # padding rows: full
        x[: stop - start] = split["x"][start:stop]
        lengths[: stop - start] = split["length"][start:stop]
        scores = np.asarray(log_probs(state, x, lengths))
        frames = model.output_lengths(lengths)
        for row in range(stop - start):
            best = ctc.greedy_decode(scores[row], int(frames[row]))
            prefix, _ = ctc.prefix_beam_search(scores[row], int(frames[row]), beam_width=beam_width)
            greedy.append([c - 1 for c in best])  # class c is digit c - 1
            beam.append([c - 1 for c in prefix])
    return greedy, beam


@command
def main(argv=None):
    started = time.perf_counter()
    config, workdir = parse_experiment_command_line(argv, get_config)
    check_config(config)
    check_extra(config)
    reject_init_from(config)
    jdl.config.check_choices(config, config_choices(get_config))
    workdir = workdir or default_workdir("speech_ctc")
    check_workdir(workdir)
    if config.compilation_cache:
        jdl.enable_compilation_cache()

    data = jdl.data.load_fsdd_utterances(
        data_dir=config.data_dir or None,
        download=config.download,
        num_train=config.num_train,
        num_test=config.num_test,
        seed=config.seed,
        min_digits=config.min_digits,
        max_digits=config.max_digits,
        max_samples=round(config.max_seconds * SAMPLE_RATE),
    )
    print(data.source, flush=True)
    keys = ("x", "length", "labels", "label_length")
    train = {key: data["train"][key] for key in keys}
    test = {key: data["test"][key] for key in keys}
    model = build_model(config)
    for split in (train, test):  # before compiling: every transcript must fit its frames
        ctc.check_alignable(
            model.output_lengths(split["length"]), split["labels"], split["label_length"]
        )
    check_batch_fits(config.batch_size, len(train["length"]))
    train_data = jdl.InMemoryData(train, batch_size=config.batch_size, seed=config.seed)
    try:
        num_steps = jdl.parse_duration(
            config.duration,
            steps_per_epoch=train_data.steps_per_epoch,
            batch_size=config.batch_size,
        )
    except ConfigError as error:
        raise ConfigError(f"config.duration: {error}") from None
    tx, schedule = make_config_optimizer(config, num_steps)
    state = jdl.TrainState.create(model, tx, seed=config.seed)
    print(
        f"CTCAcousticModel: {jdl.count_params(state.params):,} parameters, "
        f"{int(model.output_lengths(train['x'].shape[1]))} output frames per utterance; "
        f"{num_steps} steps of {config.batch_size}",
        flush=True,
    )
    result = jdl.fit(
        state,
        train_step=jdl.make_train_step(
            ctc.ctc_model_loss,
            lr_schedule=schedule,
            augment_fn=make_augment(config),
            skip_nonfinite=config.skip_nonfinite,
            precision=config.precision,
            micro_batches=config.micro_batches,
        ),
        train_data=train_data,
        num_steps=num_steps,
        eval_step=jdl.make_eval_step(ctc.ctc_model_loss, precision=config.precision),
        eval_data=test,
        eval_every=config.eval_every,
        log_every=config.log_every,
        workdir=workdir,
        checkpoint_every=config.checkpoint_every,
        max_to_keep=config.max_to_keep,
        steps_per_dispatch=config.steps_per_dispatch,
        unroll=config.unroll or True,
        progress=config.progress,
        profile_steps=tuple(config.profile_steps) or None,
        run_config=config,
    )
    references = [
        row[:size].tolist() for row, size in zip(test["labels"], test["label_length"], strict=True)
    ]
    greedy, beam = decode(
        result.state.model(),
        test,
        batch_size=min(config.decode_batch_size, len(references)),
        beam_width=config.beam_width,
    )
    beam_rates = error_rates(beam, [[r] for r in references])
    greedy_rates = error_rates(greedy, [[r] for r in references])
    for predicted, reference in list(zip(beam, references, strict=True))[:5]:
        print(f"test: {''.join(map(str, reference))} -> {''.join(map(str, predicted))}")
    test_loss = result.eval_history[-1].get("loss") if result.eval_history else None
    final = {
        "digit_error_rate": round(beam_rates["phoneme_error_rate"], 4),
        "digit_error_rate_greedy": round(greedy_rates["phoneme_error_rate"], 4),
        "utterance_error_rate": round(beam_rates["word_error_rate"], 4),
        "test_loss": finite_round(test_loss),
        "train_loss": finite_round(result.train_metrics.get("loss")),
        "test_digits": int(sum(map(len, references))),
        "steps": int(result.state.step),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return report_final(final, workdir, finished=result.was_finished)


if __name__ == "__main__":
    main()
