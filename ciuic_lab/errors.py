"""One exception type for everything a user can get wrong.

Every message names what was wrong and what is accepted, on one line, so the CLI and the panels can
show it as it is.
"""

from __future__ import annotations


class CiuicError(ValueError):
    """A user-facing error: bad recipe, unknown model, missing file, unsupported input."""


class RecipeError(CiuicError):
    """A recipe that cannot be parsed, validated or resolved."""


class ModelLoadError(CiuicError):
    """A model that cannot be found or loaded."""


class KernelError(CiuicError):
    """A kernel called with tensors it does not accept (shape, dtype, device, layout)."""


class SafetyError(CiuicError):
    """safe_optimize refused a plan; ``report`` holds the comparison that made it refuse."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
