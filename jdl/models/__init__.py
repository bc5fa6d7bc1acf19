"""Model families as Flax NNX modules, and the `MODELS` registry of named constructors."""

from functools import partial

from jdl.models.cnn import CNN, pool
from jdl.models.mlp import ACTIVATIONS, MLP, activation_fn

# Named architectures: name -> constructor taking (num_classes=..., rngs=...) plus overrides.
MODELS = {
    "mlp": MLP,
    "cnn": CNN,
    "mnist_mlp": partial(MLP, 784, (128,)),
    "mnist_cnn": partial(CNN, 1, input_shape=(28, 28), conv_channels=(32, 64), dense_sizes=(128,)),
}

__all__ = ["ACTIVATIONS", "CNN", "MLP", "MODELS", "activation_fn", "pool"]
