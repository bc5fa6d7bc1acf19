"""Precision policy (bf16 compute, fp32 master weights) and micro-batched train steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from support import blobs as _blobs

import jdl
from jdl import precision as precision_lib


class _NormNet(nnx.Module):
    """Dense - BatchNorm - ReLU - dense: has model state (running statistics)."""

    def __init__(self, *, rngs):
        self.dense = nnx.Linear(8, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.head = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.norm(self.dense(x))))


def _state(model=None, tx=None, seed=0):
    model = model or jdl.models.MLP(8, (32,), 4, rngs=nnx.Rngs(seed))
    return jdl.TrainState.create(model, tx or optax.adam(1e-2), seed=seed)


def _batch(n=64):
    return {name: jnp.asarray(value[:n]) for name, value in _blobs().items()}


def _float_dtypes(tree):
    return {
        jnp.dtype(x.dtype)
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    }


def test_get_policy():
    assert precision_lib.get_policy("bf16").compute_dtype == jnp.bfloat16
    assert precision_lib.get_policy(None).compute_dtype == jnp.float32
    assert precision_lib.get_policy("auto").name == "fp32"  # the tests run on CPU
    with pytest.raises(ValueError, match="precision must be one of"):
        precision_lib.get_policy("fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        jdl.make_train_step(jdl.classification_loss(), precision="half")


def test_bf16_step_computes_in_bf16_and_keeps_fp32_state():
    seen = {}

    def loss_fn(model, batch):
        seen["x"] = batch["x"].dtype  # recorded while tracing
        seen["kernel"] = model.hidden[0].kernel.dtype
        return jdl.classification_loss()(model, batch)

    step = jax.jit(jdl.make_train_step(loss_fn, precision="bf16"))
    state = _state()
    new_state, metrics = step(state, _batch())
    assert seen == {"x": jnp.bfloat16, "kernel": jnp.bfloat16}
    assert _float_dtypes(new_state.params) == {jnp.dtype(jnp.float32)}
    assert _float_dtypes(new_state.opt_state) == {jnp.dtype(jnp.float32)}
    assert all(v.dtype == jnp.float32 for v in metrics.values())
    assert new_state.step.dtype == jnp.int32


def _dot_operand_dtypes(jaxpr) -> set[tuple[str, ...]]:
    """The operand dtypes of every dot_general in `jaxpr` and the jaxprs inside it."""
    dtypes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            dtypes.add(tuple(str(var.aval.dtype) for var in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    dtypes |= _dot_operand_dtypes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    dtypes |= _dot_operand_dtypes(sub)
    return dtypes


@pytest.mark.parametrize(
    "build",
    [
        lambda rngs: jdl.models.gpt_tiny(rngs=rngs),  # untied head: token_embed.attend
        lambda rngs: jdl.models.GPT(64, 16, 32, 2, 1, tie_embeddings=False, rngs=rngs),
        lambda rngs: jdl.models.CharLM(64, 16, 32, 1, cell_type="lstm", rngs=rngs),
    ],
    ids=["gpt_tied", "gpt_untied", "char_lstm"],
)
def test_bf16_models_with_embeddings_multiply_in_bf16(build):
    # flax's nnx.Embed fixes float32 as its compute dtype when built; the policy must
    # override it, or everything after the embedding silently runs in float32.
    from experiments.charlm_common import lm_loss

    model = build(nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    batch = {"x": tokens, "y": tokens}
    state = jdl.TrainState.create(model, optax.adam(1e-3))
    all_fp32 = ("float32", "float32")
    for precision in ("bf16", "fp32"):
        for make_step in (jdl.make_train_step, jdl.make_eval_step):
            step = make_step(lm_loss(), precision=precision)
            dots = _dot_operand_dtypes(jax.make_jaxpr(step)(state, batch).jaxpr)
            if precision == "fp32":
                assert dots == {all_fp32}
            else:  # (the backward of jax's attention multiplies its fp32 softmax by bf16)
                assert ("bfloat16", "bfloat16") in dots and all_fp32 not in dots, dots
    embeddings = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Embed)]
    assert embeddings and all(m.dtype == jnp.float32 for m in embeddings)  # model untouched


def test_bf16_keeps_batch_norm_statistics_fp32():
    state = _state(_NormNet(rngs=nnx.Rngs(0)))
    step = jax.jit(jdl.make_train_step(jdl.classification_loss(), precision="bf16"))
    new_state, _ = step(state, _batch())
    assert _float_dtypes(new_state.model_state) == {jnp.dtype(jnp.float32)}
    before = jax.tree.leaves(state.model_state)
    after = jax.tree.leaves(new_state.model_state)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_bf16_loss_and_gradient_close_to_fp32():
    state, batch = _state(), _batch()
    loss = jdl.classification_loss()
    fp32 = jax.jit(jdl.make_train_step(loss))(state, batch)[1]
    bf16 = jax.jit(jdl.make_train_step(loss, precision="bf16"))(state, batch)[1]
    # bfloat16 keeps 8 significant bits: relative errors of about 2**-8 per operation.
    np.testing.assert_allclose(bf16["loss"], fp32["loss"], rtol=2e-2)
    np.testing.assert_allclose(bf16["grad_norm"], fp32["grad_norm"], rtol=5e-2)
    assert bf16["loss"] != fp32["loss"], "bf16 must actually change the arithmetic"
    evaluate = jax.jit(jdl.make_eval_step(loss, precision="bf16"))
    values = evaluate(state, batch)
    assert values["loss"].dtype == jnp.float32 and values["loss"].shape == (64,)
    np.testing.assert_allclose(
        values["loss"].mean(), jdl.make_eval_step(loss)(state, batch)["loss"].mean(), rtol=2e-2
    )


def test_bf16_training_lowers_the_loss():
    loss = jdl.classification_loss()
    result = jdl.fit(
        _state(),
        train_step=jdl.make_train_step(loss, precision="bf16"),
        train_data=jdl.InMemoryData(_blobs(), batch_size=32, seed=0),
        num_steps=40,
        log_every=40,
        steps_per_dispatch=8,
        progress=False,
    )
    initial = jdl.make_eval_step(loss)(_state(), _batch(256))["loss"].mean()
    final = jdl.make_eval_step(loss)(result.state, _batch(256))
    assert final["loss"].mean() < 0.3 * initial
    assert final["accuracy"].mean() > 0.9


# micro-batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("micro_batches", [2, 8])
def test_micro_batches_give_the_full_batch_update(micro_batches):
    # With SGD(lr=1) the update is the gradient itself; MLP without dropout or batch norm.
    state, batch = _state(tx=optax.sgd(1.0)), _batch(64)
    loss = jdl.classification_loss()
    full_state, full = jax.jit(jdl.make_train_step(loss))(state, batch)
    step = jax.jit(jdl.make_train_step(loss, micro_batches=micro_batches))
    micro_state, micro = step(state, batch)
    for name in ("loss", "accuracy", "grad_norm", "param_norm"):
        np.testing.assert_allclose(micro[name], full[name], rtol=1e-5, err_msg=name)
    for a, b in zip(
        jax.tree.leaves(micro_state.params), jax.tree.leaves(full_state.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(micro_state.step) == 1


def test_micro_batches_combine_with_bf16_and_update_batch_norm_statistics():
    state = _state(_NormNet(rngs=nnx.Rngs(0)))
    step = jax.jit(
        jdl.make_train_step(jdl.classification_loss(), precision="bf16", micro_batches=4)
    )
    new_state, metrics = step(state, _batch(64))
    assert _float_dtypes(new_state.params) == {jnp.dtype(jnp.float32)}
    assert _float_dtypes(new_state.model_state) == {jnp.dtype(jnp.float32)}
    assert np.isfinite(metrics["loss"])
    # The running mean moved four times (momentum 0.99): (1 - 0.99**4) of the way.
    mean = new_state.model_state["norm"]["mean"][...]
    assert float(jnp.max(jnp.abs(mean))) > 0


def test_micro_batch_errors():
    loss = jdl.classification_loss()
    with pytest.raises(ValueError, match="micro_batches must be an integer >= 1"):
        jdl.make_train_step(loss, micro_batches=0)
    with pytest.raises(ValueError, match="not a multiple of micro_batches=3"):
        jdl.make_train_step(loss, micro_batches=3)(_state(), _batch(64))


# experiments config -------------------------------------------------------------------------


def test_experiment_trains_with_bf16_and_micro_batches(tmp_path, capsys):
    from experiments import iris_mlp

    final = iris_mlp.main(
        [
            "--config.duration=2",
            "--config.precision=bf16",
            "--config.micro_batches=2",
            "--config.batch_size=16",
            "--config.progress=false",
            "--config.compilation_cache=false",
            "--config.steps_per_dispatch=1",
            "--workdir",
            str(tmp_path),
        ]
    )
    assert final["steps"] == 2 and np.isfinite(final["train_loss"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FINAL ")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.precision=fp16"], "precision='fp16' must be fp32, bf16 or auto"),
        (["--config.micro_batches=3", "--config.batch_size=16"], "micro_batches=3 must be"),
    ],
)
def test_experiment_rejects_bad_precision_and_micro_batches(overrides, message, tmp_path):
    from experiments import iris_mlp

    with pytest.raises(SystemExit, match=message):
        iris_mlp.main([*overrides, "--workdir", str(tmp_path)])
