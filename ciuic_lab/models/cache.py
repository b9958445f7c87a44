"""The KV cache's name in transformers' calls and outputs.

Up to transformers 5.23 a causal LM takes and returns its cache as ``past_key_values``; from 5.24 the
name is ``cache`` (the old one still works there with a FutureWarning on every call, until 5.40 drops
it). Our own decode loops go through these two functions, so that they run warning-free on both.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=None)
def _cache_name(cls: type) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)``, under the name its forward takes."""
    return {_cache_name(type(model)): cache}


def cache_of(output: Any) -> Any:
    """The cache a forward returned (None if it returned none)."""
    for name in ("cache", "past_key_values"):
        if name in output:
            return output[name]
    return None
