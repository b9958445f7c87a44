"""Kernels: one registry over the torch reference, Numba (CPU) and nvcc-built CUDA (GPU) backends."""

from .reference import REFERENCE
from .registry import REGISTRY, Backend, Registry, register

register(REFERENCE)


def _register_optional() -> None:
    """Register the optional backends; each reports itself unavailable instead of failing here."""
    try:
        from . import numba_cpu  # noqa: F401  (registers itself)
    except ImportError:
        pass
    try:
        from . import cuda  # noqa: F401  (registers itself)
    except ImportError:
        pass


_register_optional()

__all__ = ["REGISTRY", "REFERENCE", "Backend", "Registry", "register"]
