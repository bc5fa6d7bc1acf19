"""jdl: a functional deep-learning training framework on JAX/XLA.

The public API is what this module re-exports; everything else may change.
"""

from jdl import (
    cli,
    compiler,
    data,
    deploy,
    errors,
    export,  # callable: jdl.export(...) exports, jdl.export.load(path) runs one
    hf,
    hooks,
    jsonio,
    losses,
    metrics,
    models,
    parallel,
    precision,
    techniques,
)
from jdl.checkpoint import (
    BestMetricError,
    BestTracker,
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
from jdl.data.dataset import EmptyDataError, NonFiniteDataError
from jdl.data.pipeline import (
    BatchSizeError,
    DataSetupMismatchError,
    InMemoryData,
    IterableData,
    LabelRangeError,
    StreamingData,
    TrainData,
    check_labels,
    check_same_setup,
)
from jdl.data.text import CharVocab, RandomWindows
from jdl.deploy import ExportError, ModelLoadError, NoCheckpointError, load_model
from jdl.errors import UserError
from jdl.hooks import Hook, HookContext
from jdl.inference import PredictInputError, predict
from jdl.lock import WorkdirError, WorkdirLock, WorkdirLockedError
from jdl.loop import (
    FitResult,
    NonFiniteLossError,
    RunInterrupted,
    UnknownMetricError,
    fit,
    make_chunk_runner,
    make_evaluator,
)
from jdl.metric_log import MetricLogger, plot_curves, read_metrics
from jdl.models.sizes import ModelSizeError
from jdl.optim import OptimizerConfigError, default_decay_mask, make_optimizer, make_schedule
from jdl.parallel import (
    ShardingError,
    ShardingRules,
    initialize_distributed,
    make_mesh,
    shard_state,
)
from jdl.state import EmaError, TrainState, count_params
from jdl.steps import LossOutputError, classification_loss, make_eval_step, make_train_step
from jdl.summary import Summary, SummaryInputError, summary
from jdl.tensorboard import TensorBoardValueError

__version__ = "0.1.0"

__all__ = [
    "BatchSizeError",
    "BestMetricError",
    "BestTracker",
    "CharVocab",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "Checkpointer",
    "ConfigError",
    "DataSetupMismatchError",
    "EmaError",
    "EmptyDataError",
    "ExportError",
    "FitResult",
    "Hook",
    "HookContext",
    "InMemoryData",
    "IterableData",
    "LabelRangeError",
    "LossOutputError",
    "MetricLogger",
    "ModelLoadError",
    "ModelSizeError",
    "NoCheckpointError",
    "NonFiniteDataError",
    "NonFiniteLossError",
    "OptimizerConfigError",
    "PredictInputError",
    "RandomWindows",
    "Restored",
    "RunInterrupted",
    "ShardingError",
    "ShardingRules",
    "StreamingData",
    "Summary",
    "SummaryInputError",
    "TensorBoardValueError",
    "TrainData",
    "TrainState",
    "UnknownMetricError",
    "UserError",
    "WorkdirError",
    "WorkdirLock",
    "WorkdirLockedError",
    "check_labels",
    "check_same_setup",
    "classification_loss",
    "cli",
    "compiler",
    "count_params",
    "data",
    "default_decay_mask",
    "deploy",
    "enable_compilation_cache",
    "errors",
    "export",
    "fit",
    "hf",
    "hooks",
    "initialize_distributed",
    "jsonio",
    "load_model",
    "losses",
    "make_chunk_runner",
    "make_eval_step",
    "make_evaluator",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "metrics",
    "models",
    "parallel",
    "parse_command_line",
    "parse_duration",
    "plot_curves",
    "precision",
    "predict",
    "read_metrics",
    "shard_state",
    "summary",
    "techniques",
    "write_run_record",
]
