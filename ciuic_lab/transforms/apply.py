"""Apply a plan to a model, and revert it exactly.

Two stages, both undone by :func:`revert`:

1. **Sites.** Each quantized site's owner is swapped for a module that holds the packed weights
   (:class:`QuantLinear`, :class:`QuantExperts`, :class:`QuantEmbedding`); routers and norms, which are
   tiny, get their parameter replaced by its dequantized value (``simulated``). With ``norm_fold`` the
   weight a site quantizes (or keeps) is the loaded one times the norm's scale.
2. **Structure.** The plan's fusions and KV-cache form replace attention and MLP modules by fused ones
   built on the stage-1 modules (see :mod:`.fusions`).

The loaded modules and parameters are kept aside, untouched, so revert puts the very same objects back:
the logits after any apply/revert sequence equal the baseline's bit for bit.

Apply is incremental: a second plan re-quantizes only sites whose effective config (spec, layout,
kernel, folded or not) changed, and quantized weights can come from a cache keyed by
``(site, spec, folded)``. The structure stage is rebuilt on every apply (cheap: no weights are copied
except stacked projections).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, MutableMapping

import torch
from torch import nn

from ..errors import CiuicError, out_of_memory
from ..kernels import REGISTRY
from ..plan import KEEP_CONFIG, Plan, SiteConfig
from ..quant import QTensor, dequantize, quantize
from ..sites import Site
from .fusions import (FusedGateUpMLP, FusedMLA, FusedMoE, FusionReport, StackedLinear, fast_norm, is_mla,
                      kv_cache_report, stack_linears)
from .modules import QuantEmbedding, QuantExperts, QuantLinear

FUSION_NAMES = ("qkv_a", "gate_up", "norm_fold", "mla_absorb", "moe_grouped")
# consumers of each norm's output, by site kind
INPUT_NORM_READERS = ("attn.q_a", "attn.kv_a", "attn.q", "attn.k", "attn.v", "attn.indexer.k", "attn.indexer.weights")
POST_NORM_READERS = ("mlp.gate", "mlp.up", "moe.shared.gate", "moe.shared.up", "moe.expert.gate_up",
                     "moe.expert.gate", "moe.expert.up", "moe.router")
FOLDABLE_FAMILIES = ("deepseek_v3", "llama", "qwen2")

Effective = tuple  # (SiteConfig, folded: bool)


@dataclass
class AppliedState:
    """What apply did to one model: enough to undo it and to report on it."""

    plan: Plan | None = None
    effective: dict[str, Effective] = field(default_factory=dict)
    modules: dict[str, nn.Module] = field(default_factory=dict)          # site owner -> loaded module
    params: dict[tuple[str, str], nn.Parameter] = field(default_factory=dict)  # (owner, name) -> loaded param
    qweights: dict[str, QTensor] = field(default_factory=dict)           # site -> quantized weight
    struct_modules: dict[str, nn.Module] = field(default_factory=dict)   # structure stage: path -> module before
    fusions: FusionReport = field(default_factory=FusionReport)

    def quantized_bytes(self) -> int:
        return sum(q.nbytes for q in self.qweights.values())


_STATES: "weakref.WeakKeyDictionary[nn.Module, AppliedState]" = weakref.WeakKeyDictionary()


def state_of(model: nn.Module) -> AppliedState:
    st = _STATES.get(model)
    if st is None:
        st = AppliedState()
        _STATES[model] = st
    return st


def current_plan(model: nn.Module) -> Plan | None:
    return state_of(model).plan


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child = _parent(model, path)
    setattr(parent, child, new)


def _unfused(model: nn.Module, st: AppliedState, path: str) -> nn.Module:
    """The module at ``path`` as stage 1 left it: walks past every structural replacement."""
    mod, prefix = model, ""
    for part in path.split("."):
        prefix = f"{prefix}.{part}" if prefix else part
        before = st.struct_modules.get(prefix)
        mod = before if before is not None else getattr(mod, part)
    return mod


def loaded_module(model: nn.Module, st: AppliedState, path: str) -> nn.Module:
    """The module at ``path`` exactly as loaded (before any swap or fusion)."""
    mod = st.modules.get(path)
    return mod if mod is not None else _unfused(model, st, path)


def loaded_weight(model: nn.Module, st: AppliedState, site: Site) -> torch.Tensor:
    """The site's weight exactly as loaded (never a quantized or folded one)."""
    if (site.module, site.param) in st.params:
        p = st.params[(site.module, site.param)]
    else:
        p = getattr(loaded_module(model, st, site.module), site.param)
    return p[site.expert] if site.role == "expert" and p.dim() == 3 else p


# ------------------------------------------------------------------ folding
def _enabled(plan: Plan) -> dict[str, bool]:
    return {f: bool(plan.recipe.fusions.get(f, False)) for f in FUSION_NAMES}


def fold_sources(model: nn.Module, plan: Plan) -> tuple[dict[str, str], list[str]]:
    """Site name -> path of the norm whose scale folds into it; and notes on what cannot fold."""
    from ..models import family_of

    if not plan.recipe.fusions.get("norm_fold"):
        return {}, []
    if family_of(model) not in FOLDABLE_FAMILIES:
        return {}, [f"norm_fold: not available for this family ({family_of(model)})"]
    by_block: dict[int, list[Site]] = defaultdict(list)
    for s in plan.sites.values():
        if s.block is not None:
            by_block[s.block].append(s)
    out: dict[str, str] = {}
    notes = []
    for b, group in by_block.items():
        norms = {s.kind: s for s in group if s.role == "norm"}
        for norm_kind, readers in (("norm.input", INPUT_NORM_READERS), ("norm.post_attn", POST_NORM_READERS)):
            norm = norms.get(norm_kind)
            if norm is None:
                continue
            if not plan.configs[norm.name].keep:
                notes.append(f"{norm.name}: quantized norms are not folded")
                continue
            for s in group:
                if s.kind in readers:
                    out[s.name] = norm.module
    return out, notes


def _norm_scale(model: nn.Module, st: AppliedState, norm_path: str) -> torch.Tensor:
    p = st.params.get((norm_path, "weight"))
    return (p if p is not None else loaded_module(model, st, norm_path).weight).detach()


def site_weight(model, st, site: Site, fold_from: str | None) -> torch.Tensor:
    w = loaded_weight(model, st, site).detach()
    if fold_from:
        w = w * _norm_scale(model, st, fold_from).to(w.dtype)
    return w


def _quantize_site(model, st, site: Site, cfg: SiteConfig, fold_from: str | None,
                   cache: MutableMapping | None) -> QTensor:
    key = (site.name, cfg.spec, bool(fold_from))
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    try:
        qt = quantize(site_weight(model, st, site, fold_from), cfg.spec)
    except CiuicError as e:
        raise CiuicError(f"{site.name}: {e}") from None
    if cache is not None:
        cache[key] = qt
    return qt


# ------------------------------------------------------------------ stage 1: sites
def _restore_owner(model: nn.Module, st: AppliedState, owner: str) -> None:
    if owner in st.modules:
        _set_module(model, owner, st.modules.pop(owner))
    for key in [k for k in st.params if k[0] == owner]:
        setattr(model.get_submodule(owner), key[1], st.params.pop(key))


def _needs_swap(eff: Effective) -> bool:
    cfg, folded = eff
    return folded or not cfg.keep


def _check_layouts_and_kernels(plan: Plan) -> None:
    """Every layout and kernel a plan names must be one the registry knows, before anything is touched."""
    layouts = REGISTRY.layouts()
    kernels = ("auto",) + tuple(REGISTRY.backends)
    for name, cfg in plan.configs.items():
        if cfg.layout not in layouts:
            raise CiuicError(f"{name}: layout {cfg.layout!r} is unknown; accepted: {', '.join(layouts)}")
        if cfg.kernel not in kernels:
            raise CiuicError(f"{name}: kernel {cfg.kernel!r} is unknown; accepted: {', '.join(kernels)}")


def apply(model: nn.Module, plan: Plan, cache: MutableMapping | None = None) -> nn.Module:
    """Make ``model`` compute with ``plan`` (in place) and return it. Incremental over the current plan.

    Any error (a bad weight, an impossible fusion) leaves the model exactly as it was before the call.
    """
    if not isinstance(plan, Plan):
        raise CiuicError(f"apply takes a Plan (from ciuic_lab.resolve), got {type(plan).__name__}")
    _check_layouts_and_kernels(plan)
    st = state_of(model)
    folds, fold_notes = fold_sources(model, plan)
    effective = {n: (plan.configs[n], n in folds) for n in plan.configs}
    changed = [n for n in plan.configs if st.effective.get(n, (KEEP_CONFIG, False)) != effective[n]]
    changed += [n for n in st.effective if n not in plan.configs]
    owners: dict[str, list[Site]] = defaultdict(list)
    for n in changed:
        site = plan.sites.get(n) or (st.plan.sites[n] if st.plan else None)
        if site is not None:
            owners[site.module].append(site)
    # Quantize first, before anything is touched: an error leaves the model as it was.
    new_q: dict[str, QTensor] = {}
    owner_sites: dict[str, list[Site]] = {}
    try:
        for owner in owners:
            every = [s for s in plan.sites.values() if s.module == owner]
            owner_sites[owner] = every
            for s in every:
                eff = effective.get(s.name, (KEEP_CONFIG, False))
                if eff[0].keep:
                    continue
                if st.effective.get(s.name) == eff and s.name in st.qweights:
                    new_q[s.name] = st.qweights[s.name]
                else:
                    new_q[s.name] = _quantize_site(model, st, s, eff[0], folds.get(s.name), cache)
    except torch.OutOfMemoryError:
        new_q.clear()
        raise CiuicError(out_of_memory(f"quantizing {len(changed)} changed sites", _device_of(model))) from None
    previous = st.plan
    try:
        _revert_structure(model, st)
        for owner, every in owner_sites.items():
            _restore_owner(model, st, owner)
            for s in every:
                st.qweights.pop(s.name, None)
            if not any(_needs_swap(effective.get(s.name, (KEEP_CONFIG, False))) for s in every):
                continue
            _swap_owner(model, st, owner, every, plan, new_q, folds)
        st.plan = plan
        st.effective = {n: e for n, e in effective.items() if _needs_swap(e)}
        _apply_structure(model, st, plan, folds, fold_notes)
    except BaseException as e:
        # half swapped: back to the weights as loaded (bit-exact), then the plan that was in force
        new_q.clear()
        revert(model)
        restored = previous is None
        if previous is not None:
            try:
                apply(model, previous, cache)
                restored = True
            except Exception:  # noqa: BLE001 - the model stays as loaded; the message says so
                revert(model)
        if isinstance(e, torch.OutOfMemoryError):
            raise CiuicError(out_of_memory("putting the quantized weights in place", _device_of(model),
                                           outcome="nothing was changed" if restored
                                           else "the model was put back as loaded")) from None
        raise
    return model


def _device_of(model: nn.Module):
    p = next(model.parameters(), None)
    return None if p is None else p.device


def _swap_owner(model, st: AppliedState, owner: str, every: list[Site], plan: Plan, new_q: dict[str, QTensor],
                folds: dict[str, str]) -> None:
    mod = model.get_submodule(owner)
    role = every[0].role
    for s in every:
        if s.name in new_q:
            st.qweights[s.name] = new_q[s.name]
    bank = getattr(mod, "gate_up_proj", None)
    if role == "expert" and all(s.expert is not None for s in every) and isinstance(bank, torch.Tensor) and bank.dim() == 3:
        n_exp = bank.shape[0]
        gate_up: list[QTensor | None] = [None] * n_exp
        down: list[QTensor | None] = [None] * n_exp
        quantized = [s for s in every if not plan.configs[s.name].keep]
        layouts = {plan.configs[s.name].layout for s in quantized}
        kernels = {plan.configs[s.name].kernel for s in quantized}
        for s in quantized:
            (gate_up if s.param == "gate_up_proj" else down)[s.expert] = new_q[s.name]
        fold_from = next((folds[s.name] for s in every if s.name in folds), None)
        dense_gate_up = mod.gate_up_proj
        if fold_from:  # kept experts read the folded bank
            dense_gate_up = mod.gate_up_proj.detach() * _norm_scale(model, st, fold_from).to(mod.gate_up_proj.dtype)
        st.modules[owner] = mod
        _set_module(model, owner, QuantExperts(mod, gate_up, down, _one(layouts, owner, "layout"),
                                               _one(kernels, owner, "kernel"), gate_up_w=dense_gate_up))
        return
    if len(every) != 1:
        raise CiuicError(f"{owner}: cannot swap a module that owns {len(every)} sites of role {role}")
    s = every[0]
    cfg = plan.configs[s.name]
    qt = new_q.get(s.name)
    if qt is None:  # kept but folded: a dense copy of the folded weight
        w = site_weight(model, st, s, folds.get(s.name))
        if isinstance(mod, nn.Linear):
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device, dtype=w.dtype)
            new.weight = nn.Parameter(w, requires_grad=False)
            if mod.bias is not None:
                new.bias = mod.bias
            st.modules[owner] = mod
            _set_module(model, owner, new)
        else:
            p = getattr(mod, s.param)
            st.params[(owner, s.param)] = p
            setattr(mod, s.param, nn.Parameter(w.reshape(p.shape), requires_grad=False))
        return
    if isinstance(mod, nn.Linear):
        st.modules[owner] = mod
        _set_module(model, owner, QuantLinear(qt, mod.bias, cfg.layout, cfg.kernel, site=s.name))
    elif isinstance(mod, nn.Embedding):
        st.modules[owner] = mod
        _set_module(model, owner, QuantEmbedding(qt, mod))
    else:  # router, norm, other small parameters: simulated (dequantized value in place)
        p = getattr(mod, s.param)
        st.params[(owner, s.param)] = p
        setattr(mod, s.param, nn.Parameter(dequantize(qt, p.dtype).reshape(p.shape), requires_grad=False))


def _one(values: set[str], owner: str, what: str) -> str:
    if len(values) > 1:
        raise CiuicError(f"{owner}: the experts of one bank must share one {what}, got {', '.join(sorted(values))}")
    return next(iter(values)) if values else ("rowmajor" if what == "layout" else "auto")


# ------------------------------------------------------------------ stage 2: structure
def _replace(model, st: AppliedState, path: str, new: nn.Module) -> None:
    st.struct_modules.setdefault(path, model.get_submodule(path))
    _set_module(model, path, new)


def _apply_structure(model: nn.Module, st: AppliedState, plan: Plan, folds: dict[str, str], notes: list[str]) -> None:
    on = _enabled(plan)
    rep = FusionReport(enabled=dict(on))
    for n in notes:
        rep.note("norm_fold", "model", n)
    st.fusions = rep
    kv_cache = plan.recipe.kv_cache
    if not any(on.values()) and kv_cache == "latent":
        return
    for norm_path in sorted(set(folds.values())):  # the scale now lives in the readers' weights
        _replace(model, st, norm_path, fast_norm(model.get_submodule(norm_path), folded=True))
        rep.note("norm_fold", norm_path)
    for path, mod in list(model.named_modules()):
        if path.endswith("self_attn") and is_mla(mod) and (on["qkv_a"] or on["mla_absorb"] or kv_cache != "latent"):
            qkv = None
            if on["qkv_a"]:
                if mod.q_lora_rank is None:
                    rep.note("qkv_a", path, "no q_a_proj (q_lora_rank is None)")
                else:
                    fused, why = stack_linears([mod.q_a_proj, mod.kv_a_proj_with_mqa])
                    if fused is None:
                        rep.note("qkv_a", path, why)
                    else:
                        qkv = StackedLinear(fused, [mod.q_lora_rank, mod.kv_lora_rank + mod.qk_rope_head_dim])
                        rep.note("qkv_a", path)
            if on["mla_absorb"]:
                rep.note("mla_absorb", path)
            _replace(model, st, path, FusedMLA(mod, qkv, on["mla_absorb"], kv_cache))
        elif path.endswith("self_attn") and (on["qkv_a"] or on["mla_absorb"]):
            for f in ("qkv_a", "mla_absorb"):
                if on[f]:
                    rep.note(f, path, f"not an MLA attention ({type(mod).__name__})")
        elif on["gate_up"] and all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) \
                and not hasattr(mod, "gate_up_proj"):
            fused, why = stack_linears([mod.gate_proj, mod.up_proj])
            if fused is None:
                rep.note("gate_up", path, why)
            else:
                _replace(model, st, path, FusedGateUpMLP(mod, fused))
                rep.note("gate_up", path)
        elif on["moe_grouped"] and hasattr(mod, "experts") and hasattr(mod, "shared_experts") \
                and hasattr(getattr(mod, "gate", None), "e_score_correction_bias"):
            _replace(model, st, path, FusedMoE(mod))
        elif on["moe_grouped"] and path.endswith(".experts"):
            if isinstance(mod, QuantExperts):
                mod.grouped = True
                st.struct_modules.setdefault(path + "#grouped", mod)
            elif isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor):
                n = mod.gate_up_proj.shape[0]
                q = QuantExperts(mod, [None] * n, [None] * n)
                q.grouped = True
                _replace(model, st, path, q)
            else:
                rep.note("moe_grouped", path, "not a 3-D expert bank")
                continue
            rep.note("moe_grouped", path)


def _revert_structure(model: nn.Module, st: AppliedState) -> None:
    for path in reversed(list(st.struct_modules)):
        mod = st.struct_modules.pop(path)
        if path.endswith("#grouped"):
            mod.grouped = False
        else:
            _set_module(model, path, mod)
    st.fusions = FusionReport()


def revert(model: nn.Module) -> nn.Module:
    """Put back every loaded module and parameter: the model is bit-exactly as loaded."""
    st = state_of(model)
    _revert_structure(model, st)
    for owner in reversed(list(st.modules) + [k[0] for k in st.params]):
        _restore_owner(model, st, owner)
    st.qweights.clear()
    st.effective.clear()
    st.plan = None
    return model


# ------------------------------------------------------------------ reporting
def backends_in_use(model: nn.Module) -> dict[str, str]:
    """Site owner -> backend that ran its last forward (``simulated`` for routers and norms).

    A site whose weight a fused module ran (a stacked projection, the shared expert in the grouped MoE
    launch, ``kv_b_proj`` absorbed into attention) gets the backend that ran it there."""
    st = state_of(model)
    ran: dict[str, str] = {}
    for m in model.modules():
        if hasattr(m, "ran_for"):
            ran.update(m.ran_for())
    out = {}
    for owner in st.modules:
        try:
            m = model.get_submodule(owner)
        except AttributeError:  # inside a fused module
            continue
        # (what a fused module ran in its last forward is newer than the site module's own record)
        out[owner] = (ran.get(owner) or getattr(m, "last_backend", None)
                      or ("torch" if type(m) is nn.Linear else "not run yet"))
    for owner, _ in st.params:
        out[owner] = "simulated"
    return out


def layouts_in_force(model: nn.Module) -> dict[str, int]:
    st = state_of(model)
    out: dict[str, int] = {}
    if st.plan is None:
        return out
    for n in st.qweights:
        lay = st.plan.configs[n].layout
        out[lay] = out.get(lay, 0) + 1
    return out


def describe(model: nn.Module) -> dict[str, Any]:
    st = state_of(model)
    d: dict[str, Any] = {
        "quantized_sites": len(st.qweights),
        "quantized_bytes": st.quantized_bytes(),
        "swapped_modules": len(st.modules),
        "simulated_params": len(st.params),
        "fusions": st.fusions.to_dict(),
        "layouts": layouts_in_force(model),
        "kv_cache": st.plan.recipe.kv_cache if st.plan else "latent",
    }
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "kv_lora_rank", None):
        d["kv_cache_bytes"] = kv_cache_report(cfg)
    return d
