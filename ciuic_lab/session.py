"""The Session: the controller every front end (panels, notebooks, benchmarks) drives.

A :class:`Session` holds one model, its baseline outputs on an evaluation set, and the current plan::

    from ciuic_lab.session import Session
    s = Session("tiny-deepseek")
    s.set("model.layers.2.self_attn.kv_b_proj", bits=3)       # one site
    s.set("moe.expert.*", blocks=[1, 2], bits=4, group=64)    # a glob on names or kinds
    s.summary()                                                # KL, top-1, ppl, bpw, MB ...
    s.undo(); s.redo()
    s.recipe("my-plan.json")                                   # what was built, as a recipe file

Each change is *incremental*: only the sites whose config changed are re-quantized (quantized weights
are cached by ``(site, spec)`` within a byte budget), and only the cheap comparison runs again: one
batched forward over a few hundred held-out tokens (KL, top-1 agreement, perplexity) and the greedy
continuation of a couple of prompts. The continuation is verified against texts already known (the
baseline's, the previous state's) in one forward per prompt, the way speculative decoding checks a
draft; decoding token by token resumes only where the text really changes. Latency (``measure``) and
the full comparison on the standard evaluation set (``full_report``) run on demand.

History keeps plans and their metrics, never models: undo, redo and going back to any earlier state
re-apply a plan (from the weight cache) without evaluating it again.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import statistics
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cachetools
import torch
from torch import nn

from .errors import CiuicError, RecipeError
from .kernels import REGISTRY
from .measure import EvalSet, Snapshot, compare, site_errors, weight_bytes
from .measure.evalset import evalset as get_evalset
from .measure.snapshot import heldout_ids, peak_rss_mb, snapshot, time_prefill
from .models import Loaded, embedded_names, load
from .models.cache import greedy_steps
from .plan import KEEP_CONFIG, Plan, SiteConfig, keep_plan, matches, resolve
from .quant import QTensor, QuantSpec, dequantize, quantize
from .quant.spec import FP8_BLOCK, INT_BITS, KEEP
from .recipe import FUSIONS, KV_CACHE, PRESETS, Recipe, spec_from_fields
from .search.calibrate import prepare_calibrated
from .sites import Site, sites as list_sites
from .transforms import apply, backends_in_use, describe, revert, state_of
from .transforms.apply import loaded_weight

__all__ = ["Session", "Entry", "WeightCache", "CiuicError", "summarize", "baseline_metrics", "default_model"]

DEFAULT_CACHE_BYTES = 256 * 2**20
DEFAULT_HISTORY = 100
SPEC_FIELDS = ("bits", "scheme", "group", "format", "clip", "method")
SET_FIELDS = SPEC_FIELDS + ("layout", "kernel")
FP8_NAMES = ("fp8", "fp8_e4m3")
BITS_ACCEPTED = ", ".join(map(str, INT_BITS)) + ", 16 or 'keep', 'fp8_e4m3'"
INSPECT_BITS = (2, 3, 4, 5, 6, 8)
HIST_BINS = 60
OTHER_COL = "-"

Progress = Callable[[float, str], None]


def default_model() -> str:
    """The trained embedded model where this installation has it, else the random-weights one."""
    return "tiny-deepseek" if "tiny-deepseek" in embedded_names() else "tiny-deepseek-random"


# ---------------------------------------------------------------------------------------- caches
class WeightCache(cachetools.LRUCache):
    """Quantized weights by ``(site name, QuantSpec)``, least recently used first out, within a byte budget.

    Sizes are :attr:`QTensor.nbytes` (codes, scales and zero points). A weight larger than the whole
    budget is simply not kept. ``hits`` and ``misses`` count lookups.
    """

    def __init__(self, budget_bytes: int):
        if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 0:
            raise CiuicError(f"cache_bytes must be an integer >= 0, got {budget_bytes!r}")
        super().__init__(maxsize=budget_bytes, getsizeof=_qt_nbytes)
        self.hits = 0
        self.misses = 0

    def __getitem__(self, key):
        try:
            value = super().__getitem__(key)
        except KeyError:
            self.misses += 1
            raise
        self.hits += 1
        return value

    def get(self, key, default=None):
        if key in self:
            return self[key]
        self.misses += 1
        return default

    def __setitem__(self, key, value) -> None:
        if _qt_nbytes(value) > self.maxsize:
            self.pop(key, None)
            return
        super().__setitem__(key, value)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self), "bytes": int(self.currsize), "budget_bytes": int(self.maxsize),
                "hits": self.hits, "misses": self.misses}


def _qt_nbytes(qt: QTensor) -> int:
    return int(qt.nbytes)


class _Counting(MutableMapping):
    """A view of a cache that calls ``on_store(n)`` as the n-th new quantized weight is stored."""

    def __init__(self, cache: MutableMapping, on_store: Callable[[int], None]):
        self.cache, self.on_store, self.stored = cache, on_store, 0

    def __getitem__(self, key):
        return self.cache[key]

    def get(self, key, default=None):
        return self.cache.get(key, default)

    def __setitem__(self, key, value) -> None:
        self.cache[key] = value
        self.stored += 1
        self.on_store(self.stored)

    def __delitem__(self, key) -> None:
        del self.cache[key]

    def __iter__(self):
        return iter(self.cache)

    def __len__(self) -> int:
        return len(self.cache)


class _Pinned(MutableMapping):
    """The weight cache, plus the entries read or stored through this view held until it is dropped
    (the byte-bounded cache may evict them before apply gets to them)."""

    def __init__(self, cache: MutableMapping):
        self.cache, self.held = cache, {}

    def __getitem__(self, key):
        if key in self.held:
            return self.held[key]
        value = self.held[key] = self.cache[key]
        return value

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key) -> bool:
        return key in self.held or self.get(key) is not None

    def __setitem__(self, key, value) -> None:
        self.held[key] = value
        self.cache[key] = value

    def __delitem__(self, key) -> None:
        self.held.pop(key, None)
        self.cache.pop(key, None)

    def __iter__(self):
        return iter(set(self.held) | set(self.cache))

    def __len__(self) -> int:
        return len(set(self.held) | set(self.cache))


# --------------------------------------------------------------------------------------- memory
def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        fn = ctypes.CDLL(None).malloc_trim  # glibc only; elsewhere the allocator is left alone
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _trim_heap() -> None:
    """Give the pages freed by the last change back to the OS.

    Every plan change frees whole quantized banks and the activations of an evaluation; glibc keeps
    such freed heap pages by default, so a notebook toggling for an hour would look like a leak.
    Trimming costs about a millisecond against the tens a toggle takes.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# --------------------------------------------------------------------------------------- history
@dataclass
class Entry:
    """One state of the session: its plan and what it measured (never a model)."""

    index: int
    label: str
    plan: Plan
    report: dict[str, Any]
    tokens: list[list[int]] = field(repr=False)
    seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        return summarize(self.report)


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The flat numbers a metrics table shows, from a comparison report."""
    lat = report.get("latency_ms", {})
    qs = report.get("quantized_sites", {})
    wb = report.get("weight_bytes", {})
    return {
        "kl": report.get("kl"),
        "top1_agreement": report.get("top1_agreement"),
        "perplexity": report.get("perplexity", {}).get("after"),
        "perplexity_change": report.get("perplexity", {}).get("change"),
        "bits_per_weight": report.get("bits_per_weight"),
        "quantized_bits_per_weight": qs.get("bits_per_weight"),
        "quantized_sites": qs.get("count"),
        "weight_mb": wb["after"] / 1e6 if wb.get("after") is not None else None,
        "prefill_ms": lat.get("prefill", {}).get("after"),
        "decode_ms": lat.get("decode", {}).get("after"),
        "tokens_per_s": report.get("tokens_per_s", {}).get("after"),
        "same_text": report.get("same_text"),
    }


def baseline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The same numbers for the model as loaded (the "before" side of a report)."""
    lat = report.get("latency_ms", {})
    wb = report.get("weight_bytes", {})
    params = report.get("params")
    return {
        "kl": 0.0,
        "top1_agreement": 1.0,
        "perplexity": report.get("perplexity", {}).get("before"),
        "perplexity_change": 0.0,
        "bits_per_weight": 8.0 * wb["before"] / params if wb.get("before") and params else None,
        "quantized_bits_per_weight": None,
        "quantized_sites": 0,
        "weight_mb": wb["before"] / 1e6 if wb.get("before") is not None else None,
        "prefill_ms": lat.get("prefill", {}).get("before"),
        "decode_ms": lat.get("decode", {}).get("before"),
        "tokens_per_s": report.get("tokens_per_s", {}).get("before"),
        "same_text": len(report.get("text", {}).get("prompts", [])),
    }


# --------------------------------------------------------------------------------------- session
class Session:
    """One model, its baseline, the current plan, caches, and the history of what was tried.

    ``model``: an embedded name, a local directory or hub id (loaded with :func:`ciuic_lab.load`), a
    :class:`~ciuic_lab.models.Loaded`, or an ``nn.Module`` together with its ``tokenizer``. ``None``
    picks ``tiny-deepseek`` (or ``tiny-deepseek-random`` where the trained one is not installed).

    ``evalset``: what each change is scored on (``quick`` by default: 256 held-out tokens, 2 prompts of
    16 new tokens). ``cache_bytes``: budget of the quantized-weight cache. ``history``: how many states
    are kept for undo and comparison.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, evalset: str | EvalSet = "quick",
                 cache_bytes: int = DEFAULT_CACHE_BYTES, history: int = DEFAULT_HISTORY,
                 progress: Progress | None = None):
        if not isinstance(history, int) or isinstance(history, bool) or history < 1:
            raise CiuicError(f"history must be an integer >= 1, got {history!r}")
        self.progress = progress
        self._listeners: list[Callable[[str], None]] = []
        self.loaded = self._load(model, tokenizer)
        self.model: nn.Module = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        if state_of(self.model).plan is not None:
            revert(self.model)  # the baseline must be the model as loaded
        self.sites: list[Site] = list_sites(self.model)
        self._by_name: dict[str, Site] = {s.name: s for s in self.sites}
        self.es: EvalSet = get_evalset(evalset)
        self.weights = WeightCache(cache_bytes)
        # input Hessians of calibrated sites (GPTQ, output clipping), within the same byte budget
        self._hessians: cachetools.LRUCache = cachetools.LRUCache(
            maxsize=max(cache_bytes, 1), getsizeof=lambda h: 1 if h is None else h.numel() * h.element_size())
        self._site_err: cachetools.LRUCache = cachetools.LRUCache(maxsize=max(4096, 8 * len(self.sites)))
        self._layers = LayerReuse(self.model, self.sites)
        with _quiet_transformers():  # the held-out text is longer than the model's window, on purpose
            self._heldout = heldout_ids(self.tokenizer, self.es)
        self._prompt_ids = [self.tokenizer(p, return_tensors="pt").input_ids[0].tolist() for p in self.es.prompts]
        self._note(0.0, "measuring the model as loaded")
        self.baseline: Snapshot = snapshot(self.model, self.tokenizer, self.es, timing=False, capture=self.sites,
                                           heldout=self._heldout)
        self._base_timing: dict[str, Any] | None = None
        self._full_base: dict[str, Snapshot] = {}
        plan = keep_plan(self.sites)
        self._base_report = self._report_for(plan, self.baseline)
        self._counter = 0
        self.current = Entry(0, "as loaded", plan, self._base_report, self.baseline.token_ids)
        self.history: deque[Entry] = deque([self.current], maxlen=history)
        self._undo: deque[Entry] = deque(maxlen=history)
        self._redo: list[Entry] = []
        self._note(1.0, "ready")

    # ------------------------------------------------------------------------------ construction
    @staticmethod
    def _load(model: Any, tokenizer: Any) -> Loaded:
        if model is None:
            model = default_model()
        if isinstance(model, Loaded):
            return model
        if isinstance(model, (str, os.PathLike)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return load(model)
        if isinstance(model, nn.Module):
            if tokenizer is None:
                raise CiuicError("Session(model=<nn.Module>) needs its tokenizer too: Session(model, tokenizer)")
            from .models import family_of

            name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
            return Loaded(model, tokenizer, family_of(model), str(name), "object")
        raise CiuicError(f"model must be a name, a path, a Loaded or an nn.Module with its tokenizer; "
                         f"got {type(model).__name__}")

    # ------------------------------------------------------------------------------ observers
    def observe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(event)`` after each change: ``"plan"``, ``"measure"``, ``"report"``."""
        if callback not in self._listeners:
            self._listeners.append(callback)

    def unobserve(self, callback: Callable[[str], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self, event: str) -> None:
        for cb in list(self._listeners):
            cb(event)

    def _note(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(min(max(float(fraction), 0.0), 1.0), message)

    # ------------------------------------------------------------------------------ state
    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def plan(self) -> Plan:
        return self.current.plan

    @property
    def report(self) -> dict[str, Any]:
        return self.current.report

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def summary(self) -> dict[str, Any]:
        """Current metrics, flat: KL, top-1, perplexity, bits per weight, MB, latency when measured."""
        return summarize(self.report)

    def baseline_summary(self) -> dict[str, Any]:
        return baseline_metrics(self.report)

    def site(self, name: str | Site) -> Site:
        if isinstance(name, Site):
            name = name.name
        site = self._by_name.get(name) if isinstance(name, str) else None
        if site is None:
            raise CiuicError(f"unknown site {name!r}; names as in session.sites (e.g. {self.sites[1].name!r})")
        return site

    def kinds(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.sites:
            seen.setdefault(s.kind, None)
        return list(seen)

    def blocks(self) -> list[int]:
        return sorted({s.block for s in self.sites if s.block is not None})

    def options(self) -> dict[str, Any]:
        """What the controls may offer: bits, schemes, groups, layouts and kernels known here, presets,
        fusion switches and KV-cache forms."""
        status = REGISTRY.status()
        usable = [n for n, b in status.items() if b["available"]]
        layouts = list(dict.fromkeys(lay for n in usable for lay in status[n]["layouts"]))
        return {"bits": list(INT_BITS) + ["fp8_e4m3", 16], "schemes": ["asym", "sym"],
                "groups": [32, 64, 128, 256, "channel", "tensor"], "layouts": layouts,
                "kernels": ["auto"] + usable, "presets": list(PRESETS),
                "fusions": list(FUSIONS), "kv_cache": list(KV_CACHE)}

    def group_choices(self, site: str | Site) -> list[int | str]:
        """Group sizes that fit one site's rows, then ``channel`` and ``tensor``."""
        k = self.site(site).k
        return [g for g in (32, 64, 128, 256) if k % g == 0] + ["channel", "tensor"]

    def select(self, target: Any = "*", blocks: Any = None) -> list[str]:
        """Site names selected by a name, a glob on names or kinds, a Site, or a list of those.

        Globs follow recipes: ``*`` and ``attn.*`` leave embedding, head, routers and norms out unless
        the pattern names them (``head``, ``norm.*``). ``blocks``: an index or a list of them.
        """
        if isinstance(target, (str, Site)):
            target = [target]
        try:
            items = list(target)
        except TypeError:
            raise CiuicError(f"select takes a site name, a glob or a list of them, got {type(target).__name__}") from None
        if not items:
            raise CiuicError("the selection is empty; select a site name, a glob on names or kinds (attn.*, "
                             "moe.expert.down) or a list of names")
        chosen: dict[str, None] = {}
        for item in items:
            if isinstance(item, Site):
                item = item.name
            if not isinstance(item, str) or not item.strip():
                raise CiuicError(f"cannot select {item!r}; accepted: a site name or a glob on names or kinds")
            item = item.strip()
            if item in self._by_name:
                chosen.setdefault(item, None)
                continue
            hit = [s.name for s in self.sites if matches(item, s)]
            if not hit:
                raise CiuicError(f"{item!r} selects no site; accepted: a site name or a glob on names or kinds "
                                 f"({', '.join(self.kinds()[:6])}, ...)")
            for n in hit:
                chosen.setdefault(n, None)
        names = list(chosen)
        if blocks is not None:
            wanted = _blocks(blocks)
            names = [n for n in names if self._by_name[n].block in wanted]
            if not names:
                raise CiuicError(f"the selection has no site in block(s) {sorted(wanted)}; blocks here: "
                                 f"{self.blocks()}")
        return names

    # ------------------------------------------------------------------------------ changes
    def set(self, target: Any, blocks: Any = None, *, label: str | None = None, **fields: Any) -> dict[str, Any]:
        """Change the selected sites and return the new comparison report.

        Fields: ``bits`` (2-8, 16 or ``"keep"``, ``"fp8_e4m3"``), ``scheme``, ``group``, ``clip``,
        ``method``, ``layout``, ``kernel``. Fields not given keep the site's current value; a site
        quantized for the first time starts from asym, groups of 128 (per channel where 128 does not
        divide its rows). Only what changed is re-quantized and the model is left as it was on error.
        ``label`` names the new state in the history.
        """
        unknown = [k for k in fields if k not in SET_FIELDS]
        if unknown:
            raise CiuicError(f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(SET_FIELDS)}")
        if not fields:
            raise CiuicError(f"nothing to set; give at least one of {', '.join(SET_FIELDS)}")
        names = self.select(target, blocks)
        changes = {n: self._config_for(self._by_name[n], self.plan.configs[n], fields) for n in names}
        plan = self.plan.with_configs(changes)
        what = ", ".join(f"{k}={v}" for k, v in fields.items())
        where = names[0] if len(names) == 1 else f"{len(names)} sites"
        return self._commit(plan, label or f"{where}: {what}")

    def _config_for(self, site: Site, cfg: SiteConfig, fields: dict[str, Any]) -> SiteConfig:
        layout = fields.get("layout", cfg.layout)
        kernel = fields.get("kernel", cfg.kernel)
        _check_layout_kernel(layout, kernel)
        spec = cfg.spec
        spec_fields = {k: fields[k] for k in SPEC_FIELDS if k in fields}
        bits = spec_fields.pop("bits", None)
        fmt = spec_fields.pop("format", None)
        if bits is not None and not (bits in ("keep",) + FP8_NAMES or (isinstance(bits, int) and not isinstance(bits, bool))):
            raise CiuicError(f"bits {bits!r} is not supported; accepted: {BITS_ACCEPTED}")
        if fmt is not None and fmt not in ("int", "fp8_e4m3"):
            raise CiuicError(f"format {fmt!r} is not supported; accepted: int, fp8_e4m3")
        if bits in ("keep", 16):
            spec = KEEP
        elif bits in FP8_NAMES or fmt == "fp8_e4m3":
            spec = spec_from_fields({"format": "fp8_e4m3"})
        elif bits is not None or fmt == "int" or (spec_fields and not spec.keep):
            if spec.keep or spec.is_fp8:
                group = 128 if site.k % 128 == 0 else "channel"
                base = {"bits": 4, "scheme": "asym", "group": group, "clip": "minmax", "method": "rtn"}
            else:
                base = {k: v for k, v in spec.to_dict().items() if k != "format"}
            if bits is not None:
                if bits not in INT_BITS:
                    raise CiuicError(f"bits {bits!r} is not supported; accepted: {BITS_ACCEPTED}")
                base["bits"] = bits
            base.update(spec_fields)
            try:
                spec = QuantSpec(format="int", **base)
            except RecipeError as e:
                raise CiuicError(f"{site.name}: {e}") from None
        return SiteConfig(spec, layout, kernel)

    def set_plan(self, plan: Plan | Any, label: str | None = None) -> dict[str, Any]:
        """Make ``plan`` current: a :class:`Plan`, or anything :func:`ciuic_lab.resolve` takes (a preset name,
        a recipe file, JSON text, a dict)."""
        if not isinstance(plan, Plan):
            name = plan if isinstance(plan, str) and plan in PRESETS else None
            plan = resolve(plan, self.sites)
            label = label or f"recipe {name or plan.recipe.name}"
        elif set(plan.sites) != set(self._by_name):
            raise CiuicError("that plan was resolved for another model; resolve its recipe against session.sites")
        return self._commit(plan, label or f"plan {plan.recipe.name}")

    def preset(self, name: str, label: str | None = None) -> dict[str, Any]:
        """Apply a preset (``int8``, ``int4-g128``, ``mixed``, ...) to the whole model."""
        if name not in PRESETS:
            raise CiuicError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
        plan = resolve(name, self.sites)
        rec = self.plan.recipe  # a preset sets the bits; the fusion switches stay as they are
        plan.recipe = dataclasses.replace(plan.recipe, fusions=dict(rec.fusions), kv_cache=rec.kv_cache)
        return self._commit(plan, label or f"preset {name}")

    def set_fusions(self, kv_cache: str | None = None, **switches: bool) -> dict[str, Any]:
        """Turn the recipe's fusion switches on or off (``qkv_a=True``...), and pick the KV cache form."""
        bad = [k for k in switches if k not in FUSIONS]
        if bad:
            raise CiuicError(f"unknown fusion(s) {', '.join(map(repr, bad))}; accepted: {', '.join(FUSIONS)}")
        nonbool = [k for k, v in switches.items() if not isinstance(v, bool)]
        if nonbool:
            raise CiuicError(f"fusion switches are true or false; got {nonbool[0]}={switches[nonbool[0]]!r}")
        if kv_cache is not None and kv_cache not in KV_CACHE:
            raise CiuicError(f"kv_cache {kv_cache!r} is not supported; accepted: {', '.join(KV_CACHE)}")
        rec = self.plan.recipe
        fusions = {k: v for k, v in {**rec.fusions, **switches}.items() if v}
        recipe = dataclasses.replace(rec, fusions=fusions, kv_cache=kv_cache or rec.kv_cache)
        plan = Plan(dict(self.plan.configs), self.plan.sites, recipe)
        what = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in switches.items())
        if kv_cache:
            what = ", ".join(filter(None, [what, f"kv_cache={kv_cache}"]))
        return self._commit(plan, f"fusions: {what or 'unchanged'}")

    def fusions(self) -> dict[str, bool]:
        return {f: bool(self.plan.recipe.fusions.get(f)) for f in FUSIONS}

    def fusion_report(self) -> dict[str, Any]:
        """Per switch: whether it is on, in how many places it applied, and where it could not (why)."""
        return describe(self.model).get("fusions", {})

    def reset(self) -> dict[str, Any]:
        """Back to the model as loaded (a new state: undo brings the plan back)."""
        return self._commit(keep_plan(self.sites), "as loaded")

    # ------------------------------------------------------------------------------ history
    def undo(self) -> dict[str, Any]:
        if not self._undo:
            raise CiuicError("nothing to undo")
        target = self._undo[-1]
        self._switch(target.plan)
        self._undo.pop()
        self._redo.append(self.current)
        self.current = target
        _trim_heap()
        self._notify("plan")
        return self.report

    def redo(self) -> dict[str, Any]:
        if not self._redo:
            raise CiuicError("nothing to redo")
        target = self._redo[-1]
        self._switch(target.plan)
        self._redo.pop()
        self._undo.append(self.current)
        self.current = target
        _trim_heap()
        self._notify("plan")
        return self.report

    def entry(self, index: int | Entry) -> Entry:
        if isinstance(index, Entry):
            return index
        for e in self.history:
            if e.index == index:
                return e
        kept = [e.index for e in self.history]
        raise CiuicError(f"no state #{index} in the history; kept: #{kept[0]}..#{kept[-1]}")

    def compare_with(self, index: int | Entry) -> dict[str, Any]:
        """The current metrics next to those of an earlier state, and their differences."""
        other = self.entry(index)
        cur, old = self.summary(), other.metrics()
        delta = {k: (cur[k] - old[k]) if isinstance(cur[k], (int, float)) and isinstance(old[k], (int, float))
                 else None for k in cur}
        changed = [n for n, _, _ in other.plan.diff(self.plan)]
        return {"current": cur, "earlier": old, "delta": delta, "index": other.index, "label": other.label,
                "sites_changed": changed, "fusions": {"current": self.fusions(),
                                                      "earlier": dict(other.plan.recipe.fusions)}}

    def restore(self, index: int | Entry) -> dict[str, Any]:
        """Make an earlier state current again (as a new state; its metrics are reused, not recomputed)."""
        other = self.entry(index)
        return self._commit(other.plan, f"back to #{other.index}", known=other)

    # ------------------------------------------------------------------------------ export
    def recipe(self, path: str | os.PathLike | None = None, name: str = "workbench") -> Recipe:
        """The current plan as a recipe (one exact-name rule per quantized site, with the switches);
        written to ``path`` as JSON when given."""
        rec = self.plan.as_recipe(name)
        rec.description = rec.description or f"built in the Ciuic Lab workbench on {self.name}"
        if path is not None:
            p = Path(path).expanduser()
            if p.is_dir():
                raise CiuicError(f"{str(path)!r} is a directory; give a file name such as my-plan.json")
            if not p.parent.exists():
                raise CiuicError(f"cannot write {str(path)!r}: folder {str(p.parent)!r} does not exist")
            rec.save(p)
        return rec

    # ------------------------------------------------------------------------------ commit / apply
    def _same(self, a: Plan, b: Plan) -> bool:
        return a == b and a.recipe.kv_cache == b.recipe.kv_cache

    def _commit(self, plan: Plan, label: str, known: Entry | None = None) -> dict[str, Any]:
        if self._same(plan, self.plan):
            return self.report
        t0 = time.perf_counter()
        old = self.plan
        try:
            self._apply(plan)
            if known is not None:
                report, tokens = copy.deepcopy(known.report), known.tokens
            else:
                report, tokens = self._evaluate(plan)
        except BaseException:
            self._restore(old)
            raise
        self._counter += 1
        entry = Entry(self._counter, label, plan, report, tokens, time.perf_counter() - t0)
        self._undo.append(self.current)
        self._redo.clear()
        self.current = entry
        self.history.append(entry)
        self._note(1.0, "done")
        _trim_heap()
        self._notify("plan")
        return report

    def _switch(self, plan: Plan) -> None:
        old = self.plan
        try:
            self._apply(plan)
        except BaseException:
            self._restore(old)
            raise

    def _restore(self, plan: Plan) -> None:
        """Put ``plan`` back after a failed change: revert (bit-exact) and apply it again."""
        revert(self.model)
        self._apply(plan)

    def _apply(self, plan: Plan) -> None:
        """Apply ``plan`` incrementally, with the weight cache, reporting progress per quantized site."""
        self._check_banks(plan)
        base: MutableMapping = self.weights
        if any(not c.keep and c.spec.needs_calibration for c in plan.configs.values()):
            base = _Pinned(self.weights)  # calibrated weights must survive until apply has used them
            self._note(0.05, "calibrating (GPTQ / output clipping)")
            prepare_calibrated(self.model, self.tokenizer, plan, base, hessians=self._hessians)
        old = state_of(self.model).plan
        todo = sum(1 for n, c in plan.configs.items() if not c.keep and (old is None or old.configs.get(n) != c))
        cache = _Counting(base, lambda i: self._note(0.6 * i / todo, f"quantizing {i}/{todo} sites")) \
            if todo > 8 else base
        apply(self.model, plan, cache=cache)

    def _check_banks(self, plan: Plan) -> None:
        """The experts of one bank run with one layout and one kernel: say so before anything changes."""
        forms: dict[str, set[str]] = {}
        for n, c in plan.configs.items():
            s = self._by_name[n]
            if s.role == "expert" and s.expert is not None and not c.keep:
                forms.setdefault(s.module, set()).add(f"{c.layout}/{c.kernel}")
        for owner, f in forms.items():
            if len(f) > 1:
                raise CiuicError(f"the experts of {owner} must share one layout and kernel (got "
                                 f"{', '.join(sorted(f))}); set them on the whole bank, e.g. select '{owner}.*'")

    # ------------------------------------------------------------------------------ evaluation
    def _pristine(self, plan: Plan) -> bool:
        # "latent" is the recipe's default, the form apply leaves as loaded; "expanded" swaps in FusedMLA
        return not plan.quantized() and not any(plan.recipe.fusions.values()) and plan.recipe.kv_cache == "latent"

    def _report_for(self, plan: Plan, cand: Snapshot, errors: dict[str, Any] | None = None) -> dict[str, Any]:
        rep = compare(self.baseline, cand)
        wb = weight_bytes(self.model, self.sites)
        rep["weight_bytes"] = {"before": wb["before"], "after": wb["after"]}
        rep["params"] = wb["params"]
        rep["bits_per_weight"] = wb["bits_per_weight"]
        rep["quantized_sites"] = wb["quantized_sites"]
        rep["site_errors"] = errors or {}
        rep["plan"] = {"recipe": plan.recipe.name, "by_kind": plan.by_kind(), "fusions": dict(plan.recipe.fusions),
                       "kv_cache": plan.recipe.kv_cache}
        if self._base_timing is not None:
            _put_timing(rep, self._base_timing, self._base_timing if self._pristine(plan) else None)
        return rep

    @torch.no_grad()
    def _evaluate(self, plan: Plan) -> tuple[dict[str, Any], list[list[int]]]:
        """Score the model as it is now on the session's evaluation set (the toggle path: no timing)."""
        if self._pristine(plan):
            return self._report_for(plan, self.baseline), self.baseline.token_ids
        self._note(0.65, "scoring held-out text")
        logp, tgt, nll = self._score_heldout(plan)
        self._note(0.8, "generating text")
        tokens = self._generate(plan)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        cand = Snapshot(texts, tokens, logp, tgt, nll, None, None, self.es.window, peak_rss_mb(), self.es)
        return self._report_for(plan, cand, self._site_errors(plan)), tokens

    def _score_heldout(self, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, float]:
        """:func:`ciuic_lab.measure.snapshot.score_heldout`, with the decoder layers whose sites did not
        change replayed from the previous evaluation instead of recomputed."""
        ids, window = self._heldout, self.es.window
        x = ids[: ids.numel() // window * window].view(-1, window)
        logits = self._layers.forward(self.model, "heldout", x, plan).float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).reshape(-1, logits.shape[-1]).cpu()
        tgt = x[:, 1:].reshape(-1).cpu()
        nll = float(-logp.gather(1, tgt[:, None]).mean())
        return logp, tgt, nll

    def _generate(self, plan: Plan) -> list[list[int]]:
        """Greedy continuations of every prompt. The texts already known (the previous state's, the
        baseline's) are checked first, all prompts in one forward, as speculative decoding checks a
        draft: a draft is accepted while the model's own argmax agrees with it, the first disagreement
        is the model's own token, and only from there does decoding go on token by token."""
        prompts = self._prompt_ids
        limit = self.es.max_new_tokens
        drafts = [[d for d in (self.current.tokens[i], self.baseline.token_ids[i]) if d] for i in range(len(prompts))]
        outs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        first = [d[0][:limit] if d else [] for d in drafts]
        if all(first):
            seqs = [p + d[:-1] for p, d in zip(prompts, first)]
            width = max(len(q) for q in seqs)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            batch = torch.tensor([q + [pad] * (width - len(q)) for q in seqs])  # right padding: causal, harmless
            logits = self._layers.forward(self.model, "drafts", batch, plan)
            for i, (p, d) in enumerate(zip(prompts, first)):
                preds = logits[i, len(p) - 1: len(p) - 1 + len(d)].argmax(-1).tolist()
                done[i] = self._accept(outs[i], d, preds)
        return [outs[i] if done[i] else self._continue(prompts[i], drafts[i], outs[i]) for i in range(len(prompts))]

    def _accept(self, out: list[int], draft: list[int], preds: list[int]) -> bool:
        """Extend ``out`` with the model's predictions while they agree with ``draft``; True when finished."""
        eos = self.tokenizer.eos_token_id
        for want, got in zip(draft, preds):
            out.append(got)
            if got == eos or len(out) >= self.es.max_new_tokens:
                return True
            if got != want:
                return False
        return False

    def _continue(self, prompt: list[int], drafts: list[list[int]], out: list[int]) -> list[int]:
        """Go on from ``out``: check any known text that still agrees with it, then decode with the KV cache."""
        limit = self.es.max_new_tokens
        eos = self.tokenizer.eos_token_id
        model = self.model
        dev = next(model.parameters()).device
        while len(out) < limit:
            draft = next((d[len(out):limit] for d in drafts if len(d) > len(out) and d[:len(out)] == out), None)
            if not draft:
                break
            seq = torch.tensor([prompt + out + draft[:-1]], device=dev)
            preds = model(input_ids=seq, use_cache=False).logits[0, len(prompt) + len(out) - 1:].argmax(-1).tolist()
            if self._accept(out, draft, preds):
                return out
        if len(out) >= limit or (out and out[-1] == eos):
            return out
        steps = greedy_steps(model, torch.tensor([prompt + out], device=dev))
        out.append(int(next(steps)))
        while len(out) < limit and out[-1] != eos:
            out.append(int(next(steps)))
        return out

    def _site_errors(self, plan: Plan) -> dict[str, Any]:
        """Relative output error per quantized site; cached by (site, spec, folded): it depends on nothing else
        (``norm_fold`` changes the weight a site quantizes)."""
        out: dict[str, Any] = {}
        missing: list[Site] = []
        effective = state_of(self.model).effective
        key = {n: (n, plan.configs[n].spec, bool(effective.get(n, (None, False))[1])) for n in plan.quantized()}
        for n in plan.quantized():
            hit = self._site_err.get(key[n])
            if hit is None:
                missing.append(self._by_name[n])
            else:
                out[n] = hit
        if missing:
            fresh = site_errors(self.model, missing, self.baseline.site_inputs)
            for s in missing:
                if s.name in fresh:
                    self._site_err[key[s.name]] = fresh[s.name]
                    out[s.name] = fresh[s.name]
        return {n: out[n] for n in plan.quantized() if n in out}

    def evaluate(self, plan: Plan | Any) -> dict[str, Any]:
        """What-if: the report ``plan`` would get, without making it current (the model is put back)."""
        if not isinstance(plan, Plan):
            plan = resolve(plan, self.sites)
        old = self.plan
        try:
            self._apply(plan)
            report, _ = self._evaluate(plan)
        finally:
            self._restore_quick(old)
        return report

    def _restore_quick(self, plan: Plan) -> None:
        try:
            apply(self.model, plan, cache=self.weights)
        except BaseException:
            self._restore(plan)
            raise

    def scan(self, bits: int | str = 2, by: str = "cell", target: Any = "*", **fields: Any) -> list[dict[str, Any]]:
        """Sensitivity: quantize one unit at a time (alone, everything else as loaded) and score it.

        ``by``: ``"cell"`` (one kind in one block; the experts of a bank together), ``"kind"`` or
        ``"site"``; ``target`` limits the scan to a selection (a glob, a kind, a list of names).
        Returns rows sorted by KL, largest first, each with the ``names`` of its sites. The current
        state is unchanged.
        """
        chosen = set(self.select(target))
        units: OrderedDict[tuple, list[str]] = OrderedDict()
        for s in self.sites:
            if s.name not in chosen:
                continue
            key = {"cell": (s.kind, s.block), "kind": (s.kind, None), "site": (s.name, s.block)}.get(by)
            if key is None:
                raise CiuicError(f"scan by {by!r} is not supported; accepted: cell, kind, site")
            units.setdefault(key, []).append(s.name)
        keep = keep_plan(self.sites)
        rows = []
        for i, ((what, block), names) in enumerate(units.items()):
            self._note(i / max(len(units), 1), f"scanning {what} ({i + 1}/{len(units)})")
            changes = {n: self._config_for(self._by_name[n], KEEP_CONFIG, {"bits": bits, **fields}) for n in names}
            rep = self.evaluate(keep.with_configs(changes))
            params = sum(self._by_name[n].params for n in names)
            rows.append({"unit": what, "kind": self._by_name[names[0]].kind, "block": block, "sites": len(names),
                         "names": names,
                         "params": params, "kl": rep["kl"], "top1_agreement": rep["top1_agreement"],
                         "perplexity_change": rep["perplexity"]["change"],
                         "bytes_saved": rep["weight_bytes"]["before"] - rep["weight_bytes"]["after"]})
        self._note(1.0, "done")
        return sorted(rows, key=lambda r: -r["kl"])

    # ------------------------------------------------------------------------------ on demand
    @torch.no_grad()
    def measure(self, repeats: int = 3) -> dict[str, Any]:
        """Prefill and decode latency (medians), tokens/s and time per op kind, as loaded and now.

        The baseline is timed once (the model is reverted for it, then the plan re-applied from the
        cache). The numbers go into the current report.
        """
        plan = self.plan
        if self._base_timing is None:
            self._note(0.05, "timing the model as loaded")
            if not self._pristine(plan):
                revert(self.model)
            try:
                self._base_timing = self._time_model(repeats)
            finally:
                if not self._pristine(plan):
                    apply(self.model, plan, cache=self.weights)
        if self._pristine(plan):
            cand = self._base_timing
        else:
            self._note(0.55, "timing the current plan")
            cand = self._time_model(repeats)
        _put_timing(self.report, self._base_timing, cand)
        self._note(1.0, "done")
        self._notify("measure")
        return {"before": self._base_timing, "after": cand}

    def _time_model(self, repeats: int) -> dict[str, Any]:
        model = self.model
        prefill = time_prefill(model, self._heldout[: self.es.window], repeats)
        steps, op = _timed_decode(model, self._prompt_ids, self.es.max_new_tokens, self._owner_kinds())
        decode = statistics.median(steps) if steps else None
        return {"prefill_ms": prefill, "prefill_tokens": self.es.window, "decode_ms": decode,
                "tokens_per_s": 1000.0 / decode if decode else None, "op_ms": op}

    def _owner_kinds(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in self.sites:
            kind = "moe.experts" if s.role == "expert" and s.expert is not None else \
                "norm" if s.role == "norm" else s.kind
            out.setdefault(s.module, kind)
        return out

    def full_report(self, evalset: str | EvalSet = "standard", timing: bool = True) -> dict[str, Any]:
        """The full comparison (as ``ciuic-lab apply`` prints it) of the current plan on ``evalset``."""
        es = get_evalset(evalset)
        plan = self.plan
        key = f"{es.name}:{es.heldout_offset}:{es.heldout_tokens}:{es.max_new_tokens}:{len(es.prompts)}:{timing}"
        base = self._full_base.get(key)
        if base is None:
            self._note(0.05, f"measuring the model as loaded on the {es.name} set")
            if not self._pristine(plan):
                revert(self.model)
            try:
                with _quiet_transformers():
                    base = snapshot(self.model, self.tokenizer, es, timing=timing, capture=self.sites)
            finally:
                if not self._pristine(plan):
                    apply(self.model, plan, cache=self.weights)
            self._full_base = {key: base}
        self._note(0.5, f"measuring the current plan on the {es.name} set")
        with _quiet_transformers():
            cand = snapshot(self.model, self.tokenizer, es, timing=timing) if not self._pristine(plan) else base
        rep = compare(base, cand, self.model, self.sites, plan)
        rep["model"] = self.name
        rep["recipe"] = plan.as_recipe(plan.recipe.name).to_dict()
        self._note(1.0, "done")
        self._notify("report")
        return rep

    # ------------------------------------------------------------------------------ views' data
    def grid(self, experts: bool = False) -> dict[str, Any]:
        """The precision map: rows are site kinds (or one row per expert), columns are blocks.

        Returns ``rows``, ``cols``, and per cell ``sites`` (names), ``bits`` (mean bits, 16 kept, 8 for
        fp8, None where the cell is empty) and ``text`` (what the cell shows: ``4``, ``fp8``, ``2-8``,
        ``keep`` for a weight left as loaded, whatever its dtype).
        """
        rows: list[str] = []
        cols = [str(b) for b in self.blocks()]
        has_other = any(s.block is None for s in self.sites)
        if has_other:
            cols.append(OTHER_COL)
        cells: dict[tuple[str, str], list[str]] = {}
        for s in self.sites:
            row = f"{s.kind}[{s.expert}]" if experts and s.role == "expert" and s.expert is not None else s.kind
            if row not in rows:
                rows.append(row)
            cells.setdefault((row, OTHER_COL if s.block is None else str(s.block)), []).append(s.name)
        first = {r: i for i, r in enumerate(rows)}
        rows.sort(key=lambda r: _row_order(r, first[r]))
        plan = self.plan
        sites_m, bits_m, text_m = [], [], []
        for r in rows:
            srow, brow, trow = [], [], []
            for c in cols:
                names = cells.get((r, c), [])
                srow.append(names)
                if not names:
                    brow.append(None)
                    trow.append("")
                    continue
                bits = [_bits_of(plan.configs[n].spec) for n in names]
                labels = sorted({_short(plan.configs[n].spec) for n in names}, key=_label_order)
                brow.append(sum(bits) / len(bits))
                trow.append(labels[0] if len(labels) == 1 else f"{labels[0]}-{labels[-1]}")
            sites_m.append(srow)
            bits_m.append(brow)
            text_m.append(trow)
        return {"rows": rows, "cols": cols, "sites": sites_m, "bits": bits_m, "text": text_m}

    def totals(self) -> dict[str, Any]:
        """Bits per weight and bytes, predicted from the plan (no model run needed)."""
        s = self.plan.summary()
        return {"bits_per_weight": s["bits_per_weight"], "quantized_bits_per_weight": s["quantized_bits_per_weight"],
                "mb_before": s["weight_bytes"]["before"] / 1e6, "mb_after": s["weight_bytes"]["after"] / 1e6,
                "quantized_sites": s["quantized_sites"], "sites": s["sites"]}

    def text_diff(self) -> list[dict[str, Any]]:
        """Per prompt: the prompt, baseline and current continuations as token strings, and where they differ."""
        dec = self.tokenizer.decode
        out = []
        for i, prompt in enumerate(self.es.prompts):
            a = self.baseline.token_ids[i]
            b = self.current.tokens[i]
            div = self.report["first_divergence"][i]
            out.append({"prompt": prompt, "before": [dec([t]) for t in a], "after": [dec([t]) for t in b],
                        "differs": [j >= len(a) or a[j] != t for j, t in enumerate(b)],
                        "differs_before": [j >= len(b) or b[j] != t for j, t in enumerate(a)],
                        "first_divergence": div})
        return out

    def site_error_table(self) -> list[dict[str, Any]]:
        """Per quantized site, in model order: name, kind, block, relative output error, its spec label."""
        errs = self.report.get("site_errors", {})
        return [{"site": s.name, "kind": s.kind, "block": s.block, "expert": s.expert,
                 "rel_error": errs[s.name]["rel_error"], "basis": errs[s.name]["basis"],
                 "spec": self.plan.configs[s.name].spec.label()} for s in self.sites if s.name in errs]

    @torch.no_grad()
    def inspect(self, site: str | Site, bits: int | str | None = None, scheme: str | None = None,
                group: int | str | None = None, group_index: int = 0) -> dict[str, Any]:
        """What quantization does to one site's weight: the data of the weight inspector.

        With no spec fields, the site's current spec (int4 g128 asym where it is kept). Returns the
        histogram of the whole weight and of one group, the group's quantization grid (every value it
        can store) and how many weights land on each level, and the relative error against bits.
        """
        s = self.site(site)
        cur = self.plan.configs[s.name]
        fields = {k: v for k, v in (("bits", bits), ("scheme", scheme), ("group", group)) if v is not None}
        if cur.keep and fields.get("bits") in (None, 16, "keep"):
            fields["bits"] = 4  # a kept site is shown as it would be at 4 bits
        spec = self._config_for(s, cur, fields).spec
        if not spec.is_fp8 and isinstance(spec.group, int) and s.k % spec.group:
            raise CiuicError(f"group {spec.group} does not divide the row length {s.k} of {s.name}; "
                             "accepted: a divisor of it, 'channel' or 'tensor'")
        st = state_of(self.model)
        w = loaded_weight(self.model, st, s).detach().float().cpu()
        w2 = w.reshape(1, -1) if w.dim() == 1 else w
        qt = self._quantized(s, spec, w2)
        wq = dequantize(qt, torch.float32).reshape(w2.shape)
        n, k = w2.shape
        if spec.is_fp8:
            gsize, per_row = FP8_BLOCK, -(-k // FP8_BLOCK)
        else:
            gsize = k if spec.group in ("channel", "tensor") else int(spec.group)
            per_row = -(-k // gsize)
        n_groups = n * per_row
        if not isinstance(group_index, int) or isinstance(group_index, bool) or not 0 <= group_index < n_groups:
            raise CiuicError(f"group_index {group_index!r} is out of range; accepted: 0..{n_groups - 1}")
        r, g = divmod(group_index, per_row)
        sl = slice(g * gsize, min((g + 1) * gsize, k))
        vals, vals_q = w2[r, sl], wq[r, sl]
        if spec.is_fp8:
            scale = float(qt.scales.reshape(-1, qt.scales.shape[-1])[r // FP8_BLOCK, g])
            grid = _fp8_values() * scale
            zero = None
        else:
            scale = float(qt.group_scales().float().reshape(n, -1)[r, 0 if spec.group == "tensor" else g])
            zero = int(qt.group_zeros().reshape(n, -1)[r, 0 if spec.group == "tensor" else g])
            grid = (torch.arange(2 ** spec.bits, dtype=torch.float32) - zero) * scale
        lo, hi = float(vals.min()), float(vals.max())
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        shown = grid[(grid >= lo - pad - scale) & (grid <= hi + pad + scale)] if spec.is_fp8 else grid
        levels, counts = torch.unique(vals_q, return_counts=True)
        curve = {}
        for b in INSPECT_BITS:
            sp = spec if spec.is_fp8 else spec.replace(bits=b)
            if spec.is_fp8 and b != 8:
                continue
            q = dequantize(self._quantized(s, sp, w2), torch.float32).reshape(w2.shape)
            curve[b] = {"rel_error": float((q - w2).norm() / w2.norm().clamp_min(1e-30)),
                        "bits_per_weight": 8.0 * self._quantized(s, sp, w2).nbytes / w2.numel()}
        err = float((wq - w2).norm() / w2.norm().clamp_min(1e-30))
        h_all, e_all = _hist(w2.reshape(-1))
        h_grp, e_grp = _hist(vals)
        return {
            "site": s.name, "kind": s.kind, "shape": list(s.shape), "spec": spec.to_dict(), "label": spec.label(),
            "current": cur.spec.label(), "group_index": group_index, "groups": n_groups, "group_size": int(vals.numel()),
            "row": r, "scale": scale, "zero": zero, "grid": shown.tolist(), "levels": levels.tolist(),
            "level_counts": counts.tolist(), "values": vals.tolist(), "dequantized": vals_q.tolist(),
            "group_error": float((vals_q - vals).norm() / vals.norm().clamp_min(1e-30)), "rel_error": err,
            "bits_per_weight": 8.0 * qt.nbytes / w2.numel(), "error_curve": curve,
            "hist": {"counts": h_all, "edges": e_all}, "group_hist": {"counts": h_grp, "edges": e_grp},
        }

    def _quantized(self, s: Site, spec: QuantSpec, w2: torch.Tensor) -> QTensor:
        key = (s.name, spec, False)  # the key apply uses for an unfolded weight
        qt = self.weights.get(key) if w2.dim() == 2 and len(s.shape) == 2 else None
        if qt is None:
            qt = quantize(w2, spec)
            if len(s.shape) == 2:
                self.weights[key] = qt
        return qt

    def machine(self) -> dict[str, Any]:
        """What this machine has (CPU features, GPU, compilers), the kernel backends, and which backend
        each quantized site's module ran on."""
        try:
            from .kernels.compat import report as compat_report

            info = compat_report()
        except Exception as e:  # noqa: BLE001 - the report is informative; never let it break a view
            info = {"unavailable": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        used = backends_in_use(self.model)
        counts: dict[str, int] = {}
        for b in used.values():
            counts[b] = counts.get(b, 0) + 1
        return {"machine": info, "backends": REGISTRY.status(), "layouts": list(REGISTRY.layouts()),
                "sites": used, "backend_counts": counts, "torch": torch.__version__,
                "threads": torch.get_num_threads()}

    def cache_stats(self) -> dict[str, Any]:
        return {"weights": self.weights.stats(), "site_errors": {"entries": len(self._site_err),
                                                                 "limit": int(self._site_err.maxsize)},
                "history": len(self.history), "undo": len(self._undo), "redo": len(self._redo)}

    def close(self) -> None:
        """Put the model back as loaded and drop the caches."""
        revert(self.model)
        self.weights.clear()
        self._site_err.clear()
        self._listeners.clear()

    def __repr__(self) -> str:
        m = self.summary()
        return (f"Session({self.name!r}, {len(self.sites)} sites, state #{self.current.index} "
                f"{self.current.label!r}, KL {m['kl']:.4g}, {m['bits_per_weight']:.2f} bpw)")


# ---------------------------------------------------------------------------------- layer reuse
class _Replay(nn.Module):
    """Stands in for one decoder layer whose output on these inputs is already known."""

    def __init__(self, layer: nn.Module, output: Any):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not registered: it stays the model's module
        object.__setattr__(self, "_output", output)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._output

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)


class LayerReuse:
    """Forward passes that recompute only the decoder layers a change can affect.

    For a fixed input (the held-out windows, the prompts with their drafts) it keeps each decoder
    layer's output together with what determined it: the configs of the sites before the layers
    (the embedding), the fusion switches, and the configs of every block up to that layer. On the next
    forward, the layers before the first block whose configs changed are replayed from those outputs
    (their inputs and weights are the same, so are their outputs, bit for bit) and the others run.
    Changing a site of block 3 recomputes blocks 3 and up; changing the head recomputes no block.

    Only forwards without a KV cache go through here. Where the model's decoder layers cannot be
    found, or their outputs would take more than ``budget_bytes``, every forward runs in full.
    """

    def __init__(self, model: nn.Module, site_list: list[Site], budget_bytes: int = 256 * 2**20):
        self.budget = budget_bytes
        self.layers: nn.ModuleList | None = None
        self.entries: dict[str, tuple[torch.Tensor, list[Any], list[Any]]] = {}
        first = next((s for s in site_list if s.block == 0), None)
        path = None
        if first is not None:
            for prefix in ("layers", "h", "blocks"):
                marker = f"{prefix}.0."
                at = (first.name + ".").find(marker)
                if at >= 0 and (at == 0 or first.name[at - 1] == "."):
                    path = first.name[: at + len(prefix)]
                    break
        try:
            layers = model.get_submodule(path) if path else None
        except AttributeError:
            layers = None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            self.layers = layers
        n = len(self.layers) if self.layers is not None else 0
        self._pre = [s.name for s in site_list if s.block is None and s.role not in ("head",) and s.kind != "norm.final"]
        self._per_block: list[list[str]] = [[] for _ in range(n)]
        for s in site_list:
            if s.block is not None and s.block < n:
                self._per_block[s.block].append(s.name)
            elif s.block is not None:
                self._pre.append(s.name)  # a block the layer list does not hold: be safe, recompute all

    def signature(self, plan: Plan) -> list[Any]:
        c = plan.configs
        head = (tuple(c[n] for n in self._pre), tuple(sorted(plan.recipe.fusions.items())), plan.recipe.kv_cache)
        return [head] + [tuple(c[n] for n in names) for names in self._per_block]

    def clear(self) -> None:
        self.entries.clear()

    @torch.no_grad()
    def forward(self, model: nn.Module, tag: str, input_ids: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Logits of ``model(input_ids)`` (no cache), reusing what an earlier call with ``tag`` computed."""
        dev = next(model.parameters()).device
        if self.layers is None:
            return model(input_ids=input_ids.to(dev), use_cache=False).logits
        sig = self.signature(plan)
        n = len(self.layers)
        start, outputs = 0, [None] * n
        prev = self.entries.get(tag)
        if prev is not None and prev[0].shape == input_ids.shape and torch.equal(prev[0], input_ids):
            old_sig, old_out = prev[1], prev[2]
            same = 0
            while same < len(sig) and sig[same] == old_sig[same]:
                same += 1
            start = max(0, min(same - 1, n))  # sig[0] is what comes before the layers
            outputs = list(old_out)
        layers = self.layers
        originals = [layers[i] for i in range(start)]
        handles = []

        def keep(i: int):
            def hook(_m, _a, out):
                outputs[i] = out
            return hook

        try:
            for i in range(start):
                layers[i] = _Replay(originals[i], outputs[i])
            for i in range(start, n):
                handles.append(layers[i].register_forward_hook(keep(i)))
            logits = model(input_ids=input_ids.to(dev), use_cache=False).logits
        finally:
            for i, m in enumerate(originals):
                layers[i] = m
            for h in handles:
                h.remove()
        size = sum(o.numel() * o.element_size() for o in outputs if isinstance(o, torch.Tensor))
        if size <= self.budget and all(o is not None for o in outputs):
            self.entries[tag] = (input_ids.clone(), sig, outputs)
        else:
            self.entries.pop(tag, None)
        return logits


# -------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _blocks(v: Any) -> set[int]:
    items = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    try:
        out = set(items)
    except TypeError:
        out = {None}
    if not out or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in out):
        raise CiuicError(f"blocks must be a block index or a list of them (integers >= 0), got {v!r}")
    return out


def _check_layout_kernel(layout: Any, kernel: Any) -> None:
    layouts = REGISTRY.layouts()
    if layout not in layouts:
        raise CiuicError(f"layout {layout!r} is not known here; accepted: {', '.join(layouts)}")
    kernels = ("auto",) + tuple(REGISTRY.backends)
    if kernel not in kernels:
        raise CiuicError(f"kernel {kernel!r} is not known here; accepted: {', '.join(kernels)}")


def _bits_of(spec: QuantSpec) -> float:
    return 16.0 if spec.keep else 8.0 if spec.is_fp8 else float(spec.bits)


def _short(spec: QuantSpec) -> str:
    return "keep" if spec.keep else "fp8" if spec.is_fp8 else str(spec.bits)


def _label_order(label: str) -> float:
    return 8.5 if label == "fp8" else 16.0 if label == "keep" else float(label)


_KIND_ORDER = ("embed", "attn.", "mlp.", "moe.shared.", "moe.router", "moe.expert.", "norm.", "head")


def _row_order(row: str, first_seen: int) -> tuple[int, int, int]:
    rank = next((i for i, p in enumerate(_KIND_ORDER) if row.startswith(p)), len(_KIND_ORDER))
    expert = int(row[row.index("[") + 1:-1]) if row.endswith("]") and "[" in row else -1
    return rank, expert, first_seen


def _hist(x: torch.Tensor, bins: int = HIST_BINS) -> tuple[list[float], list[float]]:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + 1e-12
    counts = torch.histc(x.float(), bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return counts.tolist(), edges.tolist()


_FP8: torch.Tensor | None = None


def _fp8_values() -> torch.Tensor:
    global _FP8
    if _FP8 is None:
        v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        _FP8 = torch.unique(v[torch.isfinite(v)])
    return _FP8


def _put_timing(rep: dict[str, Any], before: dict[str, Any], after: dict[str, Any] | None) -> None:
    after = after or {}
    rep["latency_ms"] = {
        "prefill": {"before": before["prefill_ms"], "after": after.get("prefill_ms"), "tokens": before["prefill_tokens"]},
        "decode": {"before": before["decode_ms"], "after": after.get("decode_ms")},
    }
    rep["tokens_per_s"] = {"before": before["tokens_per_s"], "after": after.get("tokens_per_s")}
    rep["op_ms"] = {"before": before["op_ms"], "after": after.get("op_ms")}


@torch.no_grad()
def _timed_decode(model: nn.Module, prompts: list[list[int]], new_tokens: int,
                  owner_kinds: dict[str, str]) -> tuple[list[float], dict[str, float]]:
    """Decode steps' wall times (first step of each prompt excluded), then one more pass with hooks on
    the sites' modules for the time per op kind (ms per decode step; ``other`` is the rest)."""
    dev = next(model.parameters()).device

    def run(record: list[float] | None, on_step: Callable[[bool], None] | None = None) -> int:
        n = 0
        for prompt in prompts:
            steps = greedy_steps(model, torch.tensor([prompt], device=dev))
            next(steps)  # the prompt's forward: not a decode step
            for _ in range(new_tokens - 1):
                if on_step:
                    on_step(True)
                t0 = time.perf_counter()
                int(next(steps)[0, 0])
                if record is not None:
                    record.append((time.perf_counter() - t0) * 1e3)
                if on_step:
                    on_step(False)
                n += 1
        return n

    run(None)  # warm-up
    steps: list[float] = []
    run(steps)
    acc: dict[str, float] = {}
    active = [False]
    starts: dict[int, float] = {}
    handles = []
    for owner, kind in owner_kinds.items():
        try:
            mod = model.get_submodule(owner)
        except AttributeError:
            continue

        def pre(m, args, _k=kind):
            if active[0]:
                starts[id(m)] = time.perf_counter()

        def post(m, args, out, _k=kind):
            if active[0] and id(m) in starts:
                acc[_k] = acc.get(_k, 0.0) + (time.perf_counter() - starts.pop(id(m))) * 1e3

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    total = [0.0]
    t_step = [0.0]

    def on_step(start: bool) -> None:
        active[0] = start
        if start:
            t_step[0] = time.perf_counter()
        else:
            total[0] += (time.perf_counter() - t_step[0]) * 1e3

    try:
        n = run(None, on_step)
    finally:
        for h in handles:
            h.remove()
    n = max(n, 1)
    op = {k: v / n for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}
    op["other"] = max(total[0] / n - sum(op.values()), 0.0)
    return steps, op
