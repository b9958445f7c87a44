"""Allocation: choose a format per unit that minimizes the predicted KL under a budget, then verify.

The predicted KL of a plan is the sum of its units' measured sensitivities (they add up well while
each is small; the verification step measures the real one). The budget is bits per weight over the
quantizable sites, total bytes, or a decode latency predicted from per-site kernel timings on this
machine. The solver is a Lagrangian relaxation of the multiple-choice knapsack (for each price λ
every unit picks its cheapest format in KL + λ·cost; λ is bisected to the budget) followed by a greedy
pass that spends what is left on the best KL gain per unit of cost.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any, Callable

import torch
from torch import nn

from ..errors import CiuicError
from ..kernels import REGISTRY
from ..measure import compare, snapshot
from ..plan import Plan, SiteConfig, keep_plan, resolve
from ..quant import QuantSpec, quantize
from ..recipe import Recipe, Rule
from ..sites import Site
from ..transforms import apply, revert
from .calibrate import prepare_calibrated
from .sensitivity import KLProbe, SensitivityTable, fit_spec, label


def _solve(kl: dict[str, dict[str, float]], cost: dict[str, dict[str, float]], budget: float) -> dict[str, str]:
    units = list(kl)

    def pick(lam: float) -> dict[str, str]:
        return {u: min(kl[u], key=lambda f: (kl[u][f] + lam * cost[u][f], cost[u][f])) for u in units}

    def total(choice: dict[str, str]) -> float:
        return sum(cost[u][choice[u]] for u in units)

    cheapest = {u: min(cost[u], key=lambda f: (cost[u][f], kl[u][f])) for u in units}
    if total(cheapest) > budget * (1 + 1e-9):
        raise CiuicError(f"the budget cannot be met even with the cheapest format everywhere "
                         f"(needs {total(cheapest):.4g}, budget {budget:.4g})")
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        if total(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    # spend the slack: best KL reduction per unit of extra cost, while it fits
    spent = total(choice)
    while True:
        best = None
        for u in units:
            for f in kl[u]:
                dc = cost[u][f] - cost[u][choice[u]]
                dk = kl[u][choice[u]] - kl[u][f]
                if dk > 0 and spent + dc <= budget * (1 + 1e-9):
                    score = dk / max(dc, 1e-12)
                    if best is None or score > best[0]:
                        best = (score, u, f, dc)
        if best is None:
            break
        _, u, f, dc = best
        choice[u] = f
        spent += dc
    return choice


def kernel_latency(site_list: list[Site], formats: list[QuantSpec], device: str = "cpu", repeats: int = 20) -> dict:
    """Median ms of one batch-1 matmul per (shape, format) with the backend the registry picks, and dense."""
    out: dict[tuple, float] = {}
    shapes = sorted({tuple(s.shape) for s in site_list if len(s.shape) == 2})
    for shape in shapes:
        n, k = shape
        w = torch.randn(n, k) * 0.02
        x = torch.randn(1, k)
        cases: list[tuple[str, Any]] = [("dense", None)] + [(label(f), f) for f in formats]
        for name, spec in cases:
            if spec is None:
                fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
            else:
                spec = spec if not isinstance(spec.group, int) or k % spec.group == 0 else spec.replace(group="channel")
                be = REGISTRY.pick(device, spec, "rowmajor", 1)
                prep = be.prepare(quantize(w, spec), "rowmajor")
                fn = lambda be=be, prep=prep: be.linear(x, prep, None)  # noqa: E731
            for _ in range(3):
                fn()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            out[(shape, name)] = statistics.median(ts)
    return out


def plan_from_choice(site_list: list[Site], table: SensitivityTable, choice: dict[str, str], name: str) -> Plan:
    by_label = {label(f): f for f in table.formats}
    base = keep_plan(site_list)
    sites_by_name = {s.name: s for s in site_list}
    changes = {}
    for u, f in choice.items():
        if f == "keep":
            continue
        for n in table.units[u]:
            changes[n] = SiteConfig(fit_spec(by_label[f], sites_by_name[n]))
    plan = base.with_configs(changes)
    rec = plan.as_recipe(name)
    plan.recipe = rec
    return plan


def allocate(site_list: list[Site], table: SensitivityTable, target_bpw: float | None = None,
             max_bytes: int | None = None, max_latency_ms: float | None = None, latency: dict | None = None,
             base_latency_ms: float | None = None, allow_keep: bool = True) -> tuple[Plan, dict[str, Any]]:
    """The plan minimizing predicted KL under exactly one budget; and what the solver predicted."""
    given = [x is not None for x in (target_bpw, max_bytes, max_latency_ms)]
    if sum(given) != 1:
        raise CiuicError("give exactly one budget: target_bpw, max_bytes or max_latency_ms")
    sites_by_name = {s.name: s for s in site_list}
    kl = {u: dict(v) for u, v in table.kl.items()}
    cost: dict[str, dict[str, float]] = {}
    for u in kl:
        cost[u] = {f: float(b) for f, b in table.nbytes[u].items()}
        if allow_keep:
            kl[u]["keep"] = 0.0
            cost[u]["keep"] = float(table.dense_bytes[u])
    params = sum(table.params.values())
    if target_bpw is not None:
        budget = target_bpw * params / 8.0
    elif max_bytes is not None:
        budget = float(max_bytes)
    else:
        if latency is None or base_latency_ms is None:
            raise CiuicError("a latency budget needs kernel timings (kernel_latency) and the dense decode latency")
        dense_total = 0.0
        for u in kl:
            lat_cost = {}
            for f in kl[u]:
                key = "dense" if f == "keep" else f
                lat_cost[f] = sum(latency[(tuple(sites_by_name[n].shape), key)] for n in table.units[u])
            dense_total += lat_cost.get("keep", sum(latency[(tuple(sites_by_name[n].shape), "dense")] for n in table.units[u]))
            cost[u] = lat_cost
        overhead = base_latency_ms - dense_total
        budget = max_latency_ms - overhead
    choice = _solve(kl, cost, budget)
    plan = plan_from_choice(site_list, table, choice, "auto")
    predicted = sum(kl[u][choice[u]] for u in kl)
    used = sum(cost[u][choice[u]] for u in kl)
    info = {"predicted_kl": predicted, "budget": budget, "used": used,
            "formats": dict(Counter(choice.values())),
            "choice": choice, "kl": kl, "cost": cost}
    if max_latency_ms is not None:
        info["predicted_latency_ms"] = used + (max_latency_ms - budget)
    return plan, info


def refine(model: nn.Module, tokenizer, site_list: list[Site], table: SensitivityTable, info: dict[str, Any],
           es="quick", cache: dict | None = None, rounds: int = 3, tries: int = 6,
           progress: Callable[[int, int], None] | None = None) -> tuple[Plan, dict[str, Any]]:
    """Improve an allocation on measured KL, where the sum of single-unit sensitivities is wrong.

    Units interact (the KL of a plan is well above the sum of its units' KLs once many are quantized),
    so the solver's plan is refined around itself: each round measures, *in the context of the whole
    plan*, what moving each unit one format up (better, dearer) or down (cheaper) does; pairs the
    upgrades with the fewest-KL downgrades that pay for them within the budget; measures the most
    promising exchanges and keeps the best one that lowers the measured KL. The result never costs
    more than the budget and never measures worse than the solver's plan on ``es``.
    """
    kl, cost, budget = info["kl"], info["cost"], info["budget"]
    choice = dict(info["choice"])
    probe = KLProbe(model, tokenizer, es)
    cache = cache if cache is not None else {}
    t0 = time.perf_counter()
    evals = 0

    def measure(ch: dict[str, str]) -> float:
        nonlocal evals
        apply(model, plan_from_choice(site_list, table, ch, "auto"), cache=cache)
        evals += 1
        return probe.kl()

    def moves(u: str) -> tuple[str | None, str | None]:
        c0, k0 = cost[u][choice[u]], kl[u][choice[u]]
        dearer = [f for f in kl[u] if cost[u][f] > c0 and kl[u][f] < k0]
        cheaper = [f for f in kl[u] if cost[u][f] < c0]
        up = min(dearer, key=lambda f: (cost[u][f], kl[u][f])) if dearer else None
        down = min(cheaper, key=lambda f: (kl[u][f], -cost[u][f])) if cheaper else None
        return up, down

    history = []
    try:
        current = start = measure(choice)
        for rnd in range(rounds):
            spent = sum(cost[u][choice[u]] for u in choice)
            ups, downs = {}, {}
            units = list(choice)
            for i, u in enumerate(units):
                up, down = moves(u)
                if up is not None:
                    ups[u] = (current - measure({**choice, u: up}), cost[u][up] - cost[u][choice[u]], up)
                if down is not None:
                    downs[u] = (measure({**choice, u: down}) - current, cost[u][choice[u]] - cost[u][down], down)
                if progress:
                    progress(rnd * len(units) + i + 1, rounds * len(units))
            cands = []
            order_down = sorted(downs, key=lambda u: downs[u][0] / max(downs[u][1], 1e-9))
            for u, (gain, extra, f_up) in sorted(ups.items(), key=lambda kv: -kv[1][0] / max(kv[1][1], 1e-9)):
                if gain <= 0:
                    continue
                need = spent + extra - budget * (1 + 1e-9)
                change, loss = {u: f_up}, 0.0
                for d in order_down:
                    if need <= 0:
                        break
                    if d == u:
                        continue
                    change[d] = downs[d][2]
                    loss += downs[d][0]
                    need -= downs[d][1]
                if need <= 0 and gain - loss > 0:
                    cands.append((gain - loss, change))
            cands.sort(key=lambda c: -c[0])
            best = None
            for predicted, change in cands[:tries]:
                k = measure({**choice, **change})
                if k < current and (best is None or k < best[0]):
                    best = (k, change, predicted)
            if best is None:
                history.append({"round": rnd + 1, "measured_kl": current, "accepted": None})
                break
            choice.update(best[1])
            history.append({"round": rnd + 1, "measured_kl": best[0], "was": current, "predicted_gain": best[2],
                            "changed": {u: f for u, f in best[1].items()}})
            current = best[0]
    finally:
        revert(model)
    plan = plan_from_choice(site_list, table, choice, "auto")
    used = sum(cost[u][choice[u]] for u in choice)
    out = {"measured_kl_before": start, "measured_kl_after": current, "evalset": getattr(es, "name", es),
           "rounds": history, "evaluations": evals, "seconds": time.perf_counter() - t0, "used": used,
           "formats": dict(Counter(choice.values())), "choice": choice}
    return plan, out


def verify(model: nn.Module, tokenizer, plans: dict[str, Plan], es="standard", timing: bool = False,
           progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, Any]]:
    """Measure each plan against the baseline on one evaluation set: KL, top-1, perplexity, bpw."""
    revert(model)
    base = snapshot(model, tokenizer, es, timing=timing)
    out = {}
    site_list = None
    for i, (name, plan) in enumerate(plans.items()):
        site_list = site_list or list(plan.sites.values())
        cache: dict = {}
        prepare_calibrated(model, tokenizer, plan, cache)  # GPTQ / output-clipped sites are calibrated first
        apply(model, plan, cache=cache)
        try:
            rep = compare(base, snapshot(model, tokenizer, es, timing=timing), model, site_list)
        finally:
            revert(model)
        out[name] = {"kl": rep["kl"], "top1_agreement": rep["top1_agreement"],
                     "perplexity": rep["perplexity"]["after"], "bits_per_weight": rep["quantized_sites"]["bits_per_weight"],
                     "decode_ms": rep["latency_ms"]["decode"]["after"], "baseline_decode_ms": rep["latency_ms"]["decode"]["before"]}
        if progress:
            progress(i + 1, len(plans))
    return out


def uniform(site_list: list[Site], spec: QuantSpec) -> Plan:
    rec = Recipe([Rule(("*",), {k: v for k, v in spec.to_dict().items()}, None, False, 0)], label(spec))
    return resolve(rec, site_list) if all(not isinstance(spec.group, int) or s.k % spec.group == 0
                                          for s in site_list if not s.keep_default) else \
        keep_plan(site_list).with_configs({s.name: SiteConfig(fit_spec(spec, s)) for s in site_list if not s.keep_default})
