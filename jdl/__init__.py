"""jdl: a functional deep-learning training framework on JAX/XLA.

The public API is what this module re-exports; everything else may change.

Re-exports are imported on first use (PEP 562 `__getattr__`): `import jdl` imports no
JAX, and `jdl.fit` (or `from jdl import fit`) imports what `fit` needs when first asked.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Submodules that are part of the public API (`jdl.losses`, ...).
_SUBMODULES = frozenset(
    (
        "audio",
        "cli",
        "compiler",
        "data",
        "deploy",
        "diffusion",
        "errors",
        "export",
        "generative",
        "hf",
        "hooks",
        "jsonio",
        "losses",
        "metrics",
        "models",
        "parallel",
        "precision",
        "techniques",
    )
)

_EXPORTS_BY_MODULE = {
    "jdl.checkpoint": (
        "BestMetricError",
        "BestTracker",
        "CheckpointCorruptError",
        "Checkpointer",
        "CheckpointMismatchError",
        "CheckpointWriteError",
        "Restored",
    ),
    "jdl.config": (
        "ConfigError",
        "enable_compilation_cache",
        "parse_command_line",
        "parse_duration",
        "write_run_record",
    ),
    "jdl.data.dataset": ("EmptyDataError", "NonFiniteDataError"),
    "jdl.data.pipeline": (
        "BatchSizeError",
        "DataSetupMismatchError",
        "InMemoryData",
        "IterableData",
        "LabelRangeError",
        "StreamingData",
        "TrainData",
        "check_labels",
        "check_same_setup",
    ),
    "jdl.data.text": ("CharVocab", "RandomWindows"),
    "jdl.data.tokenizer": (
        "BPETokenizer",
        "TokenizerFormatError",
        "TokenizerNotFoundError",
        "load_tokenizer",
    ),
    "jdl.diffusion": ("DiffusionError",),
    "jdl.deploy": ("ExportError", "ModelLoadError", "NoCheckpointError", "load_model"),
    "jdl.errors": ("UserError",),
    "jdl.generative": ("GenerativeInputError",),
    "jdl.hooks": ("Hook", "HookContext"),
    "jdl.inference": ("PredictInputError", "predict"),
    "jdl.lock": ("WorkdirError", "WorkdirLock", "WorkdirLockedError"),
    "jdl.metrics": ("FrechetInputError",),
    "jdl.metric_log": ("MetricLogger", "plot_curves", "read_metrics"),
    "jdl.loop": (
        "FitResult",
        "NonFiniteLossError",
        "RunInterrupted",
        "UnknownMetricError",
        "fit",
        "make_chunk_runner",
        "make_evaluator",
    ),
    "jdl.export.unsupported": ("UnsupportedOperationError",),
    "jdl.models.ctc": ("CTCInputError",),
    "jdl.models.gan": ("GANInputError",),
    "jdl.models.sizes": ("ModelSizeError",),
    "jdl.models.transformer": ("generate_text",),
    "jdl.optim": ("OptimizerConfigError", "default_decay_mask", "make_optimizer", "make_schedule"),
    "jdl.parallel": (
        "ShardingError",
        "ShardingRules",
        "initialize_distributed",
        "make_mesh",
        "shard_state",
    ),
    "jdl.state": ("EmaError", "TrainState", "count_params"),
    "jdl.steps": ("LossOutputError", "classification_loss", "make_eval_step", "make_train_step"),
    "jdl.model_summary": ("Summary", "SummaryInputError", "summary"),
    "jdl.techniques.lora": ("LoRAError",),
    "jdl.tensorboard": ("TensorBoardValueError",),
}
#: Each re-exported name -> the module that defines it.
_EXPORTS = {name: module for module, names in _EXPORTS_BY_MODULE.items() for name in names}

__all__ = sorted([*_SUBMODULES, *_EXPORTS])


def __getattr__(name: str) -> Any:
    """Imports a re-exported name or a submodule on first access, then keeps it."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:  # any submodule, as the eager imports used to leave them all (jdl.loop, ...)
        try:
            value = importlib.import_module(f"jdl.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"jdl.{name}":
                raise  # a submodule whose own imports fail
            raise AttributeError(f"module 'jdl' has no attribute {name!r}") from None
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
