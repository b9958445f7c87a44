"""Calibration for the quantizers that read input statistics (GPTQ, output-aware clipping): the
input Hessian ``H = sum x x^T`` of each site.

Inputs are the loaded model's (the sites' inputs with nothing quantized), on a calibration text: the
held-out modules' tokens that no evaluation set scores, then a sample of the training corpus shipped with
the package. Text the model never trained on comes first because it is what the model will be run on:
Hessians from text an embedded model has memorized alone fit GPTQ less well (int3 g128 KL 0.072 on
tiny-deepseek against 0.062 with both; docs/benchmarks.md, Search). For an expert, only the tokens
routed to it count; for its down projection, the hidden activations are computed with the loaded
weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import MutableMapping

import torch
import torch.nn.functional as F
from torch import nn

from ..measure.evalset import token_ids, unscored_heldout_ids
from ..plan import Plan
from ..quant.gptq import calibrated_quantize
from ..sites import Site
from ..transforms import revert, state_of
from ..transforms.apply import site_weight, fold_sources, loaded_module

CALIBRATION = Path(__file__).resolve().parents[1] / "measure" / "evalset" / "calibration.txt"
# GPTQ fits each site to its Hessian; with 1,024 tokens (about 250 per routed expert) it overfits and
# lands behind round-to-nearest on held-out text. ~6k unscored held-out tokens plus 8,192 from the
# training sample (the whole calibration file is ~11k) put it well ahead.
CALIBRATION_TOKENS = 8192 + 6144
_MISSING = object()


def calibration_ids(tokenizer, tokens: int = CALIBRATION_TOKENS, window: int = 128) -> torch.Tensor:
    """``[rows, window]`` token ids: the unscored held-out tail, then the training sample, ``tokens`` in all."""
    def whole_windows(ids: torch.Tensor, n: int) -> torch.Tensor:
        n = min(n, ids.numel()) // window * window
        return ids[:n].view(-1, window)

    tail = whole_windows(unscored_heldout_ids(tokenizer), tokens)
    train = token_ids(tokenizer, CALIBRATION.read_text())
    return torch.cat([tail, whole_windows(train, tokens - tail.numel())])


@torch.no_grad()
def collect_hessians(model: nn.Module, tokenizer, site_list: list[Site], tokens: int = CALIBRATION_TOKENS,
                     window: int = 128) -> dict[str, torch.Tensor]:
    """``{site: H [K, K] float64}`` for the given sites (linear and expert sites)."""
    if state_of(model).plan is not None:
        raise RuntimeError("collect_hessians needs the model as loaded; revert it first")
    wanted: dict[str, list[Site]] = {}
    for s in site_list:
        if s.role in ("linear", "head", "expert") and len(s.shape) == 2:
            wanted.setdefault(s.module, []).append(s)
    hs: dict[str, torch.Tensor] = {}
    handles = []

    def add(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        hs[name] = hs.get(name, 0) + x.T @ x

    for owner, sl in wanted.items():
        mod = model.get_submodule(owner)
        if sl[0].role == "expert" and isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor):
            def bank_hook(m, args, kwargs, sl=sl):
                allargs = list(args) + [kwargs[k] for k in ("top_k_index", "top_k_weights") if k in kwargs]
                x, idx = allargs[0].reshape(-1, allargs[0].shape[-1]).float(), allargs[1].reshape(allargs[0].shape[0], -1)
                for s in sl:
                    rows = (idx == s.expert).any(-1)
                    xe = x[rows]
                    if xe.numel() == 0:
                        continue
                    if s.param == "gate_up_proj":
                        add(s.name, xe)
                    else:
                        g, u = F.linear(xe, m.gate_up_proj[s.expert].float()).chunk(2, dim=-1)
                        add(s.name, m.act_fn(g) * u)
            handles.append(mod.register_forward_pre_hook(bank_hook, with_kwargs=True))
        else:
            def lin_hook(m, args, name=sl[0].name):
                add(name, args[0].float())
            handles.append(mod.register_forward_pre_hook(lin_hook))
    try:
        for row in calibration_ids(tokenizer, tokens, window):
            model(input_ids=row[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hs


def prepare_calibrated(model: nn.Module, tokenizer, plan: Plan, cache: MutableMapping, tokens: int = CALIBRATION_TOKENS,
                       progress=None, hessians: MutableMapping | None = None) -> int:
    """Quantize every site of ``plan`` whose spec needs calibration (``method: gptq``, ``clip: output``)
    and put it in ``cache`` for :func:`apply`.

    Returns the number of sites prepared. The Hessians are the loaded model's: if they must be
    collected and a plan is applied, the model is reverted first (apply the plan again afterwards).
    ``hessians`` (site name -> H) keeps them between calls.
    """
    csites = [plan.sites[n] for n, c in plan.configs.items() if not c.keep and c.spec.needs_calibration]
    todo = [s for s in csites if (s.name, plan.configs[s.name].spec, False) not in cache
            and (s.name, plan.configs[s.name].spec, True) not in cache]
    if not todo:
        return 0
    hs = hessians if hessians is not None else {}
    local: dict = {}  # this call's Hessians, whatever a bounded ``hessians`` cache evicts meanwhile
    for s in todo:
        h = hs.get(s.name, _MISSING)
        if h is not _MISSING:
            local[s.name] = h
    missing = [s for s in todo if s.name not in local]
    if missing:
        if state_of(model).plan is not None:
            revert(model)
        got = collect_hessians(model, tokenizer, missing, tokens)
        for s in missing:  # None: no calibration token reached it (an unused expert)
            local[s.name] = hs[s.name] = got.get(s.name)
    folds, _ = fold_sources(model, plan)
    st = state_of(model)
    for i, s in enumerate(todo):
        spec = plan.configs[s.name].spec
        fold = folds.get(s.name)
        w = site_weight(model, st, s, fold)
        h = local[s.name]
        if h is None:  # identity Hessian: GPTQ and output clipping reduce to their weight-error forms
            h = torch.eye(s.k, dtype=torch.float64)
        elif fold:  # the folded weight multiplies x / gamma
            g = loaded_module(model, st, fold).weight.detach().to(torch.float64)
            inv = torch.where(g != 0, 1.0 / g, torch.zeros_like(g))
            h = h * inv[:, None] * inv[None, :]
        cache[(s.name, spec, bool(fold))] = calibrated_quantize(w, h, spec)
        if progress:
            progress(i + 1, len(todo))
    return len(todo)
