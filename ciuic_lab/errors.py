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


def out_of_memory(doing: str, device=None, needed_bytes: int | None = None,
                  outcome: str = "nothing was changed") -> str:
    """One line for running out of device memory while ``doing`` something: what was asked, what the
    device has free, what became of the model (``outcome``), and what a user can do about it."""
    import torch

    have = ""
    try:
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(dev)
            have = f"; {free / 2**20:,.0f} MiB free of {total / 2**20:,.0f} MiB on {dev}"
    except Exception:  # noqa: BLE001 - the message is what matters
        pass
    need = f" (needs about {needed_bytes / 2**20:,.0f} MiB)" if needed_bytes else ""
    where = f" on {device}" if device is not None and not have else ""
    return (f"out of memory{where} while {doing}{need}{have}; {outcome}. Accepted: free memory "
            "(other models, tensors), fewer or smaller sites at a time, a smaller dtype, or device cpu")
