"""ResNets: parameter counts of the published architectures, shapes, train/eval behaviour,
training with jdl's step, and blocks against the same blocks written in PyTorch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jdl
from jdl.models import resnet


def rngs(seed: int = 0) -> nnx.Rngs:
    # rbg keys compile far faster than threefry on CPU, which keeps model init cheap here.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def num_params(constructor, **kwargs) -> int:
    """Trainable parameters (`nnx.Param` only) of a model built abstractly: no memory, no FLOPs."""
    model = nnx.eval_shape(lambda: constructor(rngs=nnx.Rngs(0), **kwargs))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "name, expected",
    [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)],
)
def test_imagenet_param_counts_equal_torchvision(name, expected):
    assert num_params(getattr(resnet, name), num_classes=1000) == expected


def test_cifar_param_counts_match_he_et_al():
    # He et al. 2016, table 6: 0.27M / 0.46M / 0.85M with the parameter-free option A.
    assert num_params(resnet.resnet20, num_classes=10) == 269_722
    assert num_params(resnet.resnet32, num_classes=10) == 464_154
    assert num_params(resnet.resnet56, num_classes=10) == 853_018
    # Projection shortcuts add a 1x1 conv + BN at the two stage transitions.
    projection = num_params(resnet.resnet20, num_classes=10, shortcut="projection")
    assert projection == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64) == 272_474


def test_resnet18_forward_shapes_in_train_and_eval_mode():
    # remat changes only what the backward pass stores; the forward pass is the same.
    model = resnet.resnet18(num_classes=10, remat=True, rngs=rngs())
    x = jax.random.normal(jax.random.key(1, impl="rbg"), (2, 64, 64, 3))
    forward = nnx.jit(lambda m, x: m(x))
    logits_train = forward(model, x)
    model.eval()
    logits_eval = forward(model, x)
    for logits in (logits_train, logits_eval):
        assert logits.shape == (2, 10) and logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.fixture(scope="module")
def resnet20():
    return resnet.resnet20(num_classes=10, rngs=rngs())


@pytest.fixture(scope="module")
def cifar_batch():
    key_x, key_y = jax.random.split(jax.random.key(2, impl="rbg"))
    return {
        "x": jax.random.normal(key_x, (8, 32, 32, 3)),
        "y": jax.random.randint(key_y, (8,), 0, 10),
    }


def test_eval_mode_is_deterministic_and_uses_running_stats(resnet20, cifar_batch):
    model = nnx.clone(resnet20)
    model.eval()
    stats = nnx.state(model, nnx.BatchStat)
    forward = nnx.jit(lambda m, x: m(x))
    x = cifar_batch["x"]
    logits = forward(model, x)
    assert logits.shape == (8, 10)
    np.testing.assert_array_equal(forward(model, x), logits)
    # Running statistics, not batch statistics: an example's logits ignore its batch mates.
    other = forward(model, x.at[1:].set(3.0))
    np.testing.assert_allclose(other[0], logits[0], rtol=1e-5, atol=1e-6)
    # Eval mode reads the statistics but never writes them.
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), stats)


def test_train_step_updates_batch_stats_and_lowers_loss(resnet20, cifar_batch):
    state = jdl.TrainState.create(resnet20, optax.adam(1e-2))
    stats_before = nnx.state(resnet20, nnx.BatchStat)
    step = jax.jit(jdl.make_train_step(jdl.classification_loss()))
    losses = []
    for i in range(4):
        state, metrics = step(state, cifar_batch)
        losses.append(float(metrics["loss"]))
        if i == 0:
            # PyTorch's momentum 0.1: running mean = 0.9 * 0 + 0.1 * batch mean.
            stem_out = resnet20.stem_conv(cifar_batch["x"])  # (B, H, W, 16)
            np.testing.assert_allclose(
                state.model_state["stem_bn"]["mean"][...],
                0.1 * jnp.mean(stem_out, axis=(0, 1, 2)),
                rtol=1e-4,
                atol=1e-6,
            )
    assert losses[-1] < 0.5 * losses[0], losses
    stats_after = nnx.state(state.model(), nnx.BatchStat)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats_before, stats_after)
    assert all(jax.tree.leaves(changed))


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="stem"):
        resnet.resnet18(num_classes=2, stem="tiny", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="shortcut"):
        resnet.resnet20(num_classes=2, shortcut="B", rngs=nnx.Rngs(0))


def test_stem_max_pool_matches_torch():
    # All-negative input: zero padding would win the max; torch pads with -inf.
    x = -1.0 - np.random.RandomState(0).rand(2, 7, 8, 3).astype(np.float32)
    expected = torch.nn.functional.max_pool2d(torch.tensor(x).permute(0, 3, 1, 2), 3, 2, 1)
    got = resnet.max_pool_3x3_s2(jnp.asarray(x))
    np.testing.assert_array_equal(got, expected.permute(0, 2, 3, 1).numpy())


# --- Blocks against PyTorch -------------------------------------------------------------------


def torch_conv(cin: int, cout: int, kernel: int, stride: int = 1) -> torch.nn.Conv2d:
    return torch.nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)


def torch_bn(channels: int, seed: int) -> torch.nn.BatchNorm2d:
    """A batch norm with non-trivial affine parameters and running statistics."""
    bn = torch.nn.BatchNorm2d(channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.2 * torch.randn(channels, generator=gen))
        bn.bias.copy_(0.2 * torch.randn(channels, generator=gen))
        bn.running_mean.copy_(0.3 * torch.randn(channels, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(channels, generator=gen))
    return bn


class TorchBasicBlock(torch.nn.Module):
    """torchvision's BasicBlock, written out."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = torch_conv(cin, cout, 3, stride), torch_bn(cout, 1)
        self.conv2, self.bn2 = torch_conv(cout, cout, 3), torch_bn(cout, 2)
        self.downsample = torch.nn.Sequential(torch_conv(cin, cout, 1, stride), torch_bn(cout, 3))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.downsample(x))


class TorchBottleneck(torch.nn.Module):
    """torchvision's Bottleneck (v1.5: stride on the 3x3 conv), written out."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = torch_conv(cin, width, 1), torch_bn(width, 1)
        self.conv2, self.bn2 = torch_conv(width, width, 3, stride), torch_bn(width, 2)
        self.conv3, self.bn3 = torch_conv(width, cout, 1), torch_bn(cout, 3)
        self.downsample = torch.nn.Sequential(torch_conv(cin, cout, 1, stride), torch_bn(cout, 4))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + self.downsample(x))


def copy_conv(dst: nnx.Conv, src: torch.nn.Conv2d) -> None:
    # PyTorch (out, in, kh, kw) -> Flax (kh, kw, in, out).
    dst.kernel[...] = jnp.asarray(src.weight.detach().numpy().transpose(2, 3, 1, 0))


def copy_bn(dst: nnx.BatchNorm, src: torch.nn.BatchNorm2d) -> None:
    dst.scale[...] = jnp.asarray(src.weight.detach().numpy())
    dst.bias[...] = jnp.asarray(src.bias.detach().numpy())
    dst.mean[...] = jnp.asarray(src.running_mean.numpy())
    dst.var[...] = jnp.asarray(src.running_var.numpy())


def run_both(block: nnx.Module, torch_block: torch.nn.Module, x: np.ndarray):
    torch_block.eval()
    block.eval()
    with torch.no_grad():
        expected = torch_block(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    return np.asarray(nnx.jit(lambda m, x: m(x))(block, jnp.asarray(x))), expected


def test_basic_block_matches_torch():
    torch.manual_seed(0)
    torch_block = TorchBasicBlock(8, 16, stride=2)
    block = resnet.BasicBlock(8, 16, stride=2, rngs=rngs())
    for name in ("1", "2"):
        copy_conv(getattr(block, "conv" + name), getattr(torch_block, "conv" + name))
        copy_bn(getattr(block, "bn" + name), getattr(torch_block, "bn" + name))
    copy_conv(block.projection.conv, torch_block.downsample[0])
    copy_bn(block.projection.bn, torch_block.downsample[1])
    x = np.random.RandomState(0).randn(2, 10, 10, 8).astype(np.float32)
    got, expected = run_both(block, torch_block, x)
    assert got.shape == (2, 5, 5, 16)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_bottleneck_matches_torch():
    torch.manual_seed(1)
    torch_block = TorchBottleneck(8, 4, stride=2)
    block = resnet.Bottleneck(8, 4, stride=2, rngs=rngs())
    for name in ("1", "2", "3"):
        copy_conv(getattr(block, "conv" + name), getattr(torch_block, "conv" + name))
        copy_bn(getattr(block, "bn" + name), getattr(torch_block, "bn" + name))
    copy_conv(block.projection.conv, torch_block.downsample[0])
    copy_bn(block.projection.bn, torch_block.downsample[1])
    x = np.random.RandomState(1).randn(2, 9, 9, 8).astype(np.float32)
    got, expected = run_both(block, torch_block, x)
    assert got.shape == (2, 5, 5, 16)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_zero_pad_shortcut_is_option_a():
    x = jnp.arange(2 * 4 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 4)
    y = resnet.zero_pad_shortcut(x, 2, 8)
    assert y.shape == (2, 2, 2, 8)
    np.testing.assert_array_equal(y[..., 2:6], x[:, ::2, ::2, :])
    assert not np.any(y[..., :2]) and not np.any(y[..., 6:])


def test_zero_init_residual_zeros_the_last_scale_of_each_block():
    # Same shapes as the blocks compared with PyTorch above, so init compiles nothing new.
    basic = resnet.BasicBlock(8, 16, stride=2, zero_init_residual=True, rngs=rngs())
    bottleneck = resnet.Bottleneck(8, 4, stride=2, zero_init_residual=True, rngs=rngs())
    assert not np.any(basic.bn2.scale[...]) and np.all(basic.bn1.scale[...] == 1)
    assert not np.any(bottleneck.bn3.scale[...]) and np.all(bottleneck.bn2.scale[...] == 1)
    assert np.all(bottleneck.projection.bn.scale[...] == 1)
    default = resnet.BasicBlock(8, 16, stride=2, rngs=rngs())
    assert np.all(default.bn2.scale[...] == 1)


def test_remat_block_gives_the_same_gradients_and_statistics():
    plain = resnet.BasicBlock(8, 16, stride=2, rngs=rngs())
    remat = nnx.clone(plain)
    x = jax.random.normal(jax.random.key(3, impl="rbg"), (2, 6, 6, 8))

    @nnx.jit
    def grads(a, b):
        loss_plain = lambda m: jnp.sum(m(x) ** 2)
        loss_remat = lambda m: jnp.sum(resnet.checkpointed_call(m, x) ** 2)
        return nnx.grad(loss_plain)(a), nnx.grad(loss_remat)(b)

    grads_plain, grads_remat = grads(plain, remat)
    jax.tree.map(
        lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6),
        grads_plain,
        grads_remat,
    )
    # Batch statistics are still updated once per forward pass.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        nnx.state(plain, nnx.BatchStat),
        nnx.state(remat, nnx.BatchStat),
    )
    assert float(jnp.max(jnp.abs(remat.bn1.mean[...]))) > 0
