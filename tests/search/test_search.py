import json

import pytest
import torch

from ciuic_lab import resolve
from ciuic_lab.errors import CiuicError
from ciuic_lab.quant import QuantSpec, dequantize, quantize
from ciuic_lab.quant.gptq import calibrated_quantize, gptq_quantize, output_clip
from ciuic_lab.search import allocate, attribution, label, parse_formats, prepare_calibrated, sensitivity
from ciuic_lab.search.sensitivity import SensitivityTable


def test_parse_formats():
    fs = parse_formats("2,4,8")
    assert [label(f) for f in fs] == ["int2-g128", "int4-g128", "int8-channel-sym"]
    assert parse_formats("int3-g64-mse")[0] == QuantSpec(bits=3, group=64, clip="mse")
    with pytest.raises(CiuicError, match="not understood"):
        parse_formats("fp4")


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group=64), QuantSpec(bits=3, group="channel"),
                                  QuantSpec(bits=2, group=32, scheme="sym")])
def test_gptq_beats_rtn_on_correlated_inputs(spec):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 128, generator=g) @ (torch.randn(128, 128, generator=g) / 11)
    w = torch.randn(96, 128, generator=g) * 0.05
    gq = gptq_quantize(w, x.T @ x, spec)
    rtn = quantize(w, spec)
    assert gq.codes.shape == rtn.codes.shape and gq.nbytes == rtn.nbytes
    err = lambda q: float((x @ (dequantize(q) - w).T).norm())  # noqa: E731
    assert err(gq) < err(rtn)


def _correlated(seed: int, rows: int = 96, k: int = 128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, k, generator=g) @ (torch.randn(k, k, generator=g) / 11)
    x[:, :: 7] *= 4  # a few inputs matter far more than the rest (as in real activations)
    w = torch.randn(rows, k, generator=g) * 0.05
    return x, w


@pytest.mark.parametrize("spec", [QuantSpec(bits=3, group=32, clip="output"), QuantSpec(bits=4, group="channel", clip="output"),
                                  QuantSpec(bits=2, group=64, scheme="sym", clip="output"),
                                  QuantSpec(bits=3, group="tensor", clip="output")])
def test_output_clipping_beats_weight_clipping_on_the_output(spec):
    x, w = _correlated(5, rows=67, k=160)  # K not a multiple of the group: a short last group
    h = x.T.double() @ x.double()
    oq = calibrated_quantize(w, h, spec)
    rtn, mse = quantize(w, spec.replace(clip="minmax")), quantize(w, spec.replace(clip="mse"))
    assert oq.codes.shape == rtn.codes.shape and oq.nbytes == rtn.nbytes and oq.scales.dtype == torch.float16
    err = lambda q: float((x @ (dequantize(q) - w).T).norm())  # noqa: E731
    assert err(oq) < min(err(rtn), err(mse))
    s, z = output_clip(w, h, spec)  # the stored grid is the one chosen
    assert torch.equal(s, oq.scales)


def test_gptq_act_order_with_identity_hessian_is_round_to_nearest():
    # no correlation between inputs: nothing to compensate, so every column rounds to its nearest code
    # on the fixed grid whatever order it is visited in (this checks the permutation is undone)
    g = torch.Generator().manual_seed(9)
    w = torch.randn(40, 96, generator=g)
    h = torch.diag(torch.rand(96, generator=g, dtype=torch.float64) + 0.5)  # distinct order != natural
    for spec in (QuantSpec(bits=4, group=32), QuantSpec(bits=3, group="channel", clip="mse")):
        gq = gptq_quantize(w, h, spec.replace(method="gptq"))
        assert torch.equal(gq.codes, quantize(w, spec).codes) and torch.equal(gq.scales, quantize(w, spec).scales)


def test_calibrated_formats_refuse_plain_quantize_and_bad_hessians():
    w = torch.randn(8, 64)
    with pytest.raises(CiuicError, match="clip 'output' needs calibration data"):
        quantize(w, QuantSpec(bits=4, group=32, clip="output"))
    with pytest.raises(CiuicError, match="needs W \\[N, K\\] and H \\[K, K\\]; got W \\(8, 64\\), H \\(32, 32\\)"):
        calibrated_quantize(w, torch.eye(32, dtype=torch.float64), QuantSpec(bits=4, group=32, clip="output"))
    bad = torch.eye(64, dtype=torch.float64)
    bad[3, 3] = float("nan")
    with pytest.raises(CiuicError, match="Hessian holds NaN/Inf"):
        calibrated_quantize(w, bad, QuantSpec(bits=4, group=32, method="gptq"))
    with pytest.raises(CiuicError, match="needs no calibration"):
        calibrated_quantize(w, torch.eye(64, dtype=torch.float64), QuantSpec(bits=4, group=32, clip="mse"))


def test_sensitivity_orders_formats_and_caches(tiny, tiny_sites):
    m, tok, _ = tiny
    formats = parse_formats("2,8")
    t = sensitivity(m, tok, tiny_sites, formats, unit="block", es="tiny")
    assert set(t.kl) == {"block 0", "block 1", "block 2"}
    for u in t.kl:
        assert t.kl[u]["int2-g128"] > t.kl[u]["int8-channel-sym"] >= 0
        assert t.nbytes[u]["int2-g128"] < t.nbytes[u]["int8-channel-sym"] < t.dense_bytes[u]
    n = t.evaluations
    sensitivity(m, tok, tiny_sites, formats, unit="block", es="tiny", table=t)
    assert t.evaluations == n  # nothing recomputed


def _table():
    t = SensitivityTable("site", parse_formats("2,4"), {"a": ["a"], "b": ["b"]}, {"a": 800, "b": 800})
    t.kl = {"a": {"int2-g128": 0.5, "int4-g128": 0.1}, "b": {"int2-g128": 0.05, "int4-g128": 0.01}}
    t.nbytes = {"a": {"int2-g128": 200, "int4-g128": 400}, "b": {"int2-g128": 200, "int4-g128": 400}}
    t.dense_bytes = {"a": 1600, "b": 1600}
    return t


def test_allocation_spends_bits_where_they_pay():
    from ciuic_lab.search.allocate import _solve

    t = _table()
    choice = _solve(t.kl, t.nbytes, 600)
    assert choice == {"a": "int4-g128", "b": "int2-g128"}
    with pytest.raises(CiuicError, match="cannot be met"):
        _solve(t.kl, t.nbytes, 100)


def test_autoplan_meets_its_budget_and_is_verified(capsys):
    from ciuic_lab.cli import main

    assert main(["autoplan", "--model", "tiny-deepseek-random", "--target-bpw", "3.0", "--unit", "block",
                 "--formats", "int2-g64-output-gptq,int3-g256-output-gptq,int3-g128-output-gptq,int4-g128",
                 "--evalset", "tiny", "--verify-evalset", "tiny", "--compare", "int3-g128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    auto = out["measured"]["auto"]
    assert auto["bits_per_weight"] <= 3.0 + 1e-9
    assert out["measured"]["int3-g128"]["bits_per_weight"] > 3.0
    assert out["solver"]["used"] <= out["solver"]["budget"] + 1e-6
    assert out["recipe"]["rules"]
    ref = out["refined"]  # one round by default: never dearer than the budget, never worse measured
    assert ref["used"] <= out["solver"]["budget"] + 1e-6
    assert ref["measured_kl_after"] <= ref["measured_kl_before"] and ref["evaluations"] > 1


def test_refine_lowers_measured_kl_within_the_budget(tiny, tiny_sites, capsys):
    """Where units interact, the refinement finds an exchange the additive solver cannot see, keeps
    the budget, and the model is left as loaded."""
    from ciuic_lab.measure import fingerprint
    from ciuic_lab.search import refine

    m, tok, _ = tiny
    fp = fingerprint(m)
    fs = parse_formats("int2-g64,int3-g64,int4-g64")
    table = sensitivity(m, tok, tiny_sites, fs, unit="block", es="tiny")
    plan, info = allocate(tiny_sites, table, target_bpw=3.0, allow_keep=False)
    rplan, out = refine(m, tok, tiny_sites, table, info, es="tiny", rounds=1)
    assert out["used"] <= info["budget"] + 1e-6
    assert out["measured_kl_after"] <= out["measured_kl_before"]
    assert all(r["accepted"] is None or r["measured_kl"] < r["was"] for r in out["rounds"] if "accepted" in r)
    assert fingerprint(m) == fp
    assert set(rplan.quantized()) == set(plan.quantized())

    from ciuic_lab.cli import main

    assert main(["autoplan", "--model", "tiny-deepseek-random", "--target-bpw", "3.0", "--refine", "-1", "--json"]) == 2
    assert "--refine -1: accepted: 0 (none) or a number of rounds" in capsys.readouterr().err


def test_attribution_shares(tiny, tiny_sites):
    m, tok, _ = tiny
    plan = resolve({"rules": [{"match": "*", "bits": 2, "group": 64}]}, tiny_sites)
    att = attribution(m, tok, plan, es="tiny", unit="block")
    assert att["kl"] > 0 and len(att["rows"]) == 3
    assert sum(r["share"] for r in att["rows"]) == pytest.approx(1.0)


def test_gptq_plan_is_prepared_and_applied(tiny, tiny_sites, ids):
    from ciuic_lab import apply, revert

    m, tok, _ = tiny
    plan = resolve({"rules": [{"match": "attn.o", "bits": 4, "method": "gptq"}]}, tiny_sites)
    with pytest.raises(CiuicError, match="needs calibration"):
        apply(m, plan)
    cache: dict = {}
    assert prepare_calibrated(m, tok, plan, cache) == 3
    apply(m, plan, cache=cache)
    with torch.no_grad():
        assert torch.isfinite(m(ids).logits).all()
    revert(m)


def test_output_clipped_plan_is_prepared_once_per_hessian(tiny, tiny_sites, ids):
    from ciuic_lab import apply, revert

    m, tok, _ = tiny
    plan = resolve({"rules": [{"match": "attn.*", "bits": 3, "group": 32, "clip": "output"}]}, tiny_sites)
    with pytest.raises(CiuicError, match="clip 'output' needs calibration"):
        apply(m, plan)
    cache: dict = {}
    hs: dict = {}
    n = prepare_calibrated(m, tok, plan, cache, tokens=512, hessians=hs)
    assert n == sum(1 for c in plan.configs.values() if not c.keep) and len(hs) == n
    gptq = resolve({"rules": [{"match": "attn.*", "bits": 3, "group": 32, "clip": "output", "method": "gptq"}]}, tiny_sites)
    held = {k: v.clone() for k, v in hs.items() if v is not None}
    assert prepare_calibrated(m, tok, gptq, cache, hessians=hs) == n  # new specs, the same Hessians
    assert all(torch.equal(hs[k], v) for k, v in held.items())
    apply(m, plan, cache=cache)
    with torch.no_grad():
        assert torch.isfinite(m(ids).logits).all()
    revert(m)


def test_gptq_formats_are_calibrated_for_the_scan_and_the_verification(tiny, tiny_sites):
    from ciuic_lab.measure import fingerprint
    from ciuic_lab.search import verify

    m, tok, _ = tiny
    fp = fingerprint(m)
    formats = parse_formats("int4-g64-gptq,int4-g64")
    t = sensitivity(m, tok, tiny_sites, formats, unit="block", es="tiny")
    assert all(set(t.kl[u]) == {"int4-g64-gptq", "int4-g64"} for u in t.kl)
    plan = resolve({"rules": [{"match": "attn.*", "bits": 4, "group": 64, "method": "gptq"}]}, tiny_sites)
    out = verify(m, tok, {"gptq": plan}, es="tiny")
    assert out["gptq"]["kl"] >= 0 and out["gptq"]["bits_per_weight"] > 4
    assert fingerprint(m) == fp  # both leave the model as loaded


def test_calibration_text_never_overlaps_what_an_evaluation_set_scores(tiny):
    """Unscored held-out tokens first (text the model never trained on), then the training sample."""
    from ciuic_lab.measure.evalset import SCORED_HELDOUT_TOKENS, SIZES, evalset
    from ciuic_lab.measure.snapshot import heldout_ids
    from ciuic_lab.search.calibrate import calibration_ids, unscored_heldout_ids

    tok = tiny.tokenizer
    for name in SIZES:
        es = evalset(name)
        assert es.heldout_offset + es.heldout_tokens <= SCORED_HELDOUT_TOKENS
    tail = unscored_heldout_ids(tok)
    whole = tok(evalset("standard").heldout, return_tensors="pt", add_special_tokens=False).input_ids[0]
    assert torch.equal(tail, whole[SCORED_HELDOUT_TOKENS:]) and tail.numel() > 0
    scored = torch.cat([heldout_ids(tok, evalset(n)) for n in ("standard", "search")])
    assert torch.equal(scored, whole[:SCORED_HELDOUT_TOKENS])
    ids = calibration_ids(tok, tokens=tail.numel() // 128 * 128 + 256)
    n_tail = tail.numel() // 128 * 128
    assert ids.shape == (n_tail // 128 + 2, 128)
    assert torch.equal(ids.reshape(-1)[:n_tail], tail[:n_tail])
    small = calibration_ids(tok, tokens=256)  # fewer tokens than the tail: the tail's start only
    assert torch.equal(small.reshape(-1), tail[:256])


def test_default_candidates_follow_the_budget(tiny_sites):
    from ciuic_lab.search.cli import DEFAULT_FORMATS, LOW_BPW_FORMATS, default_formats

    assert default_formats(tiny_sites, 3.0, None) == LOW_BPW_FORMATS
    assert default_formats(tiny_sites, 4.0, None) == DEFAULT_FORMATS
    params = sum(s.params for s in tiny_sites if not s.keep_default)
    assert default_formats(tiny_sites, None, params * 3 // 8) == LOW_BPW_FORMATS  # bytes for 3 bpw
    wide = default_formats(tiny_sites, None, None)  # a latency budget: int2 to int8
    assert "int2-g64-output-gptq" in wide and "int8-channel-sym" in wide
    for fs in (DEFAULT_FORMATS, LOW_BPW_FORMATS, wide):
        assert all(not f.keep for f in parse_formats(fs))
