"""Vision Transformer (ViT): images as sequences of patches, classified by a transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdl.models.sizes import check_sizes
from jdl.models.transformer import LAYER_NORM_EPS, BlockConfig, apply_blocks, block_stack


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """Cuts images into non-overlapping square patches, flattened row by row.

    Args:
      images: (B, H, W, C), H and W multiples of `patch_size` (P).

    Returns:
      (B, (H/P) * (W/P), P * P * C); each patch is flattened in (row, column, channel)
      order, the layout of a (P, P, C, out) conv kernel, so a dense layer on it is the
      strided patch convolution.
    """
    batch, height, width, channels = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {(height, width)} is not a multiple of patch {patch_size}")
    rows, cols = height // patch_size, width // patch_size
    x = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, rows, cols, P, P, C)
    return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


class ViT(nnx.Module):
    """Vision Transformer classifier (Dosovitskiy et al., 2021), pre-LayerNorm.

    Patch embedding (reshape + dense, equal to a strided conv and faster on CPU), a
    learned class token, learned position embeddings, `num_layers` bidirectional
    `TransformerBlock`s, a final LayerNorm and a linear head on the class token's output.

    Args:
      image_size: side of the square input images.
      patch_size: side of the square patches; must divide `image_size`.
      in_channels: channels of the input (1 for MNIST, 3 for RGB).
      num_classes: outputs of the head.
      embed_dim: width of the encoder.
      num_heads: attention heads per block.
      num_layers: depth of the encoder.
      mlp_ratio: MLP hidden width as a multiple of `embed_dim`.
      dropout: rate on the embeddings and inside every block (0 disables).
      activation: of the MLPs; "gelu" is the tanh approximation, "gelu_exact" the erf form
        of the original ViT.
      layer_norm_eps: epsilon of every LayerNorm (the original ViT uses 1e-12).
      remat: recompute each block's activations in the backward pass (less memory for
        training, about one more forward pass; see `transformer.checkpointed_block`).
      rngs: NNX random streams; `params` for init, `dropout` if dropout > 0.

    Call: `(B, image_size, image_size, in_channels)` float -> `(B, num_classes)` logits.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        num_classes: int,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        *,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        activation: str = "gelu",
        layer_norm_eps: float = LAYER_NORM_EPS,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        check_sizes(
            "ViT",
            image_size=image_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_classes=num_classes,
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_layers=num_layers,
            mlp_ratio=mlp_ratio,
        )
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        self.image_size, self.patch_size, self.remat = image_size, patch_size, remat
        num_patches = (image_size // patch_size) ** 2
        # Weights and position embeddings normal(0, 0.02), as in BERT and DeiT (whose
        # truncated normal differs only beyond 2 std); biases and the class token start at 0.
        init = nnx.initializers.normal(0.02)
        self.patch_embed = nnx.Linear(
            patch_size * patch_size * in_channels, embed_dim, kernel_init=init, rngs=rngs
        )
        self.cls_token = nnx.Param(jnp.zeros((1, 1, embed_dim)))
        self.position_embed = nnx.Param(init(rngs.params(), (1, num_patches + 1, embed_dim)))
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        block = BlockConfig(
            embed_dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            activation=activation,
            kernel_init=init,
            layer_norm_eps=layer_norm_eps,
        )
        self.blocks = block_stack(num_layers, block, rngs=rngs)
        self.ln_f = nnx.LayerNorm(embed_dim, epsilon=layer_norm_eps, rngs=rngs)
        self.head = nnx.Linear(embed_dim, num_classes, kernel_init=init, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.patch_embed(patchify(images, self.patch_size))  # (B, N, C)
        cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embed[...]  # (B, 1 + N, C)
        if self.dropout is not None:
            x = self.dropout(x)
        x = apply_blocks(self.blocks, x, remat=self.remat)
        return self.head(self.ln_f(x[:, 0]))  # (B, num_classes)


def vit_tiny(num_classes: int = 10, *, rngs: nnx.Rngs, **overrides) -> ViT:
    """A ViT for 28x28 grayscale digits (MNIST): 16 patches of 7x7, 4 layers of width 64."""
    config = dict(
        image_size=28, patch_size=7, in_channels=1, embed_dim=64, num_heads=4, num_layers=4
    )
    return ViT(**{**config, **overrides}, num_classes=num_classes, rngs=rngs)


def vit_cifar(num_classes: int = 10, *, rngs: nnx.Rngs, **overrides) -> ViT:
    """A small ViT for 32x32 RGB images (CIFAR): 64 patches of 4x4, 6 layers of width 192."""
    config = dict(
        image_size=32, patch_size=4, in_channels=3, embed_dim=192, num_heads=3, num_layers=6
    )
    return ViT(**{**config, **overrides}, num_classes=num_classes, rngs=rngs)


def vit_b16(num_classes: int = 1000, *, rngs: nnx.Rngs, **overrides) -> ViT:
    """ViT-B/16 at 224x224: 196 patches of 16x16, 12 layers of width 768, 12 heads (86.6M)."""
    config = dict(
        image_size=224, patch_size=16, in_channels=3, embed_dim=768, num_heads=12, num_layers=12
    )
    return ViT(**{**config, **overrides}, num_classes=num_classes, rngs=rngs)
