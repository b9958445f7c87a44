"""Compare a baseline and a candidate on the same inputs.

The report (a plain dict, JSON-ready) holds what the CLI prints and the panels draw: generated text
side by side, mean KL divergence of next-token distributions, top-1 agreement, perplexity before and
after, per-site relative output error, prefill and decode latency, weight bytes and bits per weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import DTYPE_BYTES, Plan
from ..quant import dequantize
from ..sites import Site
from ..transforms.apply import _norm_scale, fold_sources, loaded_module, loaded_weight, site_weight, state_of
from .snapshot import Snapshot


def kl_top1(base: Snapshot, cand: Snapshot) -> tuple[float, float]:
    """Mean KL(base || cand) over scored positions, and the fraction whose argmax agrees."""
    p, q = base.logprobs, cand.logprobs
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0).mean()
    top1 = (p.argmax(-1) == q.argmax(-1)).float().mean()
    return float(kl), float(top1)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def weight_bytes(model: nn.Module, site_list: list[Site]) -> dict[str, Any]:
    """Bytes of every site as loaded and as now stored (quantized sites counted as packed)."""
    st = state_of(model)
    before = after = params = 0
    q_before = q_after = q_params = 0
    for s in site_list:
        b = s.params * DTYPE_BYTES.get(s.dtype, 4)
        before += b
        params += s.params
        qt = st.qweights.get(s.name)
        if qt is None:
            after += b
        else:
            after += qt.nbytes
            q_before += b
            q_after += qt.nbytes
            q_params += s.params
    return {
        "before": before,
        "after": after,
        "params": params,
        "bits_per_weight": 8.0 * after / max(params, 1),
        "quantized_sites": {
            "count": len(st.qweights),
            "params": q_params,
            "before": q_before,
            "after": q_after,
            "bf16": q_params * 2,
            "ratio_vs_loaded": q_after / q_before if q_before else None,
            "ratio_vs_bf16": q_after / (q_params * 2) if q_params else None,
            "bits_per_weight": 8.0 * q_after / q_params if q_params else None,
            "bits_per_weight_loaded": 8.0 * q_before / q_params if q_params else None,
        },
    }


@torch.no_grad()
def site_errors(model: nn.Module, site_list: list[Site], captured: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Relative output error of each quantized site on the inputs it saw in the baseline run.

    ``||x (Wq - W)^T|| / ||x W^T||`` with ``x`` the captured baseline input of the site's module (for
    an expert: the tokens routed to it; for a down projection: its hidden activations computed with the
    loaded weights). Where no input was seen (an expert no token chose), the weight-space error
    ``||Wq - W|| / ||W||`` stands in, marked ``basis: weight``.
    """
    st = state_of(model)
    out: dict[str, dict[str, Any]] = {}
    folds = fold_sources(model, st.plan)[0] if st.plan is not None else {}
    for s in site_list:
        qt = st.qweights.get(s.name)
        if qt is None:
            continue
        w = loaded_weight(model, st, s).detach().float().cpu()
        wq = dequantize(qt, torch.float32).reshape(w.shape).cpu()
        x = _site_input(model, st, s, captured)
        fold = folds.get(s.name) if st.effective.get(s.name, (None, False))[1] else None
        if fold:
            # a folded site quantized W * gamma and sees the normed input without gamma: compare the two
            # on that footing, so the error is the quantization's alone (x W^T is unchanged); where gamma
            # is 0 the input is 0 too and stays 0 (x / inf)
            w = site_weight(model, st, s, fold).float().cpu()
            if x is not None and x.numel():
                gamma = _norm_scale(model, st, fold).float().cpu()
                x = x / gamma.masked_fill(gamma == 0, float("inf"))
        if x is None or x.numel() == 0 or w.dim() < 2:
            err = float((wq - w).norm() / w.norm().clamp_min(1e-30))
            out[s.name] = {"kind": s.kind, "block": s.block, "rel_error": err, "basis": "weight", "rows": 0}
            continue
        ref = F.linear(x, w)
        err = float((F.linear(x, wq) - ref).norm() / ref.norm().clamp_min(1e-30))
        out[s.name] = {"kind": s.kind, "block": s.block, "rel_error": err, "basis": "output", "rows": int(x.shape[0])}
    return out


def _site_input(model, st, s: Site, captured: dict[str, Any]):
    data = captured.get(s.module)
    if data is None:
        return None
    if s.role != "expert" or s.expert is None or not isinstance(data, tuple):
        return data if isinstance(data, torch.Tensor) else None
    x, idx = data
    rows = (idx == s.expert).any(-1)
    xe = x[rows]
    if s.param == "gate_up_proj" or xe.numel() == 0:
        return xe
    bank = loaded_module(model, st, s.module)
    gate, up = F.linear(xe, bank.gate_up_proj[s.expert].float().cpu()).chunk(2, dim=-1)
    return bank.act_fn(gate) * up


def compare(base: Snapshot, cand: Snapshot, model: nn.Module | None = None, site_list: list[Site] | None = None,
            plan: Plan | None = None, base_bytes: dict | None = None) -> dict[str, Any]:
    """The comparison report of two snapshots taken on the same evaluation set."""
    kl, top1 = kl_top1(base, cand)
    rep: dict[str, Any] = {
        "kl": kl,
        "top1_agreement": top1,
        "perplexity": {"before": base.perplexity, "after": cand.perplexity,
                       "change": cand.perplexity / base.perplexity - 1.0},
        "latency_ms": {
            "prefill": {"before": base.prefill_ms, "after": cand.prefill_ms, "tokens": base.prefill_tokens},
            "decode": {"before": base.decode_ms, "after": cand.decode_ms},
        },
        "tokens_per_s": {"before": base.tokens_per_s, "after": cand.tokens_per_s},
        "text": {"prompts": list(base.evalset.prompts), "before": base.texts, "after": cand.texts},
        "first_divergence": [first_divergence(a, b) for a, b in zip(base.token_ids, cand.token_ids)],
        "same_text": sum(a == b for a, b in zip(base.token_ids, cand.token_ids)),
        "peak_rss_mb": cand.peak_rss_mb,
        "evalset": {"name": base.evalset.name, "heldout_positions": int(base.targets.numel()),
                    "prompts": len(base.evalset.prompts), "max_new_tokens": base.evalset.max_new_tokens},
    }
    if model is not None and site_list is not None:
        wb = weight_bytes(model, site_list)
        rep["weight_bytes"] = {"before": wb["before"], "after": wb["after"]}
        rep["bits_per_weight"] = wb["bits_per_weight"]
        rep["quantized_sites"] = wb["quantized_sites"]
        rep["site_errors"] = site_errors(model, site_list, base.site_inputs)
    if plan is not None:
        rep["plan"] = {"recipe": plan.recipe.name, "by_kind": plan.by_kind(), "fusions": dict(plan.recipe.fusions),
                       "kv_cache": plan.recipe.kv_cache}
    return rep
