"""A small U-Net noise predictor for diffusion models (Ho et al. 2020), sized for MNIST.

The network maps a noisy image x_t, its timestep t and (optionally) a class label to
an image-shaped output (the noise epsilon or the velocity v, see `jdl.diffusion`):

* time embedding: sinusoidal features of t (Vaswani et al. 2017) through a two-layer
  MLP with SiLU; a class-conditional model adds a learned label embedding to it. The
  label `num_classes` is the "null" class: the unconditional model of classifier-free
  guidance (Ho & Salimans 2022), trained by replacing labels with it at random.
* residual blocks: GroupNorm-SiLU-conv3x3, plus the time embedding projected to the
  channels, then GroupNorm-SiLU-conv3x3, with a 1x1 projection on the skip path when
  the channel count changes.
* resolutions: one level per entry of `channels`, halved between levels by 2x2
  average pooling and doubled on the way up by nearest-neighbour upsampling (28 -> 14
  -> 7 for three levels); every down block's output is concatenated into the up block
  of the same resolution. Self-attention (one residual GroupNorm + multi-head
  attention layer) follows every block at the lowest resolution (7x7 for MNIST) and
  sits in the middle between two residual blocks.

With `patch_size` p > 1 the image is first folded into p x p patches (space to depth:
(H, W, C) -> (H/p, W/p, p*p*C)) and the output unfolded back, so the U-Net's levels
start at H/p: the full-resolution convolutions, most of a small U-Net's FLOPs, are
gone (the CPU preset of `experiments.mnist_diffusion` uses p = 2: levels 14 -> 7).

Every convolution is stride 1 (`jdl.models.Conv2D`, fast gradients on XLA:CPU) and the
resampling is reshapes, as in `jdl.models.VAE`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdl.errors import UserError
from jdl.models.cnn import Conv2D, pool
from jdl.models.sizes import ModelSizeError, check_sizes

__all__ = [
    "AttentionBlock",
    "ResBlock",
    "UNet",
    "UNetInputError",
    "depth_to_space",
    "space_to_depth",
    "timestep_embedding",
]


class UNetInputError(UserError, ValueError):
    """Labels given to an unconditional UNet."""


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal features of timesteps: `(B,)` float or int -> `(B, dim)` float32.

    The first half are cos(t * f_i), the second sin(t * f_i), with frequencies
    f_i = max_period ** (-i / half), i = 0..half-1 (half = dim // 2); an odd `dim` gets
    a trailing zero column.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]  # (B, half)
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p, W/p, p*p*C): each p x p patch becomes one pixel."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // p, p, width // p, p, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // p, width // p, p * p * channels)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """The inverse of `space_to_depth`: (B, h, w, p*p*C) -> (B, h*p, w*p, C)."""
    batch, height, width, depth = x.shape
    x = x.reshape(batch, height, width, p, p, depth // (p * p))
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height * p, width * p, depth // (p * p))


def _upsample(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling of (B, H, W, C): a broadcast, cheap to differentiate."""
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-conv, + skip.

    Call: `(B, H, W, Cin)`, time embedding `(B, D)` -> `(B, H, W, Cout)`.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, groups: int, *, rngs):
        self.norm1 = nnx.GroupNorm(in_channels, num_groups=groups, rngs=rngs)
        self.conv1 = Conv2D(in_channels, out_channels, 3, rngs=rngs)
        self.time = nnx.Linear(embed_dim, out_channels, rngs=rngs)
        self.norm2 = nnx.GroupNorm(out_channels, num_groups=groups, rngs=rngs)
        self.conv2 = Conv2D(out_channels, out_channels, 3, rngs=rngs)
        self.skip = (
            nnx.Linear(in_channels, out_channels, rngs=rngs)  # a 1x1 convolution
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))  # (B, H, W, Cout)
        h = h + self.time(jax.nn.silu(emb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class AttentionBlock(nnx.Module):
    """Residual self-attention over the H*W positions: x + proj(attn(GroupNorm(x))).

    Call: `(B, H, W, C)` -> `(B, H, W, C)`.
    """

    def __init__(self, channels: int, num_heads: int, groups: int, *, rngs):
        if channels % num_heads:
            raise ModelSizeError(
                f"UNet: the lowest level's channels ({channels}) must be a multiple of "
                f"attention_heads ({num_heads}); change one of them"
            )
        self.num_heads = num_heads
        self.norm = nnx.GroupNorm(channels, num_groups=groups, rngs=rngs)
        self.qkv = nnx.Linear(channels, 3 * channels, rngs=rngs)
        self.proj = nnx.Linear(channels, channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = self.norm(x).reshape(batch, height * width, channels)  # (B, T, C)
        q, k, v = jnp.split(self.qkv(h), 3, axis=-1)
        heads = (batch, height * width, self.num_heads, channels // self.num_heads)
        out = jax.nn.dot_product_attention(q.reshape(heads), k.reshape(heads), v.reshape(heads))
        out = self.proj(out.reshape(batch, height * width, channels))
        return x + out.reshape(x.shape)


class UNet(nnx.Module):
    """U-Net epsilon/v predictor with time embedding and optional class conditioning.

    Args:
      image_shape: (H, W, C) of one image; H and W must be multiples of
        patch_size * 2 ** (len(channels) - 1) (one halving between consecutive levels).
      channels: channels per resolution level, e.g. (32, 64, 64) for 28 -> 14 -> 7.
      num_res_blocks: residual blocks per level on the way down (the way up has one
        more, for the extra skip of each downsampling).
      attention_heads: heads of the self-attention at the lowest resolution.
      num_classes: None for an unconditional model; K for labels 0..K-1 plus the null
        label K (`null_label`), the unconditional model of classifier-free guidance.
      groups: GroupNorm groups; every entry of `channels` must be a multiple of it.
      patch_size: p; the levels start at (H/p, W/p) on p x p patches (see above).
      rngs: NNX random streams; parameters draw from `params` (or `default`), and the
        diffusion loss draws timesteps and noise from this module's own "noise"
        stream, seeded from them (the train step reseeds it every step).

    Call: `(x (B, H, W, C) float, t (B,) timesteps, y (B,) int labels or None)` ->
    `(B, H, W, C)`. A conditional model given `y=None` runs unconditionally (null label).

    Raises:
      ModelSizeError: a size < 1, channels not divisible by `groups` or the lowest
        level's channels not by `attention_heads`, or an image too small for the levels.
    """

    def __init__(
        self,
        *,
        image_shape: Sequence[int] = (28, 28, 1),
        channels: Sequence[int] = (32, 64, 64),
        num_res_blocks: int = 1,
        attention_heads: int = 4,
        num_classes: int | None = None,
        groups: int = 8,
        patch_size: int = 1,
        rngs: nnx.Rngs,
    ):
        image_shape, channels = tuple(image_shape), tuple(channels)
        check_sizes(
            "UNet",
            image_shape=image_shape,
            channels=channels,
            num_res_blocks=num_res_blocks,
            attention_heads=attention_heads,
            num_classes=num_classes,
            groups=groups,
            patch_size=patch_size,
        )
        if len(image_shape) != 3 or not channels:
            raise ModelSizeError(
                f"UNet: image_shape must be (H, W, C) and channels non-empty, got "
                f"{image_shape} and {channels}"
            )
        factor = patch_size * 2 ** (len(channels) - 1)
        if image_shape[0] % factor or image_shape[1] % factor:
            raise ModelSizeError(
                f"UNet: image_shape {image_shape} must have H and W divisible by {factor} "
                "(patch_size times one halving between levels); use fewer levels in "
                "channels or a smaller patch_size"
            )
        if any(c % groups for c in channels):
            raise ModelSizeError(
                f"UNet: every entry of channels {channels} must be a multiple of groups={groups}"
            )
        self.image_shape = image_shape
        self.num_classes = num_classes
        base = channels[0]
        embed_dim = 4 * base
        self.time_features = base
        self.time_mlp1 = nnx.Linear(base, embed_dim, rngs=rngs)
        self.time_mlp2 = nnx.Linear(embed_dim, embed_dim, rngs=rngs)
        # Row num_classes is the null label (unconditional), so guidance needs no 2nd model.
        self.label_embed = (
            nnx.Embed(num_classes + 1, embed_dim, rngs=rngs) if num_classes is not None else None
        )
        self.patch_size = patch_size
        pixels = patch_size * patch_size * image_shape[-1]  # channels of one folded pixel
        self.stem = Conv2D(pixels, base, 3, rngs=rngs)
        last = len(channels) - 1

        def attention(level: int):
            return AttentionBlock(channels[level], attention_heads, groups, rngs=rngs)

        down, down_attn, skips, current = [], [], [base], base
        for level, width in enumerate(channels):
            for _ in range(num_res_blocks):
                down.append(ResBlock(current, width, embed_dim, groups, rngs=rngs))
                down_attn.append(attention(level) if level == last else None)
                current = width
                skips.append(width)
            if level != last:
                skips.append(width)  # the pooled map is a skip too
        self.down = nnx.List(down)
        self.down_attn = nnx.List(down_attn)
        self.mid1 = ResBlock(current, current, embed_dim, groups, rngs=rngs)
        self.mid_attn = attention(last)
        self.mid2 = ResBlock(current, current, embed_dim, groups, rngs=rngs)
        up, up_attn = [], []
        for level in reversed(range(len(channels))):
            for _ in range(num_res_blocks + 1):
                width = channels[level]
                up.append(ResBlock(current + skips.pop(), width, embed_dim, groups, rngs=rngs))
                up_attn.append(attention(level) if level == last else None)
                current = width
        self.up = nnx.List(up)
        self.up_attn = nnx.List(up_attn)
        self.out_norm = nnx.GroupNorm(current, num_groups=groups, rngs=rngs)
        self.out = Conv2D(current, pixels, 3, rngs=rngs)
        self.levels = len(channels)
        self.num_res_blocks = num_res_blocks
        self.noise_stream = nnx.Rngs(noise=rngs.params())["noise"]

    @property
    def null_label(self) -> int | None:
        """The label of the unconditional model (`num_classes`), None if unconditional."""
        return self.num_classes

    def embed(self, t: jax.Array, y: jax.Array | None) -> jax.Array:
        """The time (+ label) embedding `(B, 4 * channels[0])` of timesteps and labels."""
        emb = self.time_mlp2(jax.nn.silu(self.time_mlp1(timestep_embedding(t, self.time_features))))
        if self.label_embed is not None:
            if y is None:
                y = jnp.full(t.shape, self.num_classes, jnp.int32)
            emb = emb + self.label_embed(y)
        elif y is not None:
            raise UNetInputError(
                "UNet: labels given to an unconditional model; build it with num_classes=K "
                "or call it without labels"
            )
        return emb

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        emb = self.embed(jnp.broadcast_to(t, x.shape[:1]), y)  # (B, D)
        h = self.stem(space_to_depth(x, self.patch_size))  # (B, H/p, W/p, C0)
        hs = [h]
        blocks = iter(zip(self.down, self.down_attn, strict=True))
        for level in range(self.levels):
            for _ in range(self.num_res_blocks):
                block, attn = next(blocks)
                h = block(h, emb)
                h = h if attn is None else attn(h)
                hs.append(h)
            if level != self.levels - 1:
                h = pool(h, kind="avg", window=2)  # (B, H / 2, W / 2, C)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        blocks = iter(zip(self.up, self.up_attn, strict=True))
        for level in reversed(range(self.levels)):
            for _ in range(self.num_res_blocks + 1):
                block, attn = next(blocks)
                h = block(jnp.concatenate([h, hs.pop()], axis=-1), emb)
                h = h if attn is None else attn(h)
            if level != 0:
                h = _upsample(h)  # (B, 2H, 2W, C)
        out = self.out(jax.nn.silu(self.out_norm(h)))  # (B, H/p, W/p, p*p*C)
        return depth_to_space(out, self.patch_size)  # (B, H, W, C)
