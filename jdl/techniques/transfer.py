"""Transfer learning: pretrained weights in, a new head on, fine-tuning with frozen or slow layers.

The usual recipe, each step one function:

    model = from_pretrained("microsoft/resnet-18", num_classes=10)   # or a local directory
    tx = freeze_all_but(optax.adam(1e-3), trainable=("head",))       # 1. train the head only
    ...
    groups = layer_groups(model)                                     # 2. unfreeze everything,
    tx = layerwise_lr_decay(optax.adam, groups, base_lr=1e-4, decay=0.5)  # lower layers slower
    loss_fn = with_frozen_batch_norm(jdl.classification_loss())     # BN statistics kept fixed

Parameters are named by their path in the model's `nnx.State`, joined with "/", e.g.
"stages/0/1/bn2/scale" or "head/kernel". A *prefix* matches whole path components:
"stages/1" matches "stages/1/0/conv1/kernel" but not "stages/10/...".

Optimizers built here take the `params` tree of a `jdl.TrainState` (an `nnx.State` of
`nnx.Param`s) and go straight into `TrainState.create(model, tx)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import optax
from flax import nnx

from jdl import hf
from jdl.models.cnn import CNN
from jdl.models.initializers import uniform_init
from jdl.models.resnet import ResNet
from jdl.models.transformer import GPT
from jdl.models.vit import ViT
from jdl.steps import LossFn

FROZEN = "frozen"
TRAINABLE = "trainable"


def from_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    seed: int = 0,
    revision: str | None = None,
) -> nnx.Module:
    """A jdl model holding a Hugging Face checkpoint's weights (see `jdl.hf`), in eval mode.

    Args:
      name_or_path: a local checkpoint directory (`config.json` plus safetensors or
        `pytorch_model.bin`; works offline) or a Hub id, downloaded when online.
      num_classes: if given and different from the checkpoint's, the classifier head is
        replaced by a freshly initialised one with this many outputs.
      seed: seed of the new head's initialisation.
      revision: Hub branch, tag or commit.

    Raises:
      jdl.hf.PretrainedUnavailableError: no such directory, or the Hub is unreachable.
      jdl.hf.CheckpointFormatError: the checkpoint does not map onto a jdl model.
    """
    model = hf.load_pretrained(name_or_path, revision=revision)
    head = getattr(model, "head", None)
    if num_classes is not None and not (
        isinstance(head, nnx.Linear) and head.out_features == num_classes
    ):
        replace_head(model, num_classes, rngs=nnx.Rngs(params=seed))
    return model


def replace_head(model: nnx.Module, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """Swaps the model's final dense layer `model.head` for a new one with `num_classes` outputs.

    The new layer keeps the input width and has PyTorch's default initialisation
    (uniform in +-1/sqrt(fan_in) for kernel and bias). Works for every jdl classifier
    with a dense `head` (CNN, ResNet, ViT, EncoderClassifier, a GPT with an untied head).

    Returns:
      `model`, modified in place.

    Raises:
      ValueError: the model has no dense `head`, or `num_classes < 1`.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    head = getattr(model, "head", None)
    if not isinstance(head, nnx.Linear):
        raise ValueError(
            f"{type(model).__name__} has no dense `head` to replace (a GPT with tied "
            "embeddings has none)"
        )
    bound = 1.0 / head.in_features**0.5
    model.head = nnx.Linear(
        head.in_features,
        num_classes,
        use_bias=head.bias is not None,
        kernel_init=uniform_init(bound),
        bias_init=uniform_init(bound),
        rngs=rngs,
    )
    return model


# ---------------------------------------------------------------------------------------------
# Selecting parameters by path
# ---------------------------------------------------------------------------------------------


def param_path(path: tuple) -> str:
    """A pytree key path of an `nnx.State` leaf as "a/b/c" (the trailing ".value" dropped)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
            continue
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(name))
    return "/".join(parts)


def _matches(path: str, prefix: str) -> bool:
    prefix = prefix.strip("/")
    return path == prefix or path.startswith(prefix + "/")


def label_params(params, label_of: Callable[[str], str]):
    """The tree of `label_of(path)` strings, shaped like `params` (for `optax.multi_transform`)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: label_of(param_path(path)), params)


def trainable_mask(params, trainable: Sequence[str]):
    """A tree of bools shaped like `params`: True under any of the `trainable` prefixes."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(_matches(param_path(path), p) for p in trainable), params
    )


def freeze_all_but(
    tx: optax.GradientTransformation, *, trainable: Sequence[str] = ("head",)
) -> optax.GradientTransformation:
    """`tx` on the parameters under the `trainable` prefixes; zero updates for all others.

    Frozen parameters get no optimizer state (`optax.set_to_zero`), so they cost no
    memory for moments, and weight decay inside `tx` does not touch them either.

    Raises (when the optimizer is initialised):
      ValueError: no parameter matches any prefix (a typo would otherwise freeze everything).
    """
    trainable = tuple(trainable)

    def labels(params):
        mask = trainable_mask(params, trainable)
        if not any(jax.tree.leaves(mask)):
            raise ValueError(f"no parameter path starts with any of {trainable}")
        return jax.tree.map(lambda keep: TRAINABLE if keep else FROZEN, mask)

    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay
# ---------------------------------------------------------------------------------------------


def layer_groups(model: nnx.Module) -> list[list[str]]:
    """Path prefixes of a model's layers, from the input (first) to the output (last).

    ResNet: stem, one group per stage, head. ViT and GPT: embeddings, one group per
    block, final norm + head. CNN: one group per conv, one per hidden dense layer, head.

    Raises:
      ValueError: for other models (pass your own groups to `layerwise_lr_decay`).
    """
    if isinstance(model, ResNet):
        stages = [[f"stages/{i}"] for i in range(len(model.stages))]
        return [["stem_conv", "stem_bn"], *stages, ["head"]]
    if isinstance(model, ViT | GPT):
        embeds = ["patch_embed", "cls_token"] if isinstance(model, ViT) else ["token_embed"]
        blocks = [[f"blocks/{i}"] for i in range(len(model.blocks))]
        return [[*embeds, "position_embed"], *blocks, ["ln_f", "head"]]
    if isinstance(model, CNN):
        convs = [[f"convs/{i}"] for i in range(len(model.convs))]
        dense = [[f"dense/{i}"] for i in range(len(model.dense))]
        return [*convs, *dense, ["head"]]
    raise ValueError(f"no default layer groups for {type(model).__name__}; pass them explicitly")


def layer_learning_rates(num_groups: int, *, base_lr: float, decay: float) -> list[float]:
    """`base_lr * decay**(num_groups - 1 - k)` for group k: the top group gets `base_lr`."""
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    return [base_lr * decay ** (num_groups - 1 - k) for k in range(num_groups)]


def layerwise_lr_decay(
    make_tx: Callable[[float], optax.GradientTransformation],
    groups: Sequence[Sequence[str]],
    *,
    base_lr: float,
    decay: float,
    frozen: Sequence[str] = (),
) -> optax.GradientTransformation:
    """One optimizer per layer group, with learning rates shrinking towards the input.

    Args:
      make_tx: builds the optimizer for a learning rate, e.g. `optax.adam` or
        `lambda lr: optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)`.
      groups: path prefixes per layer group, input first (see `layer_groups`).
      base_lr: learning rate of the last group (the head).
      decay: factor per group towards the input (e.g. 0.5; 1 means one rate for all).
      frozen: prefixes that get no updates at all (checked before the groups).

    Raises (when the optimizer is initialised):
      ValueError: a parameter belongs to no group and is not frozen.
    """
    rates = layer_learning_rates(len(groups), base_lr=base_lr, decay=decay)
    transforms = {f"group_{k}": make_tx(lr) for k, lr in enumerate(rates)}
    transforms[FROZEN] = optax.set_to_zero()

    def label_of(path: str) -> str:
        if any(_matches(path, prefix) for prefix in frozen):
            return FROZEN
        for k, prefixes in enumerate(groups):
            if any(_matches(path, prefix) for prefix in prefixes):
                return f"group_{k}"
        raise ValueError(f"parameter {path!r} belongs to no layer group; groups: {list(groups)}")

    return optax.multi_transform(transforms, lambda params: label_params(params, label_of))


# ---------------------------------------------------------------------------------------------
# Batch norm during fine-tuning
# ---------------------------------------------------------------------------------------------


def set_batch_norm_frozen(model: nnx.Module, frozen: bool = True) -> nnx.Module:
    """Makes every `nnx.BatchNorm` normalise with its running statistics (frozen) or not.

    Frozen batch norm neither uses nor updates batch statistics, whatever mode the rest
    of the model is in; `model.train()` / `model.eval()` called afterwards override it.
    Returns `model`, modified in place.
    """
    for _, module in model.iter_modules():
        if isinstance(module, nnx.BatchNorm):
            module.use_running_average = frozen
    return model


def with_frozen_batch_norm(loss_fn: LossFn) -> LossFn:
    """`loss_fn` with batch norm frozen: the running statistics normalise and stay unchanged.

    `jdl.make_train_step` puts the model in train mode (dropout on, batch statistics
    used and updated) before calling the loss function; this wrapper then switches only
    the batch-norm layers back to their running averages. The usual choice when
    fine-tuning on small batches, whose statistics are noisy; the plain `loss_fn` updates
    them instead. The BN scale and bias remain trainable unless the optimizer freezes them.
    """

    def frozen_loss_fn(model: nnx.Module, batch):
        set_batch_norm_frozen(model, True)
        return loss_fn(model, batch)

    return frozen_loss_fn
