"""``ciuic-lab bench session`` and ``ciuic-lab bench soak``: how the workbench feels, in numbers.

``bench_session`` drives a :class:`~ciuic_lab.session.Session` the way the precision map does (one
site's bits changed per toggle, then the text and metrics recomputed), both through the Session and
through the panel's own widgets (glob box, bits drop-down, "Set selection" button), and re-quantizes
every site with an empty cache. Kernels are compiled (or loaded from Numba's on-disk cache) in a
warm-up pass first, so the figures are those of a session in use; medians and 90th percentiles.

``bench_soak`` makes many random changes (single sites, kinds, blocks, presets, undo and redo) and
checks that resident memory stays flat after a warm-up and that the quantized-weight cache never
exceeds its byte budget.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import time
import warnings
from typing import Any

import psutil

from .session import CiuicError, Session

TOGGLE_TARGET_MS = 250.0
REQUANTIZE_TARGET_MS = 1500.0
SOAK_GROWTH_LIMIT = 0.05
TOGGLE_BITS = (2, 3, 4, 5, 6, 8)


def _stats(ms: list[float]) -> dict[str, Any]:
    ms = sorted(ms)
    if not ms:
        return {"n": 0, "median_ms": None, "p90_ms": None, "min_ms": None, "max_ms": None}
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return {"n": len(ms), "median_ms": statistics.median(ms), "p90_ms": p90, "min_ms": ms[0], "max_ms": ms[-1]}


def _session(model: str | None, **kw) -> Session:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Session(model, **kw)


def _toggle_plan(session: Session, rng: random.Random, n: int, bits: tuple[int, ...]) -> list[tuple[str, int]]:
    names = [s.name for s in session.sites if not s.keep_default]
    return [(rng.choice(names), rng.choice(bits)) for _ in range(n)]


def _next_bits(session: Session, name: str, bits: int, choices: tuple[int, ...]) -> int:
    spec = session.plan.configs[name].spec
    if not spec.keep and not spec.is_fp8 and spec.bits == bits:
        return choices[(choices.index(bits) + 1) % len(choices)]
    return bits


def bench_session(model: str | None = None, quick: bool = False, start: str = "mixed") -> dict[str, Any]:
    """Toggle latency (Session and panel), re-quantization of every site, undo, on-demand timing."""
    import torch

    t0 = time.perf_counter()
    s = _session(model)
    init_s = time.perf_counter() - t0
    rng = random.Random(0)
    n = 6 if quick else 40
    choices = (2, 4, 8) if quick else TOGGLE_BITS

    # warm-up: every bit width once on every site (kernels compile or load from Numba's cache); then
    # the quantized-weight cache is emptied so that each toggle quantizes its site as in real use
    s.preset(start)
    for b in choices:
        s.set("*", bits=b)
    s.preset(start)
    s.weights.clear()

    toggles = []
    for name, bits in _toggle_plan(s, rng, n, choices):
        bits = _next_bits(s, name, bits, choices)
        t = time.perf_counter()
        s.set(name, bits=bits)
        toggles.append((time.perf_counter() - t) * 1e3)

    # the same through the panel's widgets
    from .panels.precision import PrecisionMap

    pm = PrecisionMap(s)
    panel = []
    for name, bits in _toggle_plan(s, rng, n, choices):
        bits = _next_bits(s, name, bits, choices)
        t = time.perf_counter()
        pm.glob.value = name
        pm.bits.value = bits
        pm.apply_button.click()
        panel.append((time.perf_counter() - t) * 1e3)
        if pm.last_error:
            raise CiuicError(f"the panel refused a toggle: {pm.last_error}")
    pm.close()

    undo = []
    for _ in range(min(n, 8)):
        t = time.perf_counter()
        s.undo()
        undo.append((time.perf_counter() - t) * 1e3)

    # every quantizable site, then every site (embedding, head, routers and norms too), cache emptied
    requant, requant_every = [], []
    every = [x.name for x in s.sites]
    specs = [(4, 128), (8, "channel"), (3, 128), (2, 64), (5, 128), (6, "channel")][: 2 if quick else 6]
    for bits, group in specs:
        s.weights.clear()
        t = time.perf_counter()
        s.set("*", bits=bits, group=group)
        requant.append((time.perf_counter() - t) * 1e3)
    for bits, group in specs[: 1 if quick else 3]:
        s.weights.clear()
        t = time.perf_counter()
        s.set(every, bits=bits, group=group)
        requant_every.append((time.perf_counter() - t) * 1e3)

    t = time.perf_counter()
    s.measure()
    measure_ms = (time.perf_counter() - t) * 1e3

    ts, tp, rq = _stats(toggles), _stats(panel), _stats(requant)
    rows = [
        {"what": "toggle one site (Session.set)", **ts, "target_ms": TOGGLE_TARGET_MS},
        {"what": "toggle one site (panel widgets)", **tp, "target_ms": TOGGLE_TARGET_MS},
        {"what": "undo", **_stats(undo), "target_ms": None},
        {"what": "re-quantize every quantizable site", **rq, "target_ms": REQUANTIZE_TARGET_MS},
        {"what": "re-quantize every site (embed, head, norms too)", **_stats(requant_every), "target_ms": None},
        {"what": "measure speed (on demand)", **_stats([measure_ms]), "target_ms": None},
    ]
    return {
        "benchmark": "session",
        "model": s.name,
        "params": sum(x.params for x in s.sites),
        "sites": len(s.sites),
        "quantizable_sites": sum(not x.keep_default for x in s.sites),
        "evalset": {"name": s.es.name, "heldout_tokens": int(s._heldout.numel()), "prompts": len(s.es.prompts),
                    "new_tokens": s.es.max_new_tokens},
        "start_plan": start,
        "session_init_s": init_s,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "toggle_median_ms": ts["median_ms"],
        "panel_toggle_median_ms": tp["median_ms"],
        "requantize_all_median_ms": rq["median_ms"],
        "toggle_ok": max(ts["median_ms"], tp["median_ms"]) <= TOGGLE_TARGET_MS,
        "requantize_ok": rq["median_ms"] <= REQUANTIZE_TARGET_MS,
        "cache": s.weights.stats(),
        "rows": rows,
    }


def bench_soak(model: str | None = None, toggles: int | None = None, quick: bool = False,
               cache_bytes: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Many random changes through a Session: resident memory after warm-up, cache within budget."""
    n = toggles if toggles is not None else (150 if quick else 1000)
    if not isinstance(n, int) or n < 10:
        raise CiuicError(f"--toggles must be an integer >= 10, got {toggles!r}")
    budget = cache_bytes if cache_bytes is not None else 16 * 2**20
    history = 50
    s = _session(model, cache_bytes=budget, history=history)
    rng = random.Random(seed)
    proc = psutil.Process()
    names = [x.name for x in s.sites if not x.keep_default]
    kinds = sorted({x.kind for x in s.sites if not x.keep_default})
    blocks = s.blocks()
    presets = ["int8", "int4-g128", "mixed", "int3-g128", "keep"]
    warmup = max(n // 5, min(n // 2, 3 * history))
    rss_after_warmup = None
    max_cache = 0
    samples: list[tuple[int, float]] = []
    refused = 0
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for i in range(n):
        r = rng.random()
        try:
            if r < 0.62:
                op = "site"
                name = rng.choice(names)
                s.set(name, bits=rng.choice(TOGGLE_BITS + (16,)), group=rng.choice(s.group_choices(name)[:-1]))
            elif r < 0.72:
                op = "kind"
                s.set(rng.choice(kinds), bits=rng.choice(TOGGLE_BITS), group=rng.choice((128, "channel")))
            elif r < 0.78:
                op = "block"
                s.set("*", blocks=[rng.choice(blocks)], bits=rng.choice(TOGGLE_BITS), scheme=rng.choice(("asym", "sym")))
            elif r < 0.83:
                op = "preset"
                s.preset(rng.choice(presets))
            elif r < 0.91:
                op = "undo"
                if s.can_undo:
                    s.undo()
            elif r < 0.96:
                op = "redo"
                if s.can_redo:
                    s.redo()
            else:
                op = "restore"
                s.restore(rng.choice(list(s.history)).index)
        except CiuicError:
            refused += 1
        counts[op] = counts.get(op, 0) + 1
        max_cache = max(max_cache, int(s.weights.currsize))
        if s.weights.currsize > budget:
            raise AssertionError(f"weight cache over budget: {s.weights.currsize} > {budget}")
        if i + 1 == warmup:
            gc.collect()
            rss_after_warmup = proc.memory_info().rss
        if (i + 1) % 25 == 0 or i + 1 == n:
            samples.append((i + 1, proc.memory_info().rss / 2**20))
    gc.collect()
    rss_end = proc.memory_info().rss
    growth = (rss_end - rss_after_warmup) / rss_after_warmup
    after = [mb for i, mb in samples if i >= warmup]
    return {
        "benchmark": "soak",
        "model": s.name,
        "toggles": n,
        "warmup_toggles": warmup,
        "seconds": time.perf_counter() - t0,
        "operations": counts,
        "refused": refused,
        "rss_mb": {"after_warmup": rss_after_warmup / 2**20, "end": rss_end / 2**20,
                   "max_after_warmup": max(after) if after else None},
        "rss_growth": growth,
        "rss_growth_limit": SOAK_GROWTH_LIMIT,
        "memory_ok": growth <= SOAK_GROWTH_LIMIT,
        "cache": {**s.weights.stats(), "max_bytes_seen": max_cache},
        "cache_ok": max_cache <= budget,
        "history": s.cache_stats(),
        "rss_samples": samples,
    }
