"""Sensitivity: quantize one unit (a site, a block, a kind or an expert) at a time at each candidate
format, and measure the KL divergence it causes on the held-out text.

Units are applied incrementally (only the unit that changes is re-quantized), quantized weights are
cached by (site, spec), and results by (unit, format), so a scan can be resumed or extended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import CiuicError
from ..measure.evalset import evalset as get_evalset
from ..measure.snapshot import heldout_ids, score_heldout
from ..plan import KEEP_CONFIG, Plan, SiteConfig, keep_plan
from ..quant import QuantSpec, expected_nbytes
from ..sites import Site
from ..transforms import apply, revert
from .calibrate import prepare_calibrated

UNITS = ("site", "block", "kind", "expert")


def parse_formats(text: str | Iterable, group: int | str = 128, clip: str = "minmax") -> list[QuantSpec]:
    """``"2,3,4,8"`` (bits) or labels like ``"int4-g128"``, ``"int3-g64-mse"``, ``"int8-channel-sym"``."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for it in items:
        if isinstance(it, QuantSpec):
            out.append(it)
            continue
        it = str(it)
        if it.isdigit():
            b = int(it)
            out.append(QuantSpec(bits=b, group="channel" if b == 8 else group, clip=clip,
                                 scheme="sym" if b == 8 else "asym"))
            continue
        parts = it.split("-")
        if not parts[0].startswith("int") or not parts[0][3:].isdigit():
            raise CiuicError(f"format {it!r} is not understood; accepted: bits like 2,3,4,8 or labels like int4-g128, "
                             "int3-g64-mse, int4-g128-output-gptq, int8-channel-sym")
        kw: dict[str, Any] = {"bits": int(parts[0][3:]), "group": group, "clip": clip}
        for p in parts[1:]:
            if p.startswith("g") and p[1:].isdigit():
                kw["group"] = int(p[1:])
            elif p in ("channel", "tensor"):
                kw["group"] = p
            elif p in ("sym", "asym"):
                kw["scheme"] = p
            elif p in ("mse", "minmax", "output"):
                kw["clip"] = p
            elif p in ("gptq", "rtn"):
                kw["method"] = p
            else:
                raise CiuicError(f"format {it!r}: unknown part {p!r}")
        out.append(QuantSpec(**kw))
    return out


def label(spec: QuantSpec) -> str:
    if spec.keep:
        return "keep"
    g = f"g{spec.group}" if isinstance(spec.group, int) else spec.group
    s = f"int{spec.bits}-{g}"
    if spec.scheme == "sym":
        s += "-sym"
    if spec.clip != "minmax":
        s += f"-{spec.clip}"
    if spec.method != "rtn":
        s += f"-{spec.method}"
    return s


def units_of(site_list: list[Site], unit: str) -> dict[str, list[Site]]:
    """Quantizable sites grouped into units (kept-by-default sites are never part of a unit)."""
    if unit not in UNITS:
        raise CiuicError(f"unit {unit!r} is not supported; accepted: {', '.join(UNITS)}")
    out: dict[str, list[Site]] = {}
    for s in site_list:
        if s.keep_default:
            continue
        if unit == "site":
            key = s.name
        elif unit == "block":
            key = f"block {s.block}"
        elif unit == "kind":
            key = s.kind
        else:
            key = f"{s.module}[{s.expert}]" if s.expert is not None else s.name
        out.setdefault(key, []).append(s)
    return out


def _fits(spec: QuantSpec, s: Site) -> bool:
    return not isinstance(spec.group, int) or s.k % spec.group == 0


def fit_spec(spec: QuantSpec, s: Site) -> QuantSpec:
    """The spec, or per-channel groups where the group does not divide the site's rows."""
    return spec if _fits(spec, s) else spec.replace(group="channel")


@dataclass
class SensitivityTable:
    unit: str
    formats: list[QuantSpec]
    units: dict[str, list[str]]                       # unit -> site names
    params: dict[str, int]                            # unit -> parameter count
    kl: dict[str, dict[str, float]] = field(default_factory=dict)      # unit -> format label -> KL
    nbytes: dict[str, dict[str, int]] = field(default_factory=dict)    # unit -> format label -> bytes
    dense_bytes: dict[str, int] = field(default_factory=dict)          # unit -> bytes as loaded
    seconds: float = 0.0
    evaluations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "formats": [label(f) for f in self.formats], "seconds": self.seconds,
                "evaluations": self.evaluations,
                "rows": [{"unit": u, "sites": len(self.units[u]), "params": self.params[u], "kl": self.kl.get(u, {}),
                          "bytes": self.nbytes.get(u, {})} for u in self.units]}


class KLProbe:
    """Baseline held-out log-probs once; then the KL of the model as it is now, in one batched forward."""

    def __init__(self, model: nn.Module, tokenizer, es="quick"):
        self.model = model
        es = get_evalset(es)
        self.ids = heldout_ids(tokenizer, es)
        self.window = es.window
        self.base, _, _ = score_heldout(model, self.ids, self.window)
        self.p = self.base.exp()

    @torch.no_grad()
    def kl(self) -> float:
        logq, _, _ = score_heldout(self.model, self.ids, self.window)
        return float((self.p * (self.base - logq)).sum(-1).clamp_min(0).mean())


def sensitivity(model: nn.Module, tokenizer, site_list: list[Site], formats: list[QuantSpec], unit: str = "site",
                es="quick", progress: Callable[[int, int], None] | None = None, cache: dict | None = None,
                table: SensitivityTable | None = None, probe: KLProbe | None = None) -> SensitivityTable:
    """KL of quantizing each unit alone at each format (everything else kept)."""
    groups = units_of(site_list, unit)
    if not groups:
        raise CiuicError("the model has no quantizable sites")
    if table is None:
        table = SensitivityTable(unit, list(formats), {u: [s.name for s in ss] for u, ss in groups.items()},
                                 {u: sum(s.params for s in ss) for u, ss in groups.items()})
    revert(model)
    probe = probe or KLProbe(model, tokenizer, es)
    base = keep_plan(site_list)
    qcache = cache if cache is not None else {}
    todo = [(u, f) for u in groups for f in formats if label(f) not in table.kl.get(u, {})]
    t0 = time.perf_counter()
    for f in formats:  # calibrated formats (GPTQ, output clipping) are prepared once for every unit they will be tried on
        if f.needs_calibration and any(g is f for _, g in todo):
            units = {u for u, g in todo if g is f}
            prepare_calibrated(model, tokenizer, base.with_configs(
                {s.name: SiteConfig(fit_spec(f, s)) for u in units for s in groups[u]}), qcache)
    try:
        for i, (u, f) in enumerate(todo):
            changes = {s.name: SiteConfig(fit_spec(f, s)) for s in groups[u]}
            apply(model, base.with_configs(changes), cache=qcache)
            table.kl.setdefault(u, {})[label(f)] = probe.kl()
            table.nbytes.setdefault(u, {})[label(f)] = sum(expected_nbytes(s.shape, changes[s.name].spec) for s in groups[u])
            table.evaluations += 1
            if progress:
                progress(i + 1, len(todo))
    finally:
        revert(model)
    for u, ss in groups.items():
        table.dense_bytes[u] = sum(s.params * 2 for s in ss)  # bf16 reference
    table.seconds += time.perf_counter() - t0
    return table


def attribution(model: nn.Module, tokenizer, plan: Plan, es="quick", unit: str = "site",
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Each unit's share of the whole plan's KL: restore one unit at a time and see how much KL goes away."""
    revert(model)
    probe = KLProbe(model, tokenizer, es)
    site_list = list(plan.sites.values())
    groups = {u: ss for u, ss in units_of(site_list, unit).items() if any(not plan.configs[s.name].keep for s in ss)}
    cache: dict = {}
    try:
        apply(model, plan, cache=cache)
        total = probe.kl()
        rows = []
        for i, (u, ss) in enumerate(groups.items()):
            apply(model, plan.with_configs({s.name: KEEP_CONFIG for s in ss}), cache=cache)
            rows.append({"unit": u, "kl_without": probe.kl(), "gain": None})
            if progress:
                progress(i + 1, len(groups))
    finally:
        revert(model)
    for r in rows:
        r["gain"] = total - r["kl_without"]
    pos = sum(max(r["gain"], 0.0) for r in rows) or 1.0
    for r in rows:
        r["share"] = max(r["gain"], 0.0) / pos
    rows.sort(key=lambda r: -r["gain"])
    return {"kl": total, "unit": unit, "rows": rows}
