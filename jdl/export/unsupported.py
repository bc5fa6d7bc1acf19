"""The ONNX converter's refusals as one line that names the JAX operation it cannot express.

jax2onnx converts a model's traced program one JAX primitive at a time. A primitive with no
conversion rule ("reduce_window_min" of a min-pooling, "pure_callback" of a host callback)
or one whose rule refuses its arguments stops the whole export; `converter_error` turns
that into an `UnsupportedOperationError` saying which operation it was and what to do
instead: StableHLO expresses every JAX operation.
"""

from __future__ import annotations

import re

from jdl.deploy import ExportError

__all__ = ["UnsupportedOperationError", "converter_error", "operation_of"]

# jax2onnx 0.12.5: "[converter] No plugins registered for primitive 'reduce_window_min'".
_NO_RULE = re.compile(r"primitive '([^']+)'")


class UnsupportedOperationError(ExportError):
    """An ONNX export of a model that uses a JAX operation the converter cannot express.

    Attributes:
      operation: the JAX primitive's name, e.g. "reduce_window_min".
    """

    def __init__(self, operation: str, model_name: str, reason: str = ""):
        self.operation = operation
        because = f" ({reason})" if reason else ""
        super().__init__(
            f"the ONNX converter cannot express the operation {operation!r} used by "
            f"{model_name}{because}; export with format 'stablehlo' instead "
            "(--format stablehlo)"
        )


def operation_of(error: BaseException) -> str | None:
    """The name of the JAX primitive the converter was converting when it raised `error`.

    The converter's own "no rule" message names it; otherwise it is the primitive of the
    innermost equation being converted (a local `eqn` of the converter's frames, the
    innermost one when the failing operation sits in a nested program such as a jit).
    None when neither is found (the error came from outside the conversion loop).
    """
    found = _NO_RULE.search(str(error))
    if found:
        return found.group(1)
    name = None
    traceback = error.__traceback__
    while traceback is not None:
        eqn = traceback.tb_frame.f_locals.get("eqn")
        primitive = getattr(eqn, "primitive", None)
        if isinstance(getattr(primitive, "name", None), str):
            name = primitive.name
        traceback = traceback.tb_next
    return name


def converter_error(error: BaseException, model_name: str) -> ExportError:
    """The one-line `ExportError` for an exception the ONNX converter raised.

    An `UnsupportedOperationError` when the operation can be named, with the converter's
    reason when it had one beyond "no rule"; a plain `ExportError` with the converter's
    first message line otherwise.
    """
    text = str(error).strip()
    first = text.splitlines()[0][:200] if text else type(error).__name__
    operation = operation_of(error)
    if operation is None:
        return ExportError(
            f"the ONNX converter cannot express {model_name} ({type(error).__name__}: "
            f"{first}); export with format 'stablehlo' instead (--format stablehlo)"
        )
    reason = "" if _NO_RULE.search(text) else first
    return UnsupportedOperationError(operation, model_name, reason)
