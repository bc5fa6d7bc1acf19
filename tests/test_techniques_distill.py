"""Knowledge distillation: the loss against torch and hand math, gradients, the experiment."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import jdl
from jdl.techniques import distill


def _logits(seed, shape=(6, 5), scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (4.0, 0.9), (2.5, 1.0), (3.0, 0.0)])
def test_loss_matches_torch_kl_div_with_log_target(temperature, alpha):
    student, teacher = _logits(0), _logits(1)
    labels = np.array([0, 1, 2, 3, 4, 0])
    terms = distill.distillation_terms(
        student_logits=jnp.asarray(student),
        teacher_logits=jnp.asarray(teacher),
        labels=jnp.asarray(labels),
        temperature=temperature,
        alpha=alpha,
    )
    s, t = torch.tensor(student), torch.tensor(teacher)
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    hard = F.cross_entropy(s, torch.tensor(labels), reduction="none")
    expected = alpha * temperature**2 * kl + (1 - alpha) * hard
    np.testing.assert_allclose(terms["distill_kl"], kl.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms["hard_xent"], hard.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms["loss"], expected.numpy(), rtol=1e-5, atol=1e-6)
    # torch's batchmean reduction is the mean of our per-example values
    batchmean = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        reduction="batchmean",
        log_target=True,
    )
    assert float(jnp.mean(terms["distill_kl"])) == pytest.approx(float(batchmean), rel=1e-5)


def test_loss_by_hand_for_two_classes():
    # student logits (0, 0) -> q = (1/2, 1/2); teacher (ln 3, 0) at T=1 -> p = (3/4, 1/4)
    terms = distill.distillation_terms(
        student_logits=jnp.zeros((1, 2)),
        teacher_logits=jnp.array([[np.log(3.0), 0.0]]),
        labels=jnp.array([1]),
        temperature=1.0,
        alpha=0.25,
    )
    kl = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    assert float(terms["distill_kl"][0]) == pytest.approx(kl, rel=1e-6)
    assert float(terms["loss"][0]) == pytest.approx(0.25 * kl + 0.75 * np.log(2), rel=1e-6)


def _mlp(seed, hidden=(8,)):
    return jdl.models.MLP(4, hidden, 3, rngs=nnx.Rngs(seed))


def _batch():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    return {"x": x, "y": jnp.array([0, 1, 2, 1, 0])}


def test_gradient_flows_to_the_student_only():
    teacher, student = _mlp(0, (16,)), _mlp(1)
    batch = _batch()
    t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
    s_graph, s_params, s_rest = nnx.split(student, nnx.Param, ...)

    def total(student_params, teacher_params):
        loss_fn = distill.distillation_loss(
            nnx.merge(t_graph, teacher_params, t_rest), temperature=2.0, alpha=0.7
        )
        return jnp.mean(loss_fn(nnx.merge(s_graph, student_params, s_rest), batch)["loss"])

    student_grads, teacher_grads = jax.jit(jax.grad(total, argnums=(0, 1)))(s_params, t_params)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(teacher_grads))
    assert optax.global_norm(student_grads) > 0


def test_teacher_runs_inside_the_jitted_step_and_stays_fixed():
    teacher = _mlp(0, (16,))
    teacher_state = jdl.TrainState.create(teacher, optax.sgd(0.1), seed=0)
    student_state = jdl.TrainState.create(_mlp(1), optax.sgd(0.5), seed=0)
    loss_fn = distill.distillation_loss(teacher_state, temperature=3.0, alpha=0.8)
    step = jax.jit(jdl.make_train_step(loss_fn))
    batch = _batch()
    teacher_logits = teacher(batch["x"])
    before = float(jnp.mean(loss_fn(student_state.model(), batch)["distill_kl"]))
    for _ in range(30):
        student_state, metrics = step(student_state, batch)
    after = float(jnp.mean(loss_fn(student_state.model(), batch)["distill_kl"]))
    assert after < 0.5 * before  # the student moves towards the teacher
    np.testing.assert_array_equal(teacher(batch["x"]), teacher_logits)
    assert set(metrics) >= {"loss", "distill_kl", "hard_xent", "accuracy", "teacher_agreement"}


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": 0.0}, "temperature"), ({"alpha": 1.5}, "alpha")],
)
def test_bad_hyperparameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distill.distillation_loss(_mlp(0), **kwargs)


def test_teacher_of_the_wrong_type_is_rejected():
    with pytest.raises(TypeError, match="teacher must be"):
        distill.distillation_loss({"params": 1})


def test_experiment_smoke(tmp_path, capsys, monkeypatch):
    from experiments import distill_mnist

    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "no-data"))
    assert "python -m experiments.distill_mnist" in distill_mnist.__doc__
    final = distill_mnist.main(
        [
            "--config.duration=2",
            "--config.num_seeds=1",
            "--config.teacher_hidden=(32,)",
            "--config.student_hidden=(8,)",
            "--config.steps_per_dispatch=1",
            "--config.compilation_cache=false",
            "--config.download=false",
            "--workdir",
            str(tmp_path / "run"),
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("FINAL ") and json.loads(last[6:]) == final
    assert len(final["student_distilled_accuracy"]) == 1
    assert (tmp_path / "run" / "seed0" / "student_distilled" / "checkpoints").exists()


def test_experiment_rejects_bad_alpha(tmp_path):
    from experiments import distill_mnist

    with pytest.raises(SystemExit, match=r"config.alpha=2.0 must be in \[0, 1\]"):
        distill_mnist.main(["--config.alpha=2", "--workdir", str(tmp_path)])
