"""The one base class that marks an error as the user's to fix, not jdl's bug.

Every exception jdl raises for a mistake in the input — a bad config value, data that
does not fit the model, a checkpoint of another model, a full disk, a workdir in use —
derives from `UserError` as well as from the standard class it always had
(`ValueError`, `OSError`, ...). Command-line entry points print such an error as one
`error: ...` line and exit non-zero; anything else is a bug and keeps its traceback.
This module imports nothing from jdl, so every other module may use it.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, config, data or environment; the message says what to do."""
