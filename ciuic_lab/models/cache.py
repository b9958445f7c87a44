"""The KV cache's name in transformers' calls and outputs.

Up to transformers 5.23 a causal LM takes and returns its cache as ``past_key_values``; from 5.24 the
name is ``cache`` (the old one still works there with a FutureWarning on every call, until 5.40 drops
it). Our own decode loops go through these two functions, so that they run warning-free on both, and
through one greedy loop over them (``greedy_steps``).
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Iterator


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


def greedy_steps(model: Any, input_ids: Any) -> Iterator[Any]:
    """Greedy decoding with the KV cache: the prompt ``input_ids`` ``[b, s]`` in one forward, then one
    forward per token. Yields each next token (``[b, 1]``, on the model's device) for as long as it is
    asked; the caller stops it (length, end of text). Each ``next()`` runs one forward and the argmax,
    so timing a ``next()`` (and reading the token, which waits for the device) times one step. Run it
    under ``torch.no_grad()`` or ``torch.inference_mode()``."""
    out = model(input_ids=input_ids, use_cache=True)
    while True:
        nxt = out.logits[:, -1:].argmax(-1)
        yield nxt
        out = model(input_ids=nxt, **cache_kwargs(model, cache_of(out)), use_cache=True)
