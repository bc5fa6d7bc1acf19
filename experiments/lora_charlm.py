"""LoRA against full and head-only fine-tuning: a character GPT moves from Python to Shakespeare.

Command:
    python -m experiments.lora_charlm --workdir workdirs/lora_charlm

Pretraining: the character GPT of `experiments.charlm_transformer` (learned positions,
pre-LN blocks of width 128, 4 heads, context 64; here with an untied output head so that
"head only" is a layer of its own) on the Python standard library's source (the first
`pretrain_max_chars` characters, offline; 90% train, 10% validation).
Fine-tuning: on `text_path` (default tinyshakespeare.txt from the shared data folder;
90/10 split), three ways from the same pretrained weights, each for `finetune_duration`:
  full  every parameter (AdamW, `finetune_learning_rate`);
  lora  rank-`lora_rank` adapters on every dense layer of the blocks (`lora_targets`:
        attention qkv and out, both MLP layers), base weights frozen, the output layer and
        every LayerNorm trained in full with them (`lora_also_train`; counted in the
        share) (`jdl.techniques.lora`, `lora_learning_rate`);
  head  the output layer only (`head_learning_rate`).
The vocabulary is the characters of both texts. Every phase uses cosine decay after a
short warm-up, global-norm clipping 1.0, and no gradient-norm metrics (so XLA drops the
gradients of frozen weights from the compiled step).

Reported per fine-tuning mode: validation loss on the Shakespeare split (nats/char), the
share of parameters that train, and the memory of one compiled training step from XLA's
own memory analysis (arguments + outputs - donated + temporaries, in MB; the
`memory_source` key says so; on CPU the backend keeps no allocator statistics, and the
process's peak RSS, also reported, covers all phases at once). `lora_gap` is LoRA's
validation loss minus full fine-tuning's.

Target: `lora_gap` <= 0.05 nats/char with <= 5% of the parameters trainable: NOT met.
Measured with these defaults (826k parameters, vocabulary 96; jax 0.10.2, 2 shared Intel
Xeon cores at load average 11-19), each fine-tuning run from the same pretrained weights:
pretraining val 1.643 on Python; on Shakespeare zero-shot 2.959, full fine-tuning 1.779,
LoRA 1.910 with 4.74% of the parameters trainable (rank 3 on all 16 block layers 24.6k,
head 12.3k, LayerNorms 2.3k; gap 0.131), head only 2.196 (1.5%). Learning-rate sweep,
val nats/char after 300 steps (candidates 1e-3, 3e-3, 1e-2, 3e-2; the cells not run were
not reached in the time available): full 1e-3 1.826, 3e-3 1.779; LoRA 1e-2 1.927,
3e-2 1.910; head 1e-2 2.211 (an earlier run, same pretraining figures), 3e-2 2.196. The
best rate of LoRA and of full fine-tuning is the largest each tried, so both may gain
from the untried neighbours. LoRA alpha 6 (scale 2). The earlier LoRA, on attention and
head only (rank 8, alpha 16, 3.2%, lr 1e-2), reached 1.991.
Time (`/usr/bin/time -v`, each phase in its own process on the shared machine):
pretraining + full 13.2 min CPU (58 min wall), full alone 4.3 min CPU, LoRA 6.0 min CPU
(31 min wall), head 1.6 min CPU: about 19 min of CPU for the default run under this load,
above the 15 min aimed for (the earlier whole run took 13.7 min of CPU at a lighter load).
Compiled-step memory: full 282 MB, LoRA 291 MB, head 54 MB (activations dominate at this
size: the weights and Adam's moments of the full model are 10 MB); peak RSS 1.1 GB.
Last line: FINAL {"full_val_loss": ..., "lora_val_loss": ..., "lora_gap": ..., ...}.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jdl
from experiments import charlm_transformer
from experiments.charlm_common import check_lm_config, lm_loss, load_corpus
from experiments.common import (
    check_workdir,
    config_choices,
    default_workdir,
    finite_round,
    make_config_optimizer,
    parse_experiment_command_line,
    report_final,
    workdir_lock,
)
from jdl.cli import command
from jdl.config import ConfigError
from jdl.data import text as text_data
from jdl.models.transformer import generate_text
from jdl.techniques import lora, transfer

MODES = ("full", "lora", "head")
# Shared fields this experiment cannot honour: refused when changed.
UNSUPPORTED = (
    "init_from",
    "mesh_shape",
    "sharding_rules",
    "coordinator_address",
    "num_processes",
    "early_stopping_patience",
)
CONFIG_CHOICES = charlm_transformer.CONFIG_CHOICES
# The repository's sibling `shared/data/` holds tinyshakespeare.txt.
SHAKESPEARE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tinyshakespeare.txt"
)


def get_config(arg: str | None = None):
    c = charlm_transformer.get_config()
    c.text_path = os.path.normpath(SHAKESPEARE)  # the fine-tuning text
    c.max_chars = 0  # all of it
    c.pretrain_max_chars = 2_000_000  # of the standard library's source
    c.batch_size = 64
    c.duration = "900 steps"  # pretraining
    c.learning_rate = 3e-3  # pretraining
    c.finetune_duration = "300 steps"
    # Each arm's best of {1e-3, 3e-3, 1e-2, 3e-2} (the sweep is in the module docstring).
    c.finetune_learning_rate = 3e-3
    c.lora_learning_rate = 3e-2
    c.head_learning_rate = 3e-2
    c.lora_rank = 3
    c.lora_alpha = 6.0
    c.lora_targets = "attn/qkv,attn/out,mlp/fc1,mlp/fc2"  # module path suffixes, comma-separated
    # Trained in full next to the adapters (fnmatch patterns over parameter paths, comma-
    # separated): the output layer and every LayerNorm; counted in the trainable share.
    c.lora_also_train = "head,*ln1,*ln2,ln_f"
    c.warmup_steps = 30
    c.eval_every = 0  # at the end of each phase
    c.log_every = 100
    c.modes = ",".join(MODES)
    c.sample_prompt = "ROMEO:\n"
    c.sample_chars = 200
    c.sample_top_p = 0.9
    return c


def check_extra(config) -> None:
    """The LoRA and phase fields; one clear `ConfigError`."""
    charlm_transformer.check_extra(config)
    modes = _modes(config)
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ConfigError(f"config.modes={config.modes!r}: each must be one of {list(MODES)}")
    rules = [
        ("lora_rank", config.lora_rank >= 1, "must be >= 1"),
        ("lora_alpha", config.lora_alpha > 0, "must be > 0"),
        ("lora_targets", bool(_targets(config)), "must name at least one layer"),
        ("pretrain_max_chars", config.pretrain_max_chars >= 0, "must be >= 0 (0: all)"),
        ("sample_top_p", 0 < config.sample_top_p <= 1, "must be in (0, 1]"),
    ]
    for key in ("finetune_learning_rate", "lora_learning_rate", "head_learning_rate"):
        rules.append((key, config[key] > 0, "must be > 0"))
    for key, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"config.{key}={config[key]!r} {requirement}")
    defaults = get_config()
    for key in UNSUPPORTED:
        if config[key] != defaults[key]:
            raise ConfigError(
                f"config.{key}={config[key]!r} is not supported by this experiment (one "
                f"process, one device, four models from one pretraining); leave it at "
                f"{defaults[key]!r}"
            )


def _modes(config) -> list[str]:
    return [mode.strip() for mode in config.modes.split(",") if mode.strip()]


def _targets(config) -> list[str]:
    return ["*" + name.strip() for name in config.lora_targets.split(",") if name.strip()]


def _also_train(config) -> list[str]:
    return [name.strip() for name in config.lora_also_train.split(",") if name.strip()]


def build_model(config, vocab_size: int) -> jdl.models.GPT:
    return jdl.models.GPT(
        vocab_size,
        config.seq_len,
        config.embed_dim,
        config.num_heads,
        config.num_layers,
        positions=config.positions,
        dropout=config.dropout,
        tie_embeddings=False,
        rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1),
    )


def phase_optimizer(config, mode: str, num_steps: int):
    """(tx, schedule) of a phase: the config's optimizer at the phase's rate, frozen as asked."""
    phase = config.copy_and_resolve_references()
    with phase.unlocked():
        phase.learning_rate = {
            "pretrain": config.learning_rate,
            "full": config.finetune_learning_rate,
            "lora": config.lora_learning_rate,
            "head": config.head_learning_rate,
        }[mode]
    tx, schedule = make_config_optimizer(phase, num_steps)
    if mode == "lora":
        tx = lora.optimizer(tx, also_train=_also_train(config))
    elif mode == "head":
        tx = transfer.freeze_all_but(tx, trainable=("head",))
    return tx, schedule


def step_memory_mb(train_step, state: jdl.TrainState, batch) -> float:
    """Bytes XLA plans for one compiled training step: arguments + outputs - donated + temps."""
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    total = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )
    return round(total / 2**20, 2)


def train_phase(config, name, state, train_ids, val_ids, duration, workdir, schedule):
    """`jdl.fit` of one phase in `workdir/name`; returns (FitResult, step memory MB)."""
    train_data = text_data.RandomWindows(
        train_ids, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed
    )
    num_steps = jdl.parse_duration(
        duration, steps_per_epoch=train_data.steps_per_epoch, batch_size=config.batch_size
    )
    loss_fn = lm_loss(label_smoothing=config.label_smoothing)
    train_step = jdl.make_train_step(
        loss_fn,
        lr_schedule=schedule,
        norm_metrics=False,  # unused gradients of frozen weights are then compiled away
        skip_nonfinite=config.skip_nonfinite,
        precision=config.precision,
        micro_batches=config.micro_batches,
    )
    example = {"x": jnp.zeros((config.batch_size, config.seq_len), jnp.int32)}
    memory = step_memory_mb(train_step, state, {**example, "y": example["x"]})
    result = jdl.fit(
        state,
        train_step=train_step,
        train_data=train_data,
        num_steps=num_steps,
        eval_step=jdl.make_eval_step(loss_fn, precision=config.precision),
        eval_data=text_data.eval_windows(val_ids, config.seq_len),
        eval_every=config.eval_every,
        eval_batch_size=config.eval_batch_size,
        log_every=config.log_every,
        workdir=os.path.join(workdir, name),
        checkpoint_every=config.checkpoint_every,
        max_to_keep=config.max_to_keep,
        steps_per_dispatch=config.steps_per_dispatch,
        unroll=config.unroll or True,
        progress=config.progress,
        run_config=config,
    )
    return result, memory


def eval_loss(model: nnx.Module, val_ids: np.ndarray, config) -> float:
    """Mean validation loss (nats/char) of `model` on `val_ids`, every character once."""
    windows = text_data.eval_windows(val_ids, config.seq_len)
    loss_fn = lm_loss()
    graphdef, state = nnx.split(model)

    @jax.jit
    def window_losses(state, batch):
        return loss_fn(nnx.merge(graphdef, state), batch)["loss"]

    total, count = 0.0, 0.0
    for start in range(0, len(windows["x"]), config.eval_batch_size):
        batch = {
            key: jnp.asarray(v[start : start + config.eval_batch_size])
            for key, v in windows.items()
        }
        total += float(jnp.sum(window_losses(state, batch)))
        count += float(jnp.sum(batch["weight"]))
    return total / count


@command
def main(argv=None):
    config, workdir = parse_experiment_command_line(argv, get_config)
    check_lm_config(config)
    check_extra(config)
    jdl.config.check_choices(config, config_choices(get_config))
    workdir = workdir or default_workdir("lora_charlm")
    check_workdir(workdir)
    started = time.perf_counter()
    code_config = config.copy_and_resolve_references()
    with code_config.unlocked():
        code_config.text_path, code_config.max_chars = "", config.pretrain_max_chars
    code, code_source = load_corpus(code_config)
    prose, prose_source = load_corpus(config)
    vocab = text_data.CharVocab.from_text(code + prose)
    code_train, code_val = text_data.split_text(vocab.encode(code), config.validation_fraction)
    prose_train, prose_val = text_data.split_text(vocab.encode(prose), config.validation_fraction)
    if config.compilation_cache:
        jdl.enable_compilation_cache()
    final: dict = {}
    with workdir_lock(workdir):
        model = build_model(config, vocab.size)
        total_params = jdl.count_params(nnx.state(model, nnx.Param))
        print(
            f"pretraining on {code_source} ({len(code):,} characters), fine-tuning on "
            f"{prose_source} ({len(prose):,}); vocabulary {vocab.size}; {total_params:,} "
            f"parameters; devices: {jax.devices()}",
            flush=True,
        )
        num_steps = _steps(config, config.duration, code_train)
        tx, schedule = phase_optimizer(config, "pretrain", num_steps)
        state = jdl.TrainState.create(model, tx, seed=config.seed)
        pretrained, _ = train_phase(
            config,
            "pretrain",
            state,
            code_train,
            code_val,
            config.duration,
            workdir,
            schedule,
        )
        final["pretrain_val_loss"] = round(pretrained.eval_history[-1]["loss"], 4)
        base = pretrained.model()
        final["zero_shot_val_loss"] = round(eval_loss(base, prose_val, config), 4)
        finished = pretrained.was_finished
        tuned_models = {}
        for mode in _modes(config):
            model = pretrained.state.model()
            if mode == "lora":
                lora.add_lora(
                    model,
                    rank=config.lora_rank,
                    alpha=config.lora_alpha,
                    targets=_targets(config),
                    seed=config.seed,
                )
            num_steps = _steps(config, config.finetune_duration, prose_train)
            tx, schedule = phase_optimizer(config, mode, num_steps)
            state = jdl.TrainState.create(model, tx, seed=config.seed)
            trainable = _trainable(state, mode, config)
            result, memory = train_phase(
                config,
                mode,
                state,
                prose_train,
                prose_val,
                config.finetune_duration,
                workdir,
                schedule,
            )
            finished = finished and result.was_finished
            final[f"{mode}_val_loss"] = round(result.eval_history[-1]["loss"], 4)
            final[f"{mode}_train_loss"] = finite_round(result.train_metrics.get("loss"))
            final[f"{mode}_trainable_share"] = round(trainable / total_params, 4)
            final[f"{mode}_step_memory_mb"] = memory
            tuned_models[mode] = result
            if mode == "lora" and jax.process_index() == 0:
                lora.save_adapters(
                    os.path.join(workdir, "lora", "adapters"),
                    result.state,
                    also_train=_also_train(config),
                )
    if "full_val_loss" in final and "lora_val_loss" in final:
        final["lora_gap"] = round(final["lora_val_loss"] - final["full_val_loss"], 4)
    final["memory_source"] = "xla_memory_analysis_of_the_compiled_train_step"
    final["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    final["seconds"] = round(time.perf_counter() - started, 1)
    sample = ""
    if "lora" in tuned_models and config.sample_chars:
        merged = lora.merge(tuned_models["lora"].model())
        sample = generate_text(
            merged,
            vocab,
            config.sample_prompt,
            config.sample_chars,
            temperature=config.sample_temperature,
            top_k=config.sample_top_k or None,
            top_p=config.sample_top_p,
            seed=config.seed,
        )
        print(f"SAMPLE (LoRA merged, top-p {config.sample_top_p}):\n{sample}", flush=True)
    return report_final(final, workdir, finished=finished, extra={"sample": sample})


def _steps(config, duration: str, train_ids: np.ndarray) -> int:
    data = text_data.RandomWindows(
        train_ids, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed
    )
    return jdl.parse_duration(
        duration, steps_per_epoch=data.steps_per_epoch, batch_size=config.batch_size
    )


def _trainable(state: jdl.TrainState, mode: str, config) -> int:
    if mode == "full":
        return jdl.count_params(state.params)
    if mode == "lora":
        return lora.count_trainable_params(state, also_train=_also_train(config))[0]
    return sum(
        int(np.prod(value.shape))
        for path, value in jax.tree_util.tree_flatten_with_path(state.params)[0]
        if transfer.param_path(path).startswith("head/")
    )


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


if __name__ == "__main__":
    main()
