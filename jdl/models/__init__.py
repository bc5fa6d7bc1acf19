"""Model families as Flax NNX modules, and the `MODELS` registry of named constructors.

Every registry entry takes `num_classes=...` (or `vocab_size` for language models)
and `rngs=...` plus its own overrides.
"""

from jdl.models import cpu_kernels
from jdl.models.cnn import CNN, Conv2D, pool
from jdl.models.ctc import CTCAcousticModel
from jdl.models.gan import GAN, Discriminator, Generator
from jdl.models.mlp import ACTIVATIONS, MLP, activation_fn
from jdl.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet50,
    resnet56,
)
from jdl.models.rnn import RNN, CharLM, GRUCell, LSTMCell, SequenceClassifier
from jdl.models.seq2seq import Seq2SeqGRU, Seq2SeqTransformer
from jdl.models.transformer import (
    GPT,
    BlockConfig,
    EncoderClassifier,
    MultiHeadAttention,
    TransformerBlock,
    generate,
    gpt_small,
    gpt_tiny,
)
from jdl.models.unet import UNet
from jdl.models.vae import VAE
from jdl.models.vit import ViT, vit_b16, vit_cifar, vit_tiny

MODELS = {
    "mnist_mlp": lambda *, num_classes=10, rngs, **kw: MLP(
        784, (128,), num_classes, rngs=rngs, **kw
    ),
    "mnist_cnn": lambda *, num_classes=10, rngs, **kw: CNN(
        1, num_classes, input_shape=(28, 28), rngs=rngs, **kw
    ),
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vit_tiny": vit_tiny,
    "vit_cifar": vit_cifar,
    "vit_b16": vit_b16,
    "gpt_tiny": gpt_tiny,
    "gpt_small": gpt_small,
    "mnist_vae": VAE,  # takes no num_classes: (B, 28, 28, 1) -> decoder logits
    "mnist_unet": UNet,  # (x (B, 28, 28, 1), t (B,), y (B,) | None) -> (B, 28, 28, 1)
    "mnist_gan": GAN,  # (z (B, latent_dim), y (B,) | None) -> generated (B, 28, 28, 1)
}

__all__ = [
    "ACTIVATIONS",
    "BasicBlock",
    "BlockConfig",
    "Bottleneck",
    "CNN",
    "CTCAcousticModel",
    "CharLM",
    "Conv2D",
    "Discriminator",
    "EncoderClassifier",
    "GAN",
    "GPT",
    "GRUCell",
    "Generator",
    "LSTMCell",
    "MLP",
    "MODELS",
    "MultiHeadAttention",
    "RNN",
    "ResNet",
    "Seq2SeqGRU",
    "Seq2SeqTransformer",
    "SequenceClassifier",
    "TransformerBlock",
    "UNet",
    "VAE",
    "ViT",
    "activation_fn",
    "cpu_kernels",
    "generate",
    "gpt_small",
    "gpt_tiny",
    "pool",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet50",
    "resnet56",
    "vit_b16",
    "vit_cifar",
    "vit_tiny",
]
