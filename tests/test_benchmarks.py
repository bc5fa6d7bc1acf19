"""benchmarks.throughput, benchmarks.flops and benchmarks.zoo_peers.

A --quick run prints one well-formed RESULT line per model (MFU included); the pure-JAX
loop updates parameters and batch-norm statistics as jdl does; the FLOP counter matches
FLOPs counted by hand; every torch twin has jdl's parameter count and, given jdl's
weights, computes jdl's outputs.
"""

from __future__ import annotations

import argparse
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax import lax

import jdl
from benchmarks import flops, throughput
from benchmarks import zoo_peers as twins

RESULT = re.compile(
    r"RESULT model=(?P<model>\S+) jdl_samples_per_s=(?P<jdl>\S+) vs_pure_jax=(?P<pure_jax>\S+) "
    r"vs_torch_eager=(?P<torch_eager>\S+) vs_torch_compile=(?P<torch_compile>\S+) "
    r"mfu=(?P<mfu>\S+) spread_pure_jax=(?P<spread_pure_jax>\S+)"
)
# mlp_512 runs the same code as mnist_mlp; leaving it out keeps the tests short.
QUICK_MODELS = ("mnist_mlp", "mnist_cnn")
ZOO_MODELS = ("resnet20", "lstm", "gpt_small", "vit")
SLOW_ZOO = ("resnet20", "lstm", "vit")


def parse_results(output: str) -> dict[str, dict[str, float]]:
    """{model: {"jdl": samples/s, "pure_jax": ratio, ..., "mfu": x}} from the RESULT lines."""
    results = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            match = RESULT.fullmatch(line)
            assert match, f"malformed RESULT line: {line!r}"
            fields = match.groupdict()
            model = fields.pop("model")
            results[model] = {name: float(value) for name, value in fields.items()}
    return results


def check_quick_run(models: tuple[str, ...], capsys) -> str:
    """Runs --quick on `models` (torch.compile skipped) and checks every RESULT line."""
    # torch.compile takes longer than the rest of the run: skipped, it reports nan.
    returned = throughput.main(["--quick", "--no-torch-compile", "--models", ",".join(models)])
    output = capsys.readouterr().out
    results = parse_results(output)
    assert list(results) == list(models)
    for model, values in results.items():
        for name in ("jdl", "pure_jax", "torch_eager"):
            assert math.isfinite(values[name]) and values[name] > 0, (model, name, output)
        assert math.isnan(values["torch_compile"])
        assert 0 < values["mfu"] < 1, (model, output)
    assert [result.name for result in returned] == list(models)
    assert re.search(
        r"^peak: xla=\S+ GFLOP/s torch=\S+ GFLOP/s \(matmul 1024x1024 fp32\)$", output, re.M
    )
    assert output.count("model FLOPs/step: ") == len(models)
    assert "settings: jdl.fit K=5 unroll=1" in output
    return output


def test_quick_run_reports_every_model(capsys):
    check_quick_run(QUICK_MODELS, capsys)


# gpt_small runs every step of a zoo model's benchmark (the jdl module in the pure-JAX
# loop, a torch twin, a language model); the other three cost more compile time for the
# same paths (the twins and the batch-norm state are tested below), so they are slow.
@pytest.mark.parametrize(
    "model",
    ["gpt_small", *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW_ZOO)],
)
def test_quick_run_of_a_zoo_model(model, capsys):
    output = check_quick_run((model,), capsys)
    counts = re.findall(r"trainable parameters: jdl ([\d,]+), torch ([\d,]+) \(equal\)", output)
    assert len(counts) == 1 and counts[0][0] == counts[0][1]
    if throughput.MODELS[model].is_language_model:  # samples/s of the LMs are windows/s
        assert "batch 16 (sequences of 16 tokens)" in output


class DenseBatchNorm(nnx.Module):
    """dense - batch norm - ReLU - dense: the smallest network with batch-norm state."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(6, 5, rngs=rngs)
        self.bn = nnx.BatchNorm(5, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jax.nn.relu(self.bn(self.dense(x))))


def test_the_pure_jax_loop_trains_and_updates_batch_norm_as_jdl_does():
    with jax.threefry_partitionable(False):  # compiles its initialisers faster on CPU
        model = DenseBatchNorm(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    tx, _ = jdl.make_optimizer("adam", learning_rate=throughput.LEARNING_RATE)
    jdl_step = jax.jit(jdl.make_train_step(jdl.classification_loss()))
    expected, _ = jdl_step(jdl.TrainState.create(model, tx), {"x": x, "y": y})

    spec = throughput.MODELS["resnet20"]  # any zoo model: the jdl module is trained as is
    params, extra, loss_fn = throughput.make_pure_model(spec, model, cpu_kernels=False)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = jax.tree.map(jnp.array, (params, extra, zeros, zeros, jnp.zeros(())))
    chunk = throughput.make_pure_chunk(throughput.Setting(1, 1), loss_fn)
    (params, new_extra, *_), _ = chunk(state, x, y, jnp.arange(8)[None], 0)

    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, params, expected.params)
    jax.tree.map(close, new_extra, expected.model_state)
    assert not np.allclose(new_extra["bn"]["mean"][...], extra["bn"]["mean"][...])  # it moved


def test_a_failing_torch_compile_is_reported_not_raised(capsys):
    def broken() -> throughput.Peer:
        raise RuntimeError("no C++ compiler")

    assert "no C++ compiler" in throughput.start_peer("torch_compile", broken)
    assert "torch_compile unavailable" in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        throughput.start_peer("pure_jax", broken)


def test_a_missing_peer_gives_a_nan_ratio_and_mfu_uses_jdl_steps_per_second():
    result = throughput.ModelResult(
        "mnist_mlp",
        steps=10,
        setting=throughput.Setting(5, 1),
        rates={"jdl": [300.0, 100.0, 200.0], "pure_jax": [100.0], "torch_eager": [400.0]},
        unavailable={"torch_compile": "skipped"},
        flops_per_step=1e9,
        batch_size=100,
        peak_flops=4e9,
    )
    values = parse_results(result.result_line())["mnist_mlp"]
    assert values["jdl"] == 200.0  # the median
    assert values["pure_jax"] == 2.0 and values["torch_eager"] == 0.5
    assert math.isnan(values["torch_compile"])
    assert values["mfu"] == 0.5  # 2 steps/s x 1 GFLOP / 4 GFLOP/s


def test_settings_parse():
    Setting = throughput.Setting
    assert throughput.parse_settings("50:1,10:full,10:1:cpu") == (
        Setting(50, 1),
        Setting(10, True),
        Setting(10, 1, cpu_kernels=True),
    )
    assert str(Setting(10, True, cpu_kernels=True)) == "K=10 unroll=full cpu_kernels"
    for bad in ("fifty:1", "10", "10:1:gpu"):
        with pytest.raises(argparse.ArgumentTypeError, match="K:U"):
            throughput.parse_settings(bad)


def test_batch_size_and_sequence_length_are_per_model_unless_given(capsys):
    args = throughput.parse_args(["--models", "gpt_small,mnist_mlp"])
    assert args.batch_size is None and args.peak_size == throughput.PEAK_SIZE
    assert [throughput.MODELS[name].batch_size for name in args.models] == [4, 128]
    sizes = throughput.resolve_sizes(throughput.MODELS["gpt_small"], False, 256)
    assert sizes["seq_len"] == 256 and throughput.MODELS["gpt_small"].sizes["seq_len"] == 128
    with pytest.raises(SystemExit):
        throughput.parse_args(["--models", "gpt_small", "--seq-len", "2048"])
    assert "--seq-len 2048 must be in [2, 1024] for gpt_small" in capsys.readouterr().err


# ----------------------------------------------------------------------------- FLOP counter


def abstract_model_flops(build, *inputs) -> int:
    """`forward_flops` of the NNX module `build()` on `inputs`, from shapes only."""
    graphdef, variables = nnx.split(nnx.eval_shape(build))  # nothing initialised
    return flops.forward_flops(
        lambda variables, *inputs: nnx.merge(graphdef, variables)(*inputs), variables, *inputs
    )


def test_flops_of_an_mlp_are_two_per_multiply_add():
    batch, sizes = 32, (784, 128, 10)
    hand = 2 * batch * (784 * 128 + 128 * 10)

    def mlp(w1, w2, x):
        return jax.nn.relu(x @ w1) @ w2

    shapes = [(784, 128), (128, 10), (batch, 784)]
    args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    assert flops.forward_flops(mlp, *args) == hand
    assert flops.training_flops(mlp, *args) == 3 * hand
    # The same network as a jdl NNX module (biases and ReLUs cost no matmul FLOPs).
    build = lambda: jdl.models.MLP(sizes[0], sizes[1:-1], sizes[-1], rngs=nnx.Rngs(0))
    assert abstract_model_flops(build, jnp.zeros((batch, 784))) == hand


def test_flops_of_a_batched_dot_count_contracting_and_batch_dims():
    a = jax.ShapeDtypeStruct((6, 5, 7), jnp.float32)  # (batch, i, j)
    b = jax.ShapeDtypeStruct((6, 7, 3), jnp.float32)  # (batch, j, k)
    count = flops.forward_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b)
    assert count == 2 * 6 * 5 * 3 * 7


@pytest.mark.parametrize("groups", [1, 2])
def test_flops_of_convolutions_in_either_layout(groups):
    batch, height, width, c_in, c_out, kernel, stride = 4, 10, 12, 6, 8, 3, 2
    out_h, out_w = height // stride, width // stride  # SAME padding
    hand = 2 * batch * out_h * out_w * c_out * kernel * kernel * (c_in // groups)

    def nhwc(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=dims, feature_group_count=groups
        )

    def nchw(x, w):
        dims = ("NCHW", "OIHW", "NCHW")
        return lax.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=dims, feature_group_count=groups
        )

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    hwio = f32(kernel, kernel, c_in // groups, c_out)
    assert flops.forward_flops(nhwc, f32(batch, height, width, c_in), hwio) == hand
    oihw = f32(c_out, c_in // groups, kernel, kernel)
    assert flops.forward_flops(nchw, f32(batch, c_in, height, width), oihw) == hand


def test_flops_walk_scan_cond_jit_remat_and_custom_derivatives():
    n = 8
    matmul = 2 * n**3  # one (n, n) @ (n, n)

    @jax.custom_vjp
    def custom(x):
        return x @ x

    custom.defvjp(lambda x: (x @ x, x), lambda x, g: (g @ x.T + x.T @ g,))

    def fn(x):
        x, _ = lax.scan(lambda c, _: (c @ c, None), x, None, length=5)  # 5 matmuls
        x = lax.cond(x[0, 0] > 0, lambda z: (z @ z) @ z, lambda z: z @ z, x)  # max: 2
        x = jax.jit(lambda z: z @ z)(x)  # 1
        x = jax.checkpoint(lambda z: z @ z)(x)  # 1
        return custom(x)  # 1 (the primal only)

    assert flops.forward_flops(fn, jnp.ones((n, n))) == 10 * matmul


def test_flops_refuse_a_while_loop():
    def fn(x):
        return lax.while_loop(lambda c: c[0, 0] < 10, lambda c: c @ c, x)

    with pytest.raises(ValueError, match="while loop"):
        flops.forward_flops(fn, jnp.ones((4, 4)))


def test_flops_of_jdl_gpt_match_the_hand_count():
    vocab, context, width, heads, layers, batch, length = 97, 16, 32, 4, 2, 3, 12
    build = lambda: jdl.models.GPT(vocab, context, width, heads, layers, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((batch, length), jnp.int32)
    rows = batch * length
    per_layer = (
        2 * rows * width * 3 * width  # q, k, v
        + 2 * 2 * batch * length * length * width  # scores and weighted values, all heads
        + 2 * rows * width * width  # output projection
        + 2 * 2 * rows * width * 4 * width  # the MLP's two layers
    )
    head = 2 * rows * width * vocab  # tied embedding, transposed
    assert abstract_model_flops(build, tokens) == layers * per_layer + head


def test_the_lstm_flops_count_every_time_step():
    vocab, embed, hidden, batch, length = 11, 5, 7, 2, 9
    build = lambda: jdl.models.CharLM(vocab, embed, hidden, rngs=nnx.Rngs(0))
    rows = batch * length
    hand = (
        2 * rows * embed * 4 * hidden  # input projection, all steps at once
        + length * 2 * batch * hidden * 4 * hidden  # recurrent matmul, per step
        + 2 * rows * hidden * vocab  # head
    )
    assert abstract_model_flops(build, jnp.zeros((batch, length), jnp.int32)) == hand


def test_matmul_peaks_are_positive_rates():
    for peak in (flops.matmul_peak_xla(64, repeats=2), flops.matmul_peak_torch(64, repeats=2)):
        assert math.isfinite(peak) and peak > 1e6  # any machine does 1 MFLOP/s


# ----------------------------------------------------------------------------- torch twins

# Published sizes: ResNet-20 0.27M (He et al. 2016, table 6), GPT-2 small 124,439,808
# (Hugging Face's gpt2), the char LSTM's 350k (experiments/charlm_lstm.py).
KNOWN_COUNTS = {"resnet20": 269_722, "gpt_small": 124_439_808, "lstm": 350_593}


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_torch_twins_have_jdls_parameter_count(name, quick):
    spec = throughput.MODELS[name]
    sizes = throughput.resolve_sizes(spec, quick, None)
    with torch.device("meta"):  # shapes only: GPT-2 small allocates nothing
        torch_count = twins.count_trainable(throughput.build_torch_model(spec, sizes))
    jdl_count = throughput.jdl_param_count(spec, sizes)
    assert torch_count == jdl_count
    if not quick and name in KNOWN_COUNTS:
        assert jdl_count == KNOWN_COUNTS[name]


def test_the_resnet20_benchmark_model_is_jdls_resnet20():
    spec = throughput.MODELS["resnet20"]
    model = nnx.eval_shape(lambda: jdl.models.resnet20(num_classes=10, rngs=nnx.Rngs(0)))
    assert throughput.jdl_param_count(spec, spec.sizes) == jdl.count_params(
        nnx.state(model, nnx.Param)
    )


def test_a_torch_twin_with_another_parameter_count_is_refused():
    spec = throughput.MODELS["lstm"]
    sizes = throughput.resolve_sizes(spec, True, None)
    arrays = throughput.make_data(spec, 4, 2, sizes)
    with pytest.raises(ValueError, match="architectures differ"):
        throughput.TorchPeer(spec, sizes, arrays, 4, compiled=False, expected_params=1)


RENAMES = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "mean": "running_mean",
    "var": "running_var",
}


def torch_name_and_value(
    path: tuple, value: np.ndarray, stage_sizes: tuple[int, ...]
) -> tuple[str, np.ndarray]:
    """The torch twin's name and layout of one jdl variable (see benchmarks/zoo_peers.py)."""
    parts = [str(part) for part in path]
    if parts[0] == "stages":  # ResNet: stages.s.j -> blocks.(index over all stages)
        stage, block = int(parts[1]), int(parts[2])
        parts = ["blocks", str(sum(stage_sizes[:stage]) + block), *parts[3:]]
    if parts[:2] == ["rnn", "cells"]:  # LSTM: rnn.cells.l.w_ih -> rnn.weight_ih_l{l}
        kind, which = parts[3].split("_")
        parts = ["rnn", f"{'weight' if kind == 'w' else 'bias'}_{which}_l{parts[2]}"]
    parts = [part for part in parts if part not in ("attn", "mlp")]
    parts[-1] = RENAMES.get(parts[-1], parts[-1])
    if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif path[-1] in ("kernel", "w_ih", "w_hh"):
        value = value.T  # (in, out) -> torch's (out, in)
    return ".".join(parts), value


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_torch_twins_compute_what_jdl_computes(name):
    spec = throughput.MODELS[name]
    sizes = throughput.resolve_sizes(spec, True, None)
    jdl_model = throughput.build_jdl_model(spec, sizes, nnx.Rngs(0))
    torch_model = throughput.build_torch_model(spec, sizes)
    state = torch_model.state_dict()
    copied = {}
    for path, variable in nnx.to_flat_state(nnx.state(jdl_model)):
        value = np.array(variable[...])  # a writable copy
        key, value = torch_name_and_value(path, value, sizes.get("stage_sizes", ()))
        assert key in state and state[key].shape == value.shape, (key, value.shape)
        copied[key] = torch.from_numpy(np.ascontiguousarray(value))
    assert {key for key, _ in torch_model.named_parameters()} <= set(copied)
    torch_model.load_state_dict({**state, **copied})
    x = throughput.make_data(spec, 4, 1, sizes)["x"]
    jdl_model.train()  # batch norm on batch statistics in both
    torch_model.train()
    graphdef, variables = nnx.split(jdl_model)
    forward = jax.jit(lambda variables, x: nnx.merge(graphdef, variables)(x))  # one compile
    expected = np.asarray(forward(variables, x))
    with torch.no_grad():
        actual = torch_model(throughput.torch_inputs(spec, x)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- gpt_mfu

GPT_MFU_RESULT = re.compile(
    r"RESULT model=gpt_small precision=bf16 device=(?P<device>\S+) tokens_per_s=(?P<rate>\S+) "
    r"model_tflops=(?P<tflops>\S+) mfu=(?P<mfu>\S+) mfu_nominal=(?P<nominal>\S+)"
)


def test_gpt_mfu_quick_run_trains_in_bf16_and_reports_mfu(capsys):
    from benchmarks import gpt_mfu

    result = gpt_mfu.main(["--quick"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT")]
    assert len(lines) == 1
    match = GPT_MFU_RESULT.fullmatch(lines[0])
    assert match, lines[0]
    assert match["device"] == "cpu" and match["nominal"] == "nan"  # no datasheet for a CPU
    assert float(match["rate"]) == pytest.approx(result.tokens_per_s, rel=1e-3)
    assert 0 < result.mfu < 1 and result.tokens_per_step == 4 * 16
    # The FLOPs per step are 3 x the forward's matmuls: 6 x (matmul weights) per token plus
    # the attention products (tiny GPT: 1 layer, width 64, 16 tokens, vocabulary 256).
    width, tokens, vocab = 64, 16, 256
    weights = 4 * width * width + 8 * width * width + vocab * width  # qkv+out, MLP, head
    attention = 2 * 2 * tokens * tokens * width  # q.k and p.v per window, forward
    per_window = 3 * (2 * tokens * weights + attention)
    assert result.flops_per_step == 4 * per_window


def test_gpt_mfu_step_computes_in_bf16():
    from benchmarks import gpt_mfu

    sizes = throughput.resolve_sizes(gpt_mfu.SPEC, True, None)
    arrays = throughput.make_data(gpt_mfu.SPEC, 4, 2, sizes)
    peers = {
        precision: throughput.JdlPeer(
            gpt_mfu.SPEC, sizes, arrays, 4, throughput.Setting(2, 1), precision=precision
        )
        for precision in ("bf16", "fp32")
    }
    batch = {name: value[:4] for name, value in arrays.items()}
    for precision, peer in peers.items():
        state = jdl.TrainState.create(peer.model, peer.tx)
        hlo = jax.jit(peer.train_step).lower(state, batch).as_text()
        dots = re.findall(r"dot_general.*", hlo)
        assert dots and (any("bf16" in dot for dot in dots) == (precision == "bf16")), precision


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
    ],
)
def test_gpt_mfu_nominal_peaks(kind, peak):
    from benchmarks import gpt_mfu

    assert gpt_mfu.nominal_peak(kind) == peak
    assert math.isnan(gpt_mfu.nominal_peak("cpu"))


def test_xla_cpu_options_quick_run_times_every_setting(capsys):
    from benchmarks import xla_cpu_options

    results = xla_cpu_options.main(["--quick", "--models", "mnist_cnn"])
    output = capsys.readouterr().out
    assert [r.model for r in results] == ["mnist_cnn"]
    for result in results:
        line = re.search(rf"^RESULT model={result.model} (.*)$", output, re.M).group(1)
        values = dict(item.split("=") for item in line.split())
        assert set(values) == {"xla_default_ms", "jdl_ms", "ynn_off_ms", "speedup"}
        assert all(float(v) > 0 for v in values.values())
        ratio = float(values["xla_default_ms"]) / float(values["jdl_ms"])
        assert float(values["speedup"]) == pytest.approx(ratio, rel=2e-3)
    # the settings really differ: XLA's defaults fuse more into YNNPACK, ynn_off nothing
    fusions = {
        (m, s): int(n)
        for m, s, n in re.findall(r"^  (\w+) (\w+): compiled .*ynn=(\d+)$", output, re.M)
    }
    assert fusions["mnist_cnn", "ynn_off"] == 0
    assert fusions["mnist_cnn", "xla_default"] > fusions["mnist_cnn", "jdl"] > 0


def test_ratio_spread_and_extra_repeats_while_the_ratio_is_noisy():
    from benchmarks.throughput import MIN_SPREAD_REPEATS, ratio_spread, repeat_while_noisy

    # Five repeats, one disturbed (pure_jax at half speed): the quartiles ignore it.
    rates = {"jdl": [100.0] * 5, "pure_jax": [100.0, 98.0, 102.0, 50.0, 101.0]}
    ratios = sorted(100 / p for p in rates["pure_jax"])  # 0.980, 0.990, 1.000, 1.020, 2.000
    expected = (ratios[3] - ratios[1]) / 2 / ratios[2]
    assert ratio_spread(rates, "pure_jax") == pytest.approx(expected)
    assert expected < 0.02 < (ratios[-1] - ratios[0]) / 2  # the full range would say +-50%
    # Two or three repeats: interpolated quartiles are a quarter of the range.
    three = {"jdl": [100.0, 100.0, 100.0], "pure_jax": [100.0, 95.0, 105.0]}
    ratios = [1.0, 100 / 95, 100 / 105]
    assert ratio_spread(three, "pure_jax") == pytest.approx(
        (max(ratios) - min(ratios)) / 4 / sorted(ratios)[1]
    )
    assert math.isnan(ratio_spread({"jdl": [1.0], "pure_jax": [1.0]}, "pure_jax"))

    class Peer:  # a peer whose step time is scripted: noisy at first, then steady
        def __init__(self, name, seconds):
            self.name, self.seconds = name, list(seconds)
            self.timed = 0

        def time_steps(self, steps):
            self.timed += 1
            return self.seconds.pop(0) if len(self.seconds) > 1 else self.seconds[0]

    torch = Peer("torch_eager", [2.0])
    peers = [Peer("jdl", [1.0]), Peer("pure_jax", [1.3, 1.0]), torch]
    first = {"jdl": [10.0, 10.0], "pure_jax": [10.0, 5.0], "torch_eager": [5.0, 5.0]}
    more = repeat_while_noisy(peers, 10, 1, first, max_repeats=12)
    # Ratios 1, 2, 1.3, then 1.0 until the quartiles close in: 9 repeats.
    assert len(more["jdl"]) == len(more["pure_jax"]) == 9
    assert (
        ratio_spread(more, "pure_jax")
        <= 0.03
        < ratio_spread({name: values[:8] for name, values in more.items()}, "pure_jax")
    )
    assert more["jdl"][:2] == first["jdl"]
    # Steady from the start: repeats go on only up to the minimum the quartiles need.
    few = {"jdl": [10.0, 10.0], "pure_jax": [10.0, 10.0]}
    assert len(repeat_while_noisy(peers, 10, 1, few, max_repeats=9)["jdl"]) == MIN_SPREAD_REPEATS
    assert more["torch_eager"] == first["torch_eager"] and torch.timed == 0  # not re-timed
    steady = {"jdl": [10.0] * 5, "pure_jax": [10.0] * 5}
    assert repeat_while_noisy(peers, 10, 1, steady, max_repeats=9) == steady
    capped = repeat_while_noisy(peers, 10, 1, first, max_repeats=2)
    assert capped == first  # the cap holds; the RESULT line then shows the wide spread
