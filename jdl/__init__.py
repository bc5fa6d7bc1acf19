"""jdl: a functional deep-learning training framework on JAX/XLA.

The public API is what this module re-exports; everything else may change.
"""

from jdl import compiler, data, hf, losses, metrics, models, parallel, precision, techniques
from jdl.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointWriteError,
    Restored,
)
from jdl.config import (
    ConfigError,
    enable_compilation_cache,
    parse_command_line,
    parse_duration,
    write_run_record,
)
from jdl.data.pipeline import InMemoryData, StreamingData
from jdl.data.text import CharVocab, RandomWindows
from jdl.errors import UserError
from jdl.lock import WorkdirLock, WorkdirLockedError
from jdl.logging import MetricLogger, plot_curves, read_metrics
from jdl.loop import FitResult, NonFiniteLossError, fit, make_chunk_runner, make_evaluator
from jdl.optim import default_decay_mask, make_optimizer, make_schedule
from jdl.parallel import (
    ShardingError,
    ShardingRules,
    initialize_distributed,
    make_mesh,
    shard_state,
)
from jdl.state import TrainState, count_params
from jdl.steps import classification_loss, make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = [
    "CharVocab",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "Checkpointer",
    "ConfigError",
    "FitResult",
    "InMemoryData",
    "MetricLogger",
    "NonFiniteLossError",
    "RandomWindows",
    "Restored",
    "ShardingError",
    "ShardingRules",
    "StreamingData",
    "TrainState",
    "UserError",
    "WorkdirLock",
    "WorkdirLockedError",
    "classification_loss",
    "compiler",
    "count_params",
    "data",
    "default_decay_mask",
    "enable_compilation_cache",
    "fit",
    "initialize_distributed",
    "hf",
    "losses",
    "make_chunk_runner",
    "make_eval_step",
    "make_evaluator",
    "make_optimizer",
    "make_schedule",
    "make_mesh",
    "make_train_step",
    "metrics",
    "models",
    "parallel",
    "parse_command_line",
    "parse_duration",
    "plot_curves",
    "precision",
    "read_metrics",
    "shard_state",
    "techniques",
    "write_run_record",
]
