"""jdl: a functional deep-learning training framework on JAX/XLA.

The public API is what this module re-exports; everything else may change.
"""

from jdl import data, losses, metrics, models
from jdl.checkpoint import Checkpointer, CheckpointMismatchError, Restored
from jdl.config import (
    ConfigError,
    enable_compilation_cache,
    parse_command_line,
    parse_duration,
    write_run_record,
)
from jdl.data.pipeline import InMemoryData
from jdl.logging import MetricLogger, plot_curves, read_metrics
from jdl.loop import FitResult, NonFiniteLossError, fit, make_chunk_runner, make_evaluator
from jdl.optim import default_decay_mask, make_optimizer, make_schedule
from jdl.state import TrainState, count_params
from jdl.steps import classification_loss, make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
    "ConfigError",
    "FitResult",
    "InMemoryData",
    "MetricLogger",
    "NonFiniteLossError",
    "Restored",
    "TrainState",
    "classification_loss",
    "count_params",
    "data",
    "default_decay_mask",
    "enable_compilation_cache",
    "fit",
    "losses",
    "make_chunk_runner",
    "make_eval_step",
    "make_evaluator",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "metrics",
    "models",
    "parse_command_line",
    "parse_duration",
    "plot_curves",
    "read_metrics",
    "write_run_record",
]
