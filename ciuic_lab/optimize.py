"""Workflows over load -> plan -> apply -> measure: compare a plan with the baseline, and safe mode.

``evaluate_plan`` measures the baseline, applies a plan and measures again, on one evaluation set.
``safe_optimize`` does the same, then keeps the plan only if it stays within the error thresholds;
otherwise it reverts (the weights' fingerprint is checked to be the loaded one) and raises with the
report.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import CiuicError, SafetyError
from .measure import EvalSet, Snapshot, compare as compare_snapshots, fingerprint, snapshot
from .measure.evalset import evalset as get_evalset
from .plan import Plan, resolve
from .search import prepare_calibrated
from .sites import sites as list_sites
from .transforms import apply, revert


def baseline(model: nn.Module, tokenizer, es: EvalSet | str | None = None, timing: bool = True) -> Snapshot:
    """Measure the model as loaded, keeping each site's inputs for per-site error."""
    return snapshot(model, tokenizer, es, timing=timing, capture=list_sites(model))


def evaluate_plan(model: nn.Module, tokenizer, recipe: Any, es: EvalSet | str | None = None, timing: bool = True,
                  base: Snapshot | None = None, keep: bool = True) -> tuple[Plan, dict[str, Any]]:
    """Apply ``recipe`` to ``model`` and compare with the baseline. With ``keep=False`` revert afterwards."""
    es = get_evalset(es)
    site_list = list_sites(model)
    plan = resolve(recipe, site_list)  # errors here leave the model untouched
    if base is None:
        base = baseline(model, tokenizer, es, timing)
    cache: dict = {}
    prepare_calibrated(model, tokenizer, plan, cache)  # error-compensated sites need calibration first
    apply(model, plan, cache=cache)
    try:
        cand = snapshot(model, tokenizer, es, timing=timing)
        report = compare_snapshots(base, cand, model, site_list, plan)
    except BaseException:
        revert(model)
        raise
    if not keep:
        revert(model)
    return plan, report


def compare(baseline_: Any, candidate: Any, tokenizer=None, es: EvalSet | str | None = None,
            timing: bool = True) -> dict[str, Any]:
    """Compare two models (or two :class:`Snapshot`) on the same evaluation set."""
    es = get_evalset(es)
    snaps = []
    for m in (baseline_, candidate):
        if isinstance(m, Snapshot):
            snaps.append(m)
        elif isinstance(m, nn.Module):
            if tokenizer is None:
                raise CiuicError("compare needs the tokenizer when given models")
            snaps.append(snapshot(m, tokenizer, es, timing=timing))
        else:
            raise CiuicError(f"compare takes models or Snapshots, got {type(m).__name__}")
    return compare_snapshots(snaps[0], snaps[1])


def safe_optimize(model: nn.Module, tokenizer, recipe: Any, max_kl: float = 0.05, min_top1: float | None = None,
                  max_ppl_increase: float | None = None, es: EvalSet | str | None = None,
                  timing: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Apply ``recipe`` and keep it only within the thresholds; else restore the model and raise.

    Returns ``(model, report)``. On refusal raises :class:`SafetyError` whose ``report`` holds the
    comparison and the reasons; the model's weights are then bit-exactly the loaded ones.
    """
    if not (max_kl is None or max_kl >= 0):
        raise CiuicError(f"max_kl must be >= 0, got {max_kl}")
    before = fingerprint(model)
    plan, report = evaluate_plan(model, tokenizer, recipe, es, timing)
    reasons = []
    if max_kl is not None and report["kl"] > max_kl:
        reasons.append(f"KL {report['kl']:.4g} > max_kl {max_kl:g}")
    if min_top1 is not None and report["top1_agreement"] < min_top1:
        reasons.append(f"top-1 agreement {report['top1_agreement']:.3f} < min_top1 {min_top1:g}")
    if max_ppl_increase is not None and report["perplexity"]["change"] > max_ppl_increase:
        reasons.append(f"perplexity +{100 * report['perplexity']['change']:.2f}% > {100 * max_ppl_increase:g}%")
    report["safe"] = {"max_kl": max_kl, "min_top1": min_top1, "max_ppl_increase": max_ppl_increase,
                      "accepted": not reasons, "reasons": reasons}
    if reasons:
        revert(model)
        restored = fingerprint(model) == before
        report["safe"]["restored_bit_exact"] = restored
        raise SafetyError(f"plan {plan.recipe.name!r} refused: {'; '.join(reasons)} (model restored)", report)
    return model, report
