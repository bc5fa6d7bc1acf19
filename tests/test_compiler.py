"""jdl.compiler: the XLA:CPU options of jdl's programs (no YNNPACK convolutions)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jdl
from jdl import compiler


def _library_fusions(hlo_text: str) -> list[list[str]]:
    """The opcodes (parameters left out) of each YNNPACK fusion of a compiled module's text."""
    bodies, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        header = re.match(r"^\s*(?:ENTRY\s+)?%(\S+)\s.*\{\s*$", line)
        if header:
            name, lines = header.group(1), []
        elif line.strip() == "}" and name is not None:
            bodies[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    called = re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo_text)
    ops = (re.findall(r"\s(\w+)\(", bodies[c]) for c in called)
    return [[op for op in fusion if op != "parameter"] for fusion in ops]


def _cnn_chunk(data):
    model = jdl.models.CNN(
        1, 10, input_shape=(28, 28), conv_channels=(32, 64), dense_sizes=(128,), rngs=nnx.Rngs(0)
    )
    tx, _ = jdl.make_optimizer("adam", learning_rate=1e-3)
    state = jdl.TrainState.create(model, tx, seed=0)
    train_step = jdl.make_train_step(jdl.classification_loss())
    return state, train_step, jdl.make_chunk_runner(train_step, data, 1)


def test_cpu_options_are_cpu_only():
    assert compiler.compiler_options() == compiler.CPU_OPTIONS
    assert compiler.compiler_options("cpu") is not compiler.CPU_OPTIONS  # a fresh dict
    assert compiler.compiler_options("gpu") == {} and compiler.compiler_options("tpu") == {}


def test_user_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{compiler.YNN_FUSION_OPTION}=")
    assert compiler.compiler_options() == {}


def test_an_option_this_jaxlib_rejects_falls_back_to_xla_defaults(monkeypatch):
    monkeypatch.setattr(compiler, "CPU_OPTIONS", {"xla_cpu_no_such_option": "1"})
    compiler._cpu_options_supported.cache_clear()
    try:
        assert compiler.compiler_options() == {}
    finally:
        compiler._cpu_options_supported.cache_clear()


def test_chunk_program_runs_convolutions_outside_ynnpack_and_dots_inside():
    # The premise, checked against XLA's defaults on the same step: they hand each
    # convolution to YNNPACK on its own; jdl's chunk program does not, but keeps its dots.
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.normal(size=(256, 28, 28, 1)).astype(np.float32),
        "y": rng.integers(0, 10, 256).astype(np.int32),
    }
    data = jdl.InMemoryData(arrays, batch_size=128, seed=0)
    state, train_step, runner = _cnn_chunk(data)
    device_arrays = jax.device_put(data.arrays)
    jdl_fusions = _library_fusions(
        runner.lower(state, device_arrays, jnp.int32(1)).compile().as_text()
    )
    batch = {name: value[:128] for name, value in device_arrays.items()}
    default_fusions = _library_fusions(jax.jit(train_step).lower(state, batch).compile().as_text())
    assert ["convolution"] in default_fusions
    assert ["convolution"] not in jdl_fusions
    assert ["dot"] in jdl_fusions


def test_evaluator_uses_the_same_options(monkeypatch):
    rng = np.random.default_rng(1)
    arrays = {
        "x": rng.normal(size=(64, 28, 28, 1)).astype(np.float32),
        "y": rng.integers(0, 10, 64).astype(np.int32),
    }
    state, _, _ = _cnn_chunk(jdl.InMemoryData(arrays, batch_size=64, seed=0))
    jit_options, real_jit = [], jax.jit

    def recording_jit(*args, **kwargs):
        jit_options.append(kwargs.get("compiler_options"))
        return real_jit(*args, **kwargs)

    monkeypatch.setattr(jax, "jit", recording_jit)
    evaluate = jdl.make_evaluator(jdl.make_eval_step(jdl.classification_loss()), 32)
    monkeypatch.undo()
    assert jit_options == [compiler.CPU_OPTIONS]
    metrics = evaluate(state, arrays)
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_a_model_without_convolutions_compiles_as_under_xla_defaults():
    def step(w, x):
        return jax.grad(lambda w: jnp.sum(jax.nn.relu(x @ w[0]) @ w[1]))(w)

    w = (jnp.ones((784, 512)), jnp.ones((512, 10)))
    lowered = jax.jit(step).lower(w, jnp.ones((128, 784)))
    jdl_text = lowered.compile(compiler_options=compiler.compiler_options()).as_text()
    default_text = lowered.compile().as_text()
    assert ["dot"] in _library_fusions(jdl_text)  # YNNPACK's dots, as before
    assert jdl_text == default_text
