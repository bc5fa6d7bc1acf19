"""jdl.parallel on 8 fake CPU devices: meshes, FSDP rules, sharded fit == 1 device, resharding."""

from __future__ import annotations

import contextlib
import logging
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from support import blobs, mlp_state

import jdl
from experiments import charlm_common
from jdl import parallel
from jdl.data.text import RandomWindows
from jdl.parallel import ShardingError, ShardingRules

RULES = ShardingRules(min_size=256)  # small enough that the test MLP's kernels are split


def test_conftest_gives_eight_devices():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data:8", {"data": 8}),
        ("data:4,fsdp:2", {"data": 4, "fsdp": 2}),
        ("data:-1,fsdp:2", {"data": 4, "fsdp": 2}),
        (" fsdp:-1 ", {"fsdp": 8}),
        ({"data": 2, "fsdp": -1}, {"data": 2, "fsdp": 4}),
    ],
)
def test_parse_mesh_shape(text, expected):
    assert parallel.parse_mesh_shape(text, 8) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("data:3", "needs 3 devices, but 8"),
        ("data:-1,fsdp:-1", "at most one -1"),
        ("data:3,fsdp:-1", "do not divide"),
        ("data", "expected 'axis:size'"),
        ("data:2,data:4", "twice"),
        ("", "no axes"),
        ("data:0,fsdp:-1", "sizes must be >= 1"),
    ],
)
def test_parse_mesh_shape_rejects(text, message):
    with pytest.raises(ShardingError, match=message):
        parallel.parse_mesh_shape(text, 8)


def test_make_mesh_orders_devices_and_names_axes():
    mesh = parallel.make_mesh("data:4,fsdp:2")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())
    assert parallel.data_parallel_size(mesh) == 8
    assert parallel.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    small = parallel.make_mesh("data:-1", devices=jax.devices()[:2])
    assert small.size == 2 and parallel.data_parallel_size(small) == 2


def test_fsdp_rules_split_the_largest_divisible_dim():
    mesh = parallel.make_mesh("data:2,fsdp:4")
    rules = ShardingRules(min_size=100)
    assert rules.spec("params/w", (12, 64), mesh) == PartitionSpec(None, "fsdp")
    assert rules.spec("params/w", (64, 12), mesh) == PartitionSpec("fsdp")
    assert rules.spec("params/w", (6, 30), mesh) == PartitionSpec()  # nothing divisible by 4
    assert rules.spec("params/b", (64,), mesh) == PartitionSpec()  # below min_size
    assert rules.spec("step", (), mesh) == PartitionSpec()
    no_fsdp = parallel.make_mesh("data:8")
    assert rules.spec("params/w", (12, 64), no_fsdp) == PartitionSpec()  # data parallel


def test_override_rules_and_nnx_metadata():
    mesh = parallel.make_mesh("data:2,fsdp:4")
    rules = ShardingRules.parse("embed=data,fsdp; bias=", min_size=1)
    assert rules.overrides == (("embed", ("data", "fsdp")), ("bias", ()))
    assert rules.spec("params/embed/w", (8, 8), mesh) == PartitionSpec("data", "fsdp")
    assert rules.spec("opt_state/0/mu/bias", (64,), mesh) == PartitionSpec()
    # metadata names: mesh axes are used, logical names ("vocab") mean "not split"
    assert rules.spec("params/k", (8, 8), mesh, names=("vocab", "data")) == PartitionSpec(
        None, "data"
    )
    with pytest.raises(ShardingError, match="does not split over fsdp=4"):
        ShardingRules.parse("w=fsdp").spec("params/w", (6, 8), mesh)
    with pytest.raises(ShardingError, match="not in the mesh"):
        ShardingRules.parse("w=model").spec("params/w", (8, 8), mesh)
    with pytest.raises(ShardingError, match="expected 'regex=axis"):
        ShardingRules.parse("w:fsdp")


class _Annotated(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((8, 16)), out_sharding=("rows", "fsdp"), eager_sharding=False)
        self.b = nnx.Param(jnp.zeros((16,)))

    def __call__(self, x):
        return x @ self.w + self.b


def test_shard_state_reads_nnx_partition_metadata_for_params_and_optimizer_state():
    tx, _ = jdl.make_optimizer("adam", learning_rate=1e-3)
    state = jdl.TrainState.create(_Annotated(), tx)
    mesh = parallel.make_mesh("data:2,fsdp:4")
    placed = parallel.shard_state(state, mesh, ShardingRules(min_size=10**9))
    assert placed.params["w"].value.sharding.spec == PartitionSpec(None, "fsdp")
    assert placed.opt_state[0].mu["w"].value.sharding.spec == PartitionSpec(None, "fsdp")
    assert placed.params["b"].value.sharding.spec == PartitionSpec()
    np.testing.assert_array_equal(placed.params["w"].value, state.params["w"].value)


def _blobs(n=256, seed=0):
    return blobs(n, dim=16, seed=seed)


# One optimizer object for all runs: it is static in the state, so runs with the same
# layout share one compiled program.
_TX, _ = jdl.make_optimizer("adamw", learning_rate=1e-2, weight_decay=1e-4)


def _state():
    return mlp_state(16, (64, 64), 4, tx=_TX)


_STEP = jdl.make_train_step(jdl.classification_loss())


def _fit(workdir, num_steps=6, batch_size=32, train_step=_STEP, **kwargs):
    return jdl.fit(
        _state(),
        train_step=train_step,
        train_data=jdl.InMemoryData(_blobs(), batch_size=batch_size, seed=0),
        num_steps=num_steps,
        log_every=1,
        steps_per_dispatch=3,
        unroll=1,  # a rolled scan compiles faster
        workdir=str(workdir),
        progress=False,
        **kwargs,
    )


def _losses(workdir):
    records = jdl.read_metrics(str(workdir / "metrics.jsonl"))
    return np.array([r["train/loss"] for r in records if "train/loss" in r])


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


@contextlib.contextmanager
def _compile_log():
    """Collects the names of the programs XLA compiles inside the block."""
    names: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record):
            match = re.match(r"Finished XLA compilation of jit\((\w+)\)", record.getMessage())
            if match:
                names.append(match.group(1))

    handler = Handler()
    logger = logging.getLogger("jax._src.dispatch")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield names
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("single")
    return _fit(workdir), _losses(workdir)


@pytest.mark.parametrize("mesh_shape", ["data:8", "data:2,fsdp:4"])
def test_sharded_fit_matches_one_device(single_device, tmp_path, mesh_shape):
    reference, reference_losses = single_device
    mesh = parallel.make_mesh(mesh_shape)
    # A train step of its own: fit caches its compiled chunk programs on the step function, so
    # with the shared _STEP the count below would depend on which tests ran this layout before.
    train_step = jdl.make_train_step(jdl.classification_loss())
    with _compile_log() as compiles:
        result = _fit(tmp_path, mesh=mesh, sharding_rules=RULES, train_step=train_step)
    assert len(reference_losses) == 6
    np.testing.assert_allclose(_losses(tmp_path), reference_losses, rtol=1e-5)
    chex.assert_trees_all_close(result.state.params, reference.state.params, rtol=1e-5, atol=1e-6)
    # the layout survives training: FSDP kernels stay split, the rest replicated
    kernel = result.state.params["hidden"][1]["kernel"].value  # (64, 64)
    nu = result.state.opt_state[0].nu["hidden"][1]["kernel"].value
    fsdp = "fsdp" in mesh.shape
    expected = PartitionSpec("fsdp") if fsdp else PartitionSpec()
    assert kernel.sharding == NamedSharding(mesh, expected)
    assert nu.sharding == NamedSharding(mesh, expected)
    assert len(kernel.addressable_shards[0].data) == (64 // mesh.shape["fsdp"] if fsdp else 64)
    # one compile served all six chunks (inputs and outputs keep the same layout)
    assert compiles.count("run_chunk") == 1


def test_placed_state_keeps_its_layout_without_mesh_argument(single_device, tmp_path):
    reference, _ = single_device
    mesh = parallel.make_mesh("data:2,fsdp:4")
    state = parallel.shard_state(_state(), mesh, RULES)
    result = jdl.fit(
        state,
        train_step=_STEP,
        train_data=jdl.InMemoryData(_blobs(), batch_size=32, seed=0),
        num_steps=6,
        steps_per_dispatch=3,
        unroll=1,
        progress=False,
    )
    kernel = result.state.params["hidden"][0]["kernel"].value  # (16, 64)
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp")
    for got, want in zip(_params(result.state), _params(reference.state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_streamed_batches_follow_the_mesh(tmp_path):
    # fit places a stream's batches itself: split over the batch axes, like in-memory ones.
    def stream_fit(mesh=None):
        data = jdl.StreamingData(_blobs(), batch_size=32, seed=0, prefetch=2)
        result = jdl.fit(
            _state(),
            train_step=_STEP,
            train_data=data,
            num_steps=6,
            steps_per_dispatch=3,
            unroll=1,
            progress=False,
            mesh=mesh,
        )
        return result, data

    reference, _ = stream_fit()
    mesh = parallel.make_mesh("data:8")
    result, data = stream_fit(mesh)
    assert data.sharding == parallel.batch_sharding(mesh)
    for got, want in zip(_params(result.state), _params(reference.state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert result.train_metrics["loss"] == pytest.approx(reference.train_metrics["loss"], rel=1e-5)


@pytest.mark.parametrize("eval_batch_size", [32, 30])  # splits over 8 devices; does not
def test_eval_on_a_mesh_matches_one_device(eval_batch_size):
    loss = jdl.classification_loss()
    evaluate = jdl.make_evaluator(jdl.make_eval_step(loss), eval_batch_size)
    eval_data = _blobs(n=100, seed=1)
    reference = evaluate(_state(), eval_data)
    mesh = parallel.make_mesh("data:8")
    state = parallel.shard_state(_state(), mesh, RULES)
    shardings = parallel.ChunkShardings.of(state, mesh)
    sharded = jdl.make_evaluator(jdl.make_eval_step(loss), eval_batch_size, shardings)
    got = sharded(state, eval_data)
    assert got.keys() == reference.keys()
    for name in got:
        assert got[name] == pytest.approx(reference[name], rel=1e-5), name
    batches, _ = parallel.place_batches(
        (np.zeros((2, eval_batch_size, 3)), np.zeros((2, eval_batch_size))),
        shardings.batch,
    )
    rows_per_device = eval_batch_size // 8 if eval_batch_size % 8 == 0 else eval_batch_size
    assert batches.addressable_shards[0].data.shape == (2, rows_per_device, 3)


def test_device_text_windows_train_on_a_mesh():
    # A language model's token array (RandomWindows) is placed on the mesh too.
    ids = np.random.default_rng(0).integers(0, 16, 2000).astype(np.int32)
    model = jdl.models.CharLM(16, 8, 16, rngs=nnx.Rngs(0))
    tx, _ = jdl.make_optimizer("adam", learning_rate=1e-2)
    step = jdl.make_train_step(charlm_common.lm_loss())

    def window_fit(mesh=None):
        return jdl.fit(
            jdl.TrainState.create(model, tx, seed=0),
            train_step=step,
            train_data=RandomWindows(ids, batch_size=8, seq_len=12, seed=0),
            num_steps=4,
            steps_per_dispatch=2,
            unroll=1,
            progress=False,
            mesh=mesh,
        )

    reference = window_fit()
    result = window_fit(parallel.make_mesh("data:8"))
    for got, want in zip(_params(result.state), _params(reference.state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_batch_size_not_divisible_is_one_error_before_compiling():
    step = jdl.make_train_step(jdl.classification_loss())
    with pytest.raises(ShardingError, match=r"batch_size=12 is not divisible by .* size 8"):
        jdl.fit(
            _state(),
            train_step=step,
            train_data=jdl.InMemoryData(_blobs(), batch_size=12, seed=0),
            num_steps=2,
            mesh=parallel.make_mesh("data:4,fsdp:2"),
            progress=False,
        )
    assert not hasattr(step, "_jdl_chunk_runners")  # nothing was built or compiled


def test_fsdp_checkpoint_restores_onto_four_and_one_device(single_device, tmp_path):
    mesh8 = parallel.make_mesh("data:2,fsdp:4")
    saved = _fit(tmp_path, num_steps=3, mesh=mesh8, sharding_rules=RULES).state
    assert saved.params["hidden"][1]["kernel"].value.sharding.spec == PartitionSpec("fsdp")
    checkpointer = jdl.Checkpointer(tmp_path / "checkpoints")
    try:
        mesh4 = parallel.make_mesh("fsdp:4", devices=jax.devices()[4:])
        target4 = parallel.shard_state(_state(), mesh4, RULES)
        on4 = checkpointer.restore(target4).state
        target1 = jax.device_put(_state(), jax.devices()[0])
        on1 = checkpointer.restore(target1).state
    finally:
        checkpointer.close()
    kernel4 = on4.params["hidden"][1]["kernel"].value
    assert kernel4.sharding == NamedSharding(mesh4, PartitionSpec("fsdp"))
    assert on1.params["hidden"][1]["kernel"].value.devices() == {jax.devices()[0]}
    assert int(on4.step) == int(on1.step) == 3
    for restored in (on4, on1):
        arrays = (restored.params, restored.opt_state, jax.random.key_data(restored.rng))
        expected = (saved.params, saved.opt_state, jax.random.key_data(saved.rng))
        chex.assert_trees_all_equal(arrays, expected)  # same structure, bitwise the same values
    # training goes on from the 4-device copy exactly as an uninterrupted 1-device run
    more4 = _fit(tmp_path, num_steps=6, mesh=mesh4, sharding_rules=RULES).state
    reference, _ = single_device
    for got, want in zip(_params(more4), _params(reference.state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_global_arrays_single_process_equals_sharded_rows():
    mesh = parallel.make_mesh("data:4,fsdp:2")
    data = _blobs(n=100)
    rows = parallel.process_rows(100, mesh)
    assert rows == slice(0, 96)  # cut to a multiple of the 8 batch shards
    arrays = parallel.global_arrays({k: v[rows] for k, v in data.items()}, mesh)
    assert arrays["x"].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(arrays["x"]), data["x"][:96])
    with pytest.raises(ShardingError, match="do not split"):
        parallel.global_arrays({"x": data["x"][:10]}, mesh)


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed("127.0.0.1:1234", 1, 0) is False
    with pytest.raises(ShardingError, match="process id"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, None)


def test_experiment_config_builds_the_mesh_or_one_clear_error():
    from experiments import common

    config = common.base_config()
    assert common.setup_devices(config)[0] is None  # default: one device
    config.mesh_shape, config.fsdp_min_size = "data:-1,fsdp:2", 512
    mesh, rules = common.setup_devices(config)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2} and rules.min_size == 512
    config.batch_size = 100
    with pytest.raises(jdl.ConfigError, match="batch_size=100 is not divisible by"):
        common.setup_devices(config)
    config.sharding_rules = "kernel"
    with pytest.raises(jdl.ConfigError, match="config.sharding_rules"):
        common.check_config(config)


@pytest.mark.slow
def test_scaling_benchmark_prints_a_result_line_per_setting(capsys):
    from benchmarks import scaling

    results = scaling.main(["--devices", "1,2", "--modes", "fsdp", "--quick", "--gpt-mfu", "on"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT")]
    assert lines[-1].startswith("RESULT model=gpt_small precision=bf16 device=cpu")
    lines = lines[:-1]
    assert len(lines) == 2 and set(results) == {("fsdp", 1), ("fsdp", 2)}
    pattern = r"RESULT model=mlp_512 mode=fsdp devices=[12] samples_per_s=[\d.]+ vs_1_device=[\d.]+"
    assert all(re.fullmatch(pattern, line) for line in lines)
    assert all(rate > 0 for rate in results.values())
