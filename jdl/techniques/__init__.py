"""Research techniques built on jdl's pure steps: one module per technique.

Each module is a few functions in optax's style (factories returning pure functions);
the experiments in `experiments/*_mnist.py` show them end to end.
"""

from jdl.techniques import distill, explain, federated, lora, prune, quantize, transfer

__all__ = ["distill", "explain", "federated", "lora", "prune", "quantize", "transfer"]
