"""`jdl.summary`: layers, output shapes, parameter counts and FLOPs, checked against hand
counts, `jdl.count_params` and the benchmarks' FLOP counter; the model stays as it was."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from benchmarks.flops import forward_flops
from jdl.model_summary import Summary, SummaryInputError, summary
from jdl.models import MODELS, SequenceClassifier


def _forward(model):
    graphdef, state = nnx.split(model)
    return lambda state, x: nnx.merge(graphdef, state)(x), state


RESNET20 = lambda: MODELS["resnet20"](num_classes=10, rngs=nnx.Rngs(0))
VIT_TINY = lambda: MODELS["vit_tiny"](num_classes=10, rngs=nnx.Rngs(0))
ZOO = {
    "mnist_mlp": (lambda: MODELS["mnist_mlp"](rngs=nnx.Rngs(0)), (2, 784), jnp.float32),
    "mnist_cnn": (lambda: MODELS["mnist_cnn"](rngs=nnx.Rngs(0)), (2, 28, 28, 1), jnp.float32),
    "resnet20": (
        lambda: MODELS["resnet20"](num_classes=10, rngs=nnx.Rngs(0)),
        (2, 32, 32, 3),
        None,
    ),
    "gpt_tiny": (lambda: MODELS["gpt_tiny"](vocab_size=65, rngs=nnx.Rngs(0)), (2, 16), jnp.int32),
    "vit_tiny": (
        lambda: MODELS["vit_tiny"](num_classes=10, rngs=nnx.Rngs(0)),
        (2, 28, 28, 1),
        None,
    ),
    "gru": (
        lambda: SequenceClassifier("gru", 3, 8, 4, rngs=nnx.Rngs(0)),
        (2, 12, 3),
        jnp.float32,
    ),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_counts_match_train_state_and_benchmark_flops(name):
    build, shape, dtype = ZOO[name]
    model = build()
    x = jax.ShapeDtypeStruct(shape, dtype or jnp.float32)
    result = summary(model, x)
    state = jdl.TrainState.create(model, optax.sgd(0.1))
    assert result.total_params == jdl.count_params(state.params)
    assert result.total_other_state == jdl.count_params(state.model_state)
    forward, variables = _forward(model)
    assert result.total_flops == forward_flops(forward, variables, x) // shape[0]
    assert result.total_flops > 0
    expected = jax.eval_shape(forward, variables, x)
    assert result.layers[0].outputs == ((expected.shape, str(expected.dtype)),)
    assert result.layers[0].path == "" and result.layers[0].type == type(model).__name__
    json.loads(json.dumps(result.to_dict()))  # JSON-able


def test_mlp_hand_count_and_linear_flops():
    model = jdl.models.MLP(784, (128,), 10, rngs=nnx.Rngs(0))
    result = summary(model, np.zeros((5, 784), np.float32))
    hand = 784 * 128 + 128 + 128 * 10 + 10
    assert result.total_params == hand == 101_770
    assert result.total_other_state == 0
    rows = {layer.path: layer for layer in result.layers}
    assert rows["hidden/0"].params == 784 * 128 + 128
    assert rows["hidden/0"].outputs == (((5, 128), "float32"),)
    assert rows["hidden/0"].flops == 2 * 784 * 128  # per example: bias adds are not counted
    assert rows["head"].flops == 2 * 128 * 10
    assert rows["hidden"].flops == rows["hidden/0"].flops  # a container sums its layers
    assert result.total_flops == 2 * (784 * 128 + 128 * 10)


def test_linear_flops_per_example_do_not_depend_on_batch():
    linear = nnx.Linear(7, 5, rngs=nnx.Rngs(0))
    for batch in (1, 3, 64):
        assert summary(linear, jnp.zeros((batch, 7))).total_flops == 2 * 7 * 5


def test_conv_flops_and_layer_rows_of_the_cnn():
    model = MODELS["mnist_cnn"](rngs=nnx.Rngs(0))
    result = summary(model, {"x": jnp.zeros((3, 28, 28, 1)), "y": jnp.zeros(3, jnp.int32)})
    rows = {layer.path: layer for layer in result.layers}
    first = rows["convs/0"]
    assert first.type == "Conv" and first.outputs == (((3, 28, 28, 32), "float32"),)
    assert first.flops == 2 * 28 * 28 * 32 * (3 * 3 * 1)  # same padding: one output per pixel
    assert first.params == 3 * 3 * 1 * 32 + 32
    top = [layer for layer in result.layers if layer.depth == 1]
    assert sum(layer.flops for layer in top) == result.total_flops
    assert sum(layer.params for layer in top) == result.total_params
    # Parents come before their layers, in the order the forward pass calls them.
    assert [layer.path for layer in top] == ["convs", "dense", "head"]


def test_remat_blocks_are_summarised_like_plain_ones():
    x = jnp.zeros((2, 32, 32, 3))
    plain = summary(MODELS["resnet20"](num_classes=10, rngs=nnx.Rngs(0)), x)
    remat = summary(MODELS["resnet20"](num_classes=10, rngs=nnx.Rngs(0), remat=True), x)
    assert remat.to_dict() == plain.to_dict()
    block = {layer.path: layer for layer in plain.layers}["stages/0/0"]
    assert block.type == "BasicBlock" and block.flops == 2 * 2 * 32 * 32 * 16 * 9 * 16


def test_scan_flops_count_every_time_step():
    model = SequenceClassifier("gru", 3, 8, 4, rngs=nnx.Rngs(0))
    short = summary(model, jnp.zeros((1, 5, 3))).total_flops
    long = summary(model, jnp.zeros((1, 10, 3))).total_flops
    head = 2 * 8 * 4
    assert long - head == 2 * (short - head)


class _Noisy(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 6, rngs=rngs)
        self.norm = nnx.BatchNorm(6, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.norm(self.linear(x)))


def _snapshot(model):
    leaves = jax.tree.leaves(nnx.state(model))
    keys = jax.dtypes.prng_key
    return [
        np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, keys) else v) for v in leaves
    ]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_model_is_left_unchanged(mode):
    model = _Noisy(nnx.Rngs(0))
    getattr(model, mode)()
    before = _snapshot(model)
    calls = {cls: cls.__dict__.get("__call__") for cls in (_Noisy, nnx.Linear, nnx.BatchNorm)}
    result = summary(model, jnp.ones((8, 4)))
    after = _snapshot(model)
    assert len(before) == len(after) and all(
        np.array_equal(a, b) for a, b in zip(before, after, strict=True)
    )
    assert model.dropout.deterministic is (mode == "eval")
    assert model.norm.use_running_average is (mode == "eval")
    assert not any(hasattr(m, "_jdl_summary_index") for _, m in nnx.iter_graph(model))
    assert {cls: cls.__dict__.get("__call__") for cls in calls} == calls
    assert {layer.path for layer in result.layers} == {"", "linear", "norm", "dropout"}
    # The dropout stream's key and counter are "other state", as in TrainState.model_state.
    state = jdl.TrainState.create(model, optax.sgd(0.1))
    assert result.total_other_state == jdl.count_params(state.model_state) > 12


def test_bad_inputs_are_one_line_user_errors():
    model = nnx.Linear(7, 5, rngs=nnx.Rngs(0))
    calls = nnx.Linear.__dict__["__call__"]
    for bad, words in [
        ({"y": jnp.zeros(3)}, "no 'x'"),
        (jnp.zeros(()), "batch axis"),
        ("text", "not an array"),
        (jnp.zeros((2, 9)), "cannot take an input of shape (2, 9)"),
    ]:
        with pytest.raises(SummaryInputError, match=None) as info:
            summary(model, bad)
        assert isinstance(info.value, jdl.UserError) and isinstance(info.value, ValueError)
        assert words in str(info.value) and "\n" not in str(info.value)
    assert nnx.Linear.__dict__["__call__"] is calls  # restored after a failed trace too


def test_text_table_json_and_files(tmp_path):
    model = MODELS["resnet20"](num_classes=10, rngs=nnx.Rngs(0))
    result = summary(model, jnp.zeros((1, 32, 32, 3)))
    assert isinstance(result, Summary)
    text = str(result)
    assert text.splitlines()[0] == result.headline()
    assert "269,722 params" in result.headline() and "MFLOPs per example" in result.headline()
    assert "stages/0/0/conv1" not in text  # indented names, not full paths
    assert text.count("\n") + 1 == len(result.layers) + 7  # headline, input, 3 rules, header, total
    short = result.format(max_rows=30)
    shown = short.count("BasicBlock")
    assert shown == 9 and "layers deeper than 3 not shown" in short
    assert result.format(depth=1).count("\n") < short.count("\n")
    text_path, json_path = result.write(str(tmp_path / "run"))
    with open(text_path) as f:
        assert f.read() == text + "\n"
    with open(json_path) as f:
        loaded = json.load(f)
    assert loaded == result.to_dict()
    assert loaded["total_params"] == 269_722 and loaded["input"]["shape"] == [1, 32, 32, 3]
    assert loaded["layers"][0]["outputs"] == [{"shape": [1, 10], "dtype": "float32"}]


def test_experiment_prints_the_summary_and_writes_it_after_fit(tmp_path, capsys, monkeypatch):
    from experiments import iris_mlp

    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "no-data"))
    workdir = tmp_path / "run"
    args = ["--config.duration=2", "--config.progress=false", "--config.compilation_cache=false"]
    iris_mlp.main([*args, "--workdir", str(workdir)])
    out = capsys.readouterr().out
    with open(workdir / "summary.json") as f:
        recorded = json.load(f)
    assert recorded["model_type"] == "MLP" and recorded["input"]["shape"][0] == 1
    headline = (workdir / "summary.txt").read_text().splitlines()[0]
    assert headline in out.splitlines()
    # A resume that fit refuses (another model's checkpoint) leaves no summary behind.
    for name in ("summary.txt", "summary.json"):
        (workdir / name).unlink()
    with pytest.raises(SystemExit, match="the model expects"):  # main() prints one line
        iris_mlp.main([*args, "--config.hidden_sizes=(8,)", "--workdir", str(workdir)])
    assert not (workdir / "summary.txt").exists() and not (workdir / "summary.json").exists()
