"""The evaluation set shipped in the package: fixed prompts and a held-out text.

The held-out text is whole standard-library modules that the embedded models never saw in training.
Sizes are presets: ``standard`` for reports, ``quick`` for interactive use (the Session's instant
feedback), ``tiny`` for tests. ``search`` is the validation part for automatic searches (the
allocator's scan and refinement): as many held-out tokens as ``standard``, but the *next* 2,048, so a
plan chosen on it is verified on text it was not chosen on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from ..errors import CiuicError

DATA = Path(__file__).parent / "evalset"

SIZES = {
    # prompts used, new tokens per prompt, held-out tokens scored, window length
    "standard": dict(n_prompts=8, max_new_tokens=32, heldout_tokens=2048, window=256),
    "quick": dict(n_prompts=2, max_new_tokens=16, heldout_tokens=256, window=128),
    "tiny": dict(n_prompts=1, max_new_tokens=6, heldout_tokens=64, window=32),
    "search": dict(n_prompts=2, max_new_tokens=16, heldout_tokens=2048, window=256, heldout_offset=2048),
}
#: Held-out tokens some evaluation set scores; those after them are the calibration text's first part.
SCORED_HELDOUT_TOKENS = max(s.get("heldout_offset", 0) + s["heldout_tokens"] for s in SIZES.values())


@lru_cache(maxsize=1)
def _prompts() -> tuple[str, ...]:
    path = DATA / "prompts.json"
    if not path.exists():
        raise CiuicError(f"the evaluation prompts are missing from this installation ({path})")
    data = json.loads(path.read_text())
    items = data["prompts"] if isinstance(data, dict) else data
    return tuple(p if isinstance(p, str) else p["text"] for p in items)


@lru_cache(maxsize=1)
def _heldout() -> str:
    path = DATA / "heldout.txt"
    if not path.exists():
        raise CiuicError(f"the held-out evaluation text is missing from this installation ({path})")
    return path.read_text()


@dataclass(frozen=True)
class EvalSet:
    prompts: tuple[str, ...] = field(default_factory=_prompts)
    heldout: str = field(default_factory=_heldout, repr=False)
    max_new_tokens: int = 32
    heldout_tokens: int = 2048
    window: int = 256
    name: str = "standard"
    heldout_offset: int = 0  # held-out tokens skipped before the scored ones

    def resized(self, **kw) -> "EvalSet":
        return replace(self, **kw)


def evalset(size: str | EvalSet | None = "standard") -> EvalSet:
    """An :class:`EvalSet` by size name (``standard``, ``quick``, ``tiny``), or the one given."""
    if isinstance(size, EvalSet):
        return size
    size = size or "standard"
    if size not in SIZES:
        raise CiuicError(f"evaluation set size {size!r} is unknown; accepted: {', '.join(SIZES)}")
    s = SIZES[size]
    prompts = _prompts()[: s["n_prompts"]]
    return EvalSet(prompts, _heldout(), s["max_new_tokens"], s["heldout_tokens"], s["window"], size,
                   s.get("heldout_offset", 0))


def token_ids(tokenizer, text: str) -> "torch.Tensor":
    """``text`` as one 1-D tensor of token ids, without the tokenizer's special tokens."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]


def unscored_heldout_ids(tokenizer) -> "torch.Tensor":
    """The held-out tokens after :data:`SCORED_HELDOUT_TOKENS`: unseen in training, scored by no evaluation set."""
    return token_ids(tokenizer, _heldout())[SCORED_HELDOUT_TOKENS:]
