"""Knowledge distillation (Hinton, Vinyals and Dean, 2015) as a `jdl` loss function.

A trained *teacher* is frozen and run inside the student's jitted training step, so the
soft targets are computed on device for exactly the (augmented) batch the student sees,
with no host round trip and no precomputed logits. The student minimises

    loss = alpha * T**2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

per example, where `s` and `t` are the student's and teacher's logits. The `T**2` factor
keeps the soft-target gradients at the same scale as `T` changes (the paper's advice).

Usage:

    teacher_state = jdl.fit(...).state          # or any trained TrainState / nnx.Module
    loss_fn = distillation_loss(teacher_state, temperature=4.0, alpha=0.9)
    train_step = jdl.make_train_step(loss_fn)   # the student's state is what `fit` trains
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jdl import losses as losses_lib
from jdl import metrics as metrics_lib
from jdl.state import TrainState
from jdl.steps import LossFn


def distillation_terms(
    *,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    temperature: float,
    alpha: float,
) -> dict[str, jax.Array]:
    """The per-example distillation loss and its two parts.

    Args:
      student_logits: float (B, C).
      teacher_logits: float (B, C); treated as constants (gradients are stopped).
      labels: int (B,) hard labels in [0, C).
      temperature: T > 0, softens both distributions in the KL term.
      alpha: weight in [0, 1] of the soft (KL) term; `1 - alpha` weights the hard CE.

    Returns:
      {"loss": alpha * T**2 * kl + (1 - alpha) * hard_xent, "distill_kl": kl
        (KL(teacher_T || student_T), not scaled), "hard_xent": CE at T = 1}, each (B,) float32.
    """
    kl = losses_lib.kl_divergence(
        logits=student_logits,
        target_logits=jax.lax.stop_gradient(teacher_logits),
        temperature=temperature,
    )
    hard = losses_lib.softmax_xent(logits=student_logits, labels=labels)
    loss = alpha * temperature**2 * kl + (1.0 - alpha) * hard
    return {"loss": loss, "distill_kl": kl, "hard_xent": hard}


def distillation_loss(
    teacher: TrainState | nnx.Module,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> LossFn:
    """A `jdl` loss function that distils `teacher` into the model being trained.

    The teacher runs in eval mode (dropout off, batch-norm statistics fixed) on the same
    batch as the student. Its arrays are captured once, when the training step is traced;
    no gradient reaches them and no optimizer state exists for them.

    Args:
      teacher: a trained `TrainState` (its params and model state are used) or an NNX
        module; either way a copy is taken now, so later changes to it do not leak in.
      temperature: softmax temperature T > 0 of the soft targets.
      alpha: weight in [0, 1] of the soft term (see `distillation_terms`).

    Returns:
      `loss_fn(student, batch) -> per-example dict` reading batch["x"] and batch["y"] (int
      labels); entries "loss", "distill_kl", "hard_xent", "accuracy" (student) and
      "teacher_agreement" (student and teacher predict the same class).

    Raises:
      ValueError: temperature <= 0 or alpha outside [0, 1].
      TypeError: teacher is neither a TrainState nor an NNX module.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    graphdef, teacher_arrays = _frozen_copy(teacher)

    def loss_fn(student: nnx.Module, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        teacher_model = nnx.merge(graphdef, *teacher_arrays, copy=True)
        teacher_model.eval()
        teacher_logits = teacher_model(batch["x"])  # (B, C)
        student_logits = student(batch["x"])  # (B, C)
        terms = distillation_terms(
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            labels=batch["y"],
            temperature=temperature,
            alpha=alpha,
        )
        agree = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
        return terms | {
            "accuracy": metrics_lib.accuracy(logits=student_logits, labels=batch["y"]),
            "teacher_agreement": agree.astype(jnp.float32),
        }

    return loss_fn


def _frozen_copy(teacher: TrainState | nnx.Module) -> tuple[nnx.GraphDef, tuple]:
    """(graphdef, (params, other state)) copies of the teacher's arrays."""
    if isinstance(teacher, TrainState):
        graphdef, arrays = teacher.graphdef, (teacher.params, teacher.model_state)
    elif isinstance(teacher, nnx.Module):
        graphdef, params, rest = nnx.split(teacher, nnx.Param, ...)
        arrays = (params, rest)
    else:
        raise TypeError(
            f"teacher must be a jdl.TrainState or an nnx.Module, got {type(teacher).__name__}"
        )
    return graphdef, jax.tree.map(jnp.array, arrays)
