"""PyTorch twins of jdl's model zoo, for the throughput benchmark.

Each class rebuilds one jdl architecture layer for layer in `torch.nn`, with the same
sizes, so that the benchmark trains the same network in both frameworks. The benchmark
checks that the trainable parameter counts agree; the tests also load jdl's weights into
each twin and check that it computes jdl's outputs. What differs is only what has to:

- `TorchResNet`: `jdl.models.ResNet` with the CIFAR stem and `BasicBlock`s (ResNet-20 is
  `stage_sizes=(3, 3, 3)`): bias-free 3x3 convs with batch norm (PyTorch's defaults,
  which jdl copies), the parameter-free "option A" shortcut (strided subsampling,
  channels zero-padded evenly on both sides), global average pooling, a dense head.
  Inputs are NCHW (torch's native layout); jdl's are NHWC.
- `TorchCharLM`: `jdl.models.CharLM` (embedding, `nn.LSTM`, dense head). jdl's cell
  follows `nn.LSTM`'s equations and parameters (two bias vectors), so the counts match.
- `TorchGPT`: `jdl.models.GPT` with learned positions and tied embeddings: pre-LayerNorm
  blocks (eps 1e-5), a fused q/k/v projection with biases,
  `F.scaled_dot_product_attention(is_causal=True)`, a 4x MLP with tanh-approximated
  GELU, a final LayerNorm, logits from the transposed token embedding. GPT-2's
  initialisation (normal 0.02, residual projections 0.02 / sqrt(2 * layers)).
- `TorchViT`: `jdl.models.ViT`: patches cut by reshape and embedded by a dense layer
  (jdl's form of the strided patch conv), a class token, learned position embeddings,
  bidirectional pre-LN blocks, a final LayerNorm and a head on the class token. Inputs
  are NHWC, as jdl's.

Dropout is absent everywhere (jdl builds no dropout at rate 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-5  # jdl's (and PyTorch's, GPT-2's) LayerNorm epsilon


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars (tied tensors counted once, as `parameters()` yields)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- ResNet


class TorchBasicBlock(nn.Module):
    """Two 3x3 conv + BN layers, option-A shortcut when the shape changes. NCHW."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.stride, self.extra_channels = stride, channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.extra_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.extra_channels  # F.pad lists (W, W, H, H, C, C) for NCHW
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class TorchResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, sec. 4.2): (B, C, H, W) -> (B, num_classes)."""

    def __init__(
        self,
        stage_sizes: Sequence[int],
        num_classes: int,
        *,
        width: int = 16,
        in_channels: int = 3,
    ):
        super().__init__()
        self.stem_conv = nn.Conv2d(in_channels, width, 3, 1, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        blocks, channels = [], width
        for stage, num_blocks in enumerate(stage_sizes):
            stage_width = width * 2**stage
            for j in range(num_blocks):
                stride = 2 if stage > 0 and j == 0 else 1
                blocks.append(TorchBasicBlock(channels, stage_width, stride))
                channels = stage_width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        x = self.blocks(x)
        return self.head(x.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------- LSTM LM


class TorchCharLM(nn.Module):
    """Embedding -> `nn.LSTM` -> dense: (B, T) int64 ids -> (B, T, vocab_size) logits."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, _ = self.rnn(self.embed(tokens))  # (B, T, H), from a zero state
        return self.head(x)


# ----------------------------------------------------------------------------- transformers


class TorchBlock(nn.Module):
    """Pre-LN block: `x + out(attn(qkv(ln1(x))))`, then `x + fc2(gelu(fc1(ln2(x))))`."""

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool, mlp_ratio: int = 4):
        super().__init__()
        self.num_heads, self.causal = num_heads, causal
        self.ln1 = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)  # columns [q | k | v], as jdl's
        self.out = nn.Linear(embed_dim, embed_dim)
        self.ln2 = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(embed_dim, mlp_ratio * embed_dim)
        self.fc2 = nn.Linear(mlp_ratio * embed_dim, embed_dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


def init_transformer_(model: nn.Module, residual_std: float) -> None:
    """jdl's transformer init: weights normal(0, 0.02), biases 0, LayerNorm (1, 0), and the
    two kernels per block that write into the residual stream normal(0, residual_std)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith((".out", ".fc2")) else 0.02
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


class TorchGPT(nn.Module):
    """GPT-2 style decoder: (B, T) int64 ids, T <= max_len -> (B, T, vocab_size) logits."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        *,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, embed_dim)
        self.position_embed = nn.Embedding(max_len, embed_dim)
        self.blocks = nn.Sequential(
            *[
                TorchBlock(embed_dim, num_heads, causal=True, mlp_ratio=mlp_ratio)
                for _ in range(num_layers)
            ]
        )
        self.ln_f = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        init_transformer_(self, 0.02 / math.sqrt(2 * num_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embed(tokens) + self.position_embed(positions)  # (B, T, C)
        x = self.ln_f(self.blocks(x))
        return x @ self.token_embed.weight.T  # tied head: (B, T, V)


class TorchViT(nn.Module):
    """Vision Transformer: (B, H, W, C) float images (NHWC, as jdl) -> (B, num_classes)."""

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
    ):
        super().__init__()
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(patch_size * patch_size * in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.position_embed = nn.Parameter(torch.empty(1, num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(
            *[
                TorchBlock(embed_dim, num_heads, causal=False, mlp_ratio=mlp_ratio)
                for _ in range(num_layers)
            ]
        )
        self.ln_f = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(embed_dim, num_classes)
        init_transformer_(self, 0.02)
        nn.init.normal_(self.position_embed, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, N, P * P * C), patches flattened (row, column, channel)."""
        batch, height, width, channels = images.shape
        p = self.patch_size
        x = images.reshape(batch, height // p, p, width // p, p, channels)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (B, rows, cols, P, P, C)
        return x.reshape(batch, (height // p) * (width // p), p * p * channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.patchify(images))  # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embed  # (B, 1 + N, C)
        x = self.blocks(x)
        return self.head(self.ln_f(x[:, 0]))
