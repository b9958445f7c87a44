"""Run a model on the evaluation set once and keep what comparisons need.

A :class:`Snapshot` holds greedy generations, next-token log-probabilities on the held-out text, the
perplexity, prefill and decode latency (medians, warm-up excluded), weight bytes and, for a baseline,
the inputs each site saw (for per-site error).
"""

from __future__ import annotations

import hashlib
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CiuicError
from ..models.cache import greedy_steps
from ..sites import Site
from .evalset import EvalSet, evalset as get_evalset, token_ids


@dataclass
class Snapshot:
    texts: list[str]
    token_ids: list[list[int]]
    logprobs: torch.Tensor           # [T, V] float32 log-softmax at scored held-out positions
    targets: torch.Tensor            # [T] next tokens at those positions
    nll: float
    prefill_ms: float | None
    decode_ms: float | None
    prefill_tokens: int
    peak_rss_mb: float
    evalset: EvalSet
    site_inputs: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def perplexity(self) -> float:
        return float(torch.exp(torch.tensor(self.nll)))

    @property
    def tokens_per_s(self) -> float | None:
        return 1000.0 / self.decode_ms if self.decode_ms else None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def heldout_ids(tokenizer, es: EvalSet) -> torch.Tensor:
    ids = token_ids(tokenizer, es.heldout)
    if es.heldout_offset:
        if ids.numel() - es.heldout_offset < es.window:
            raise CiuicError(f"evaluation set {es.name!r} skips {es.heldout_offset} held-out tokens but the text has "
                             f"{ids.numel()}; accepted: an offset leaving at least one window ({es.window} tokens)")
        ids = ids[es.heldout_offset:]
    n = min(es.heldout_tokens, ids.numel())
    n = max(es.window, n // es.window * es.window)
    return ids[:n]


@torch.no_grad()
def score_heldout(model: nn.Module, ids: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Log-probs at every position but the last of each window, the targets, and the mean NLL."""
    dev = _device(model)
    x = ids[: ids.numel() // window * window].view(-1, window).to(dev)
    logits = model(input_ids=x, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).reshape(-1, logits.shape[-1]).cpu()
    tgt = x[:, 1:].reshape(-1).cpu()
    nll = float(-logp.gather(1, tgt[:, None]).mean())
    return logp, tgt, nll


@torch.no_grad()
def greedy(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, step_ms: list[float] | None = None) -> list[int]:
    """Greedy decoding with the KV cache; per-step times (after the first) go to ``step_ms``."""
    dev = _device(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(dev)
    steps = greedy_steps(model, ids)
    new = [int(next(steps))]
    eos = tokenizer.eos_token_id
    for _ in range(max_new_tokens - 1):
        if eos is not None and new[-1] == eos:
            break
        _sync(dev)
        t0 = time.perf_counter()
        new.append(int(next(steps)))  # int() synchronizes
        if step_ms is not None:
            step_ms.append((time.perf_counter() - t0) * 1e3)
    return new


@torch.no_grad()
def time_prefill(model: nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    dev = _device(model)
    x = ids[None].to(dev)
    model(input_ids=x, use_cache=False)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        model(input_ids=x, use_cache=False)
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@torch.no_grad()
def snapshot(model: nn.Module, tokenizer, es: EvalSet | str | None = None, timing: bool = True,
             capture: list[Site] | None = None, heldout: torch.Tensor | None = None) -> Snapshot:
    """Measure ``model`` as it is now. ``capture``: sites whose inputs to keep (for per-site error)."""
    es = get_evalset(es)
    ids = heldout if heldout is not None else heldout_ids(tokenizer, es)
    hooks = _capture_hooks(model, capture, ids) if capture else None
    try:
        logp, tgt, nll = score_heldout(model, ids, es.window)
    finally:
        site_inputs = hooks.finish() if hooks else {}
    steps: list[float] = []
    token_ids = [greedy(model, tokenizer, p, es.max_new_tokens, steps if timing else None) for p in es.prompts]
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
    prefill = time_prefill(model, ids[: es.window]) if timing else None
    decode = statistics.median(steps) if timing and steps else None
    return Snapshot(texts, token_ids, logp, tgt, nll, prefill, decode, es.window, peak_rss_mb(), es, site_inputs)


# ---------------------------------------------------------------------- site inputs
class _Capture:
    """Forward pre-hooks that keep (a sample of) what each site's owner module receives."""

    def __init__(self, model: nn.Module, site_list: list[Site], max_rows: int = 256):
        self.max_rows = max_rows
        self.data: dict[str, Any] = {}
        self.handles = []
        owners = {}
        for s in site_list:
            owners.setdefault(s.module, s)
        for owner, s in owners.items():
            mod = model.get_submodule(owner)
            if s.role == "expert" and s.expert is not None and getattr(mod, "gate_up_proj", None) is not None:
                self.handles.append(mod.register_forward_pre_hook(self._bank(owner), with_kwargs=True))
            elif s.role in ("linear", "head", "router", "expert"):
                self.handles.append(mod.register_forward_pre_hook(self._dense(owner)))

    def _dense(self, owner):
        def hook(mod, args):
            if owner not in self.data and args:
                x = args[0].detach()
                self.data[owner] = x.reshape(-1, x.shape[-1])[: self.max_rows].float().cpu()
        return hook

    def _bank(self, owner):
        def hook(mod, args, kwargs):
            if owner in self.data:
                return
            allargs = list(args) + [kwargs.get(k) for k in ("top_k_index", "top_k_weights") if k in kwargs]
            if len(allargs) >= 2:
                x, idx = allargs[0].detach(), allargs[1].detach()
                self.data[owner] = (x.reshape(-1, x.shape[-1]).float().cpu(), idx.reshape(x.shape[0], -1).cpu())
        return hook

    def finish(self) -> dict[str, Any]:
        for h in self.handles:
            h.remove()
        return self.data


def _capture_hooks(model, site_list, ids):
    return _Capture(model, site_list)


def fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names and bytes): equal iff the weights are bit-exact."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
