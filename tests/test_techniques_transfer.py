"""Fine-tuning helpers: new head, frozen backbone, layer-wise learning rates, batch-norm modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdl
from jdl import hf
from jdl.models import CNN, GPT, BasicBlock, ResNet, ViT
from jdl.techniques import transfer

# Built once per module (eager initialisation compiles many small programs) and cloned.
_MODELS = {}


def _cached(name, build):
    if name not in _MODELS:
        _MODELS[name] = build()
    return nnx.clone(_MODELS[name])


def tiny_resnet():
    return _cached(
        "resnet",
        lambda: ResNet((1, 1), BasicBlock, 3, width=4, stem="cifar", rngs=nnx.Rngs(0)),
    )


def tiny_cnn():
    return _cached(
        "cnn",
        lambda: CNN(
            1, 3, input_shape=(8, 8), conv_channels=(4, 8), dense_sizes=(16,), rngs=nnx.Rngs(0)
        ),
    )


def image_batch(channels, size=8, batch=4, num_classes=3):
    x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
    return {"x": x, "y": jnp.arange(batch, dtype=jnp.int32) % num_classes}


def one_step(model, tx, batch, loss_fn=None):
    state = jdl.TrainState.create(model, tx)
    step = jax.jit(jdl.make_train_step(loss_fn or jdl.classification_loss()))
    new_state, metrics = step(state, batch)
    return state, new_state, metrics


def flat_params(params):
    return {
        transfer.param_path(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


def test_replace_head_keeps_backbone_and_changes_outputs():
    model = tiny_resnet()
    before = flat_params(nnx.state(model, nnx.Param))
    transfer.replace_head(model, 7, rngs=nnx.Rngs(5))
    after = flat_params(nnx.state(model, nnx.Param))
    assert after["head/kernel"].shape == (8, 7) and after["head/bias"].shape == (7,)
    for name, value in before.items():
        if not name.startswith("head/"):
            np.testing.assert_array_equal(after[name], value)
    assert model(image_batch(3)["x"]).shape == (4, 7)
    bound = 1 / np.sqrt(8)
    assert np.abs(after["head/kernel"]).max() <= bound


def test_replace_head_errors():
    # Shapes suffice: the errors come before any weight is read.
    gpt = nnx.eval_shape(lambda: GPT(40, 8, 16, 2, 1, rngs=nnx.Rngs(0)))  # tied: no head
    with pytest.raises(ValueError, match="no dense `head`"):
        transfer.replace_head(gpt, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes"):
        transfer.replace_head(
            nnx.eval_shape(lambda: ViT(8, 4, 1, 3, 16, 2, 1, rngs=nnx.Rngs(0))), 0, rngs=nnx.Rngs(0)
        )


def test_from_pretrained_local_directory_with_new_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
    )
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path)
    original = hf.load_pretrained(tmp_path)
    model = transfer.from_pretrained(str(tmp_path), num_classes=2, seed=3)
    assert model.head.out_features == 2 and original.head.out_features == 5
    ours, theirs = (
        flat_params(nnx.state(model, nnx.Param)),
        flat_params(nnx.state(original, nnx.Param)),
    )
    np.testing.assert_array_equal(ours["stem_conv/kernel"], theirs["stem_conv/kernel"])
    # Same checkpoint, same class count: the checkpoint's head is kept.
    same = transfer.from_pretrained(tmp_path, num_classes=5)
    np.testing.assert_array_equal(
        flat_params(nnx.state(same, nnx.Param))["head/kernel"], theirs["head/kernel"]
    )


def test_freeze_all_but_head_updates_only_the_head():
    model = tiny_resnet()
    tx = transfer.freeze_all_but(optax.adam(1e-2), trainable=("head",))
    state, new_state, _ = one_step(model, tx, image_batch(3))
    before, after = flat_params(state.params), flat_params(new_state.params)
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        assert changed == name.startswith("head/"), name
    # Adam moments exist for the head only: 2 moments x (kernel + bias).
    moment_leaves = [x for x in jax.tree.leaves(new_state.opt_state) if np.ndim(x) > 0]
    assert len(moment_leaves) == 4


def test_freeze_with_unknown_prefix_is_an_error():
    tx = transfer.freeze_all_but(optax.sgd(0.1), trainable=("classifier",))
    with pytest.raises(ValueError, match="no parameter path starts with"):
        jdl.TrainState.create(tiny_cnn(), tx)


def test_prefixes_match_whole_path_components():
    params = {"stages": {"1": {"w": 0.0}, "10": {"w": 0.0}}}
    mask = transfer.trainable_mask(params, ["stages/1"])
    assert mask == {"stages": {"1": {"w": True}, "10": {"w": False}}}


def test_layerwise_lr_decay_scales_sgd_updates_per_layer():
    """With plain SGD the update is -lr * grad, so update / grad recovers each group's rate."""
    model = tiny_cnn()
    groups = transfer.layer_groups(model)
    assert groups == [["convs/0"], ["convs/1"], ["dense/0"], ["head"]]
    tx = transfer.layerwise_lr_decay(optax.sgd, groups, base_lr=0.1, decay=0.5)
    rates = transfer.layer_learning_rates(4, base_lr=0.1, decay=0.5)
    assert rates == pytest.approx([0.0125, 0.025, 0.05, 0.1])

    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name, update in flat_params(updates).items():
        group = next(k for k, prefixes in enumerate(groups) if name.startswith(prefixes[0]))
        np.testing.assert_allclose(update, -rates[group], rtol=1e-6)


def test_layerwise_lr_decay_with_frozen_and_missing_groups():
    model = tiny_cnn()
    tx = transfer.layerwise_lr_decay(
        optax.sgd, [["dense"], ["head"]], base_lr=0.1, decay=0.1, frozen=("convs",)
    )
    params = nnx.state(model, nnx.Param)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    flat = flat_params(updates)
    assert all(np.all(v == 0) for k, v in flat.items() if k.startswith("convs/"))
    np.testing.assert_allclose(flat["dense/0/kernel"], -0.01, rtol=1e-6)
    incomplete = transfer.layerwise_lr_decay(optax.sgd, [["head"]], base_lr=0.1, decay=0.5)
    with pytest.raises(ValueError, match="belongs to no layer group"):
        incomplete.init(params)
    with pytest.raises(ValueError, match="decay"):
        transfer.layerwise_lr_decay(optax.sgd, [["head"]], base_lr=0.1, decay=0.0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ResNet((1, 2), BasicBlock, 3, width=4, stem="cifar", rngs=nnx.Rngs(0)),
        lambda: ViT(8, 4, 1, 3, 16, 2, 2, rngs=nnx.Rngs(0)),
        lambda: GPT(40, 8, 16, 2, 2, tie_embeddings=False, rngs=nnx.Rngs(0)),
    ],
    ids=["resnet", "vit", "gpt"],
)
def test_default_layer_groups_cover_every_parameter(build):
    model = nnx.eval_shape(build)  # shapes suffice: no weights are computed
    groups = transfer.layer_groups(model)
    tx = transfer.layerwise_lr_decay(optax.adam, groups, base_lr=1e-3, decay=0.7)
    jax.eval_shape(tx.init, nnx.state(model, nnx.Param))  # raises if a parameter has no group
    assert groups[-1][-1] == "head" and len(groups) == 2 + len(
        getattr(model, "blocks", []) or model.stages
    )


def batch_stats(state):
    return {k: v for k, v in flat_params(state.model_state).items() if k.endswith(("mean", "var"))}


def test_batch_norm_statistics_frozen_or_updated_by_choice():
    model = tiny_resnet()
    batch = image_batch(3)
    tx = optax.sgd(0.0)  # no parameter change: only the BN mode differs between runs
    loss_fn = jdl.classification_loss()
    state, updated, updated_metrics = one_step(model, tx, batch, loss_fn)
    _, frozen, frozen_metrics = one_step(model, tx, batch, transfer.with_frozen_batch_norm(loss_fn))

    before = batch_stats(state)
    assert before  # the model has BN statistics
    for name, value in before.items():
        np.testing.assert_array_equal(batch_stats(frozen)[name], value)
    assert any(not np.array_equal(batch_stats(updated)[n], v) for n, v in before.items())

    # Frozen BN in train mode computes exactly the eval-mode loss.
    eval_loss = np.mean(np.asarray(jdl.make_eval_step(loss_fn)(state, batch)["loss"]))
    np.testing.assert_allclose(float(frozen_metrics["loss"]), eval_loss, rtol=1e-5)
    assert abs(float(updated_metrics["loss"]) - eval_loss) > 1e-4


def test_set_batch_norm_frozen_toggles_modules():
    model = tiny_resnet()
    model.train()
    transfer.set_batch_norm_frozen(model, True)
    norms = [m for _, m in model.iter_modules() if isinstance(m, nnx.BatchNorm)]
    assert norms and all(m.use_running_average for m in norms)
    transfer.set_batch_norm_frozen(model, False)
    assert not any(m.use_running_average for m in norms)


@pytest.mark.slow  # about 30 s of CPU: a training run plus compiles
def test_transfer_digits_experiment_smoke(tmp_path, monkeypatch, capsys):
    from experiments import transfer_digits

    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "no-data"))
    assert "python -m experiments.transfer_digits" in transfer_digits.__doc__
    final = transfer_digits.main(
        [
            "--config.duration=2",
            "--config.finetune_steps=2",
            "--config.num_seeds=1",
            "--config.download=false",
            "--config.progress=false",
            "--config.compilation_cache=false",
            "--workdir",
            str(tmp_path / "run"),
        ]
    )
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FINAL ")
    assert len(final["finetune_accuracy"]) == len(final["scratch_accuracy"]) == 1
    assert 0 <= final["finetune_mean"] <= 1
    with pytest.raises(SystemExit, match="finetune_batch_size"):
        transfer_digits.main(["--config.finetune_batch_size=101", "--workdir", str(tmp_path / "b")])
