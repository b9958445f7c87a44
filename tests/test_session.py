"""The Session: incremental changes, caches, history, export, errors that leave the state unchanged."""

import warnings

import pytest
import torch

from ciuic_lab import CiuicError, load, resolve
from ciuic_lab.measure import fingerprint, greedy
from ciuic_lab.optimize import evaluate_plan
from ciuic_lab.recipe import load as load_recipe
from ciuic_lab.session import Session, WeightCache, summarize

KV_B = "model.layers.1.self_attn.kv_b_proj"
Q_A = "model.layers.0.self_attn.q_a_proj"
EXPERT = "model.layers.1.mlp.experts.down_proj[3]"


def _session(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Session("tiny-deepseek-random", evalset=kw.pop("evalset", "tiny"), **kw)


@pytest.fixture(scope="module")
def s():
    return _session()


@pytest.fixture
def fresh():
    return _session()


def _logits(sess):
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        return sess.model(input_ids=ids, use_cache=False).logits.clone()


def test_set_one_site_changes_only_that_site(s):
    s.reset()
    before = s.plan
    rep = s.set(KV_B, bits=3)
    diff = before.diff(s.plan)
    assert [d[0] for d in diff] == [KV_B]
    spec = s.plan.configs[KV_B].spec
    assert (spec.bits, spec.scheme, spec.group) == (3, "asym", 128)
    assert rep["kl"] > 0 and 0 <= rep["top1_agreement"] <= 1
    assert list(rep["site_errors"]) == [KV_B] and rep["site_errors"][KV_B]["rel_error"] > 0
    assert rep["quantized_sites"]["count"] == 1
    assert rep["weight_bytes"]["after"] == s.plan.summary()["weight_bytes"]["after"]
    # fields not given keep their value
    s.set(KV_B, group=64)
    spec = s.plan.configs[KV_B].spec
    assert (spec.bits, spec.group) == (3, 64)


def test_globs_kinds_and_blocks(s):
    s.reset()
    names = s.select("moe.expert.*", blocks=[2])
    assert names and all(s.site(n).block == 2 and s.site(n).kind.startswith("moe.expert") for n in names)
    assert "lm_head" not in s.select("*") and "lm_head" in s.select("head")
    s.set("attn.*", blocks=1, bits=8, scheme="sym", group="channel")
    q = s.plan.quantized()
    assert q and all(s.site(n).kind.startswith("attn.") and s.site(n).block == 1 for n in q)
    s.set("attn.*", blocks=1, bits=16)
    assert s.plan.quantized() == []


def test_only_changed_sites_are_requantized(fresh, monkeypatch):
    import sys

    apply_mod = sys.modules["ciuic_lab.transforms.apply"]  # the module, not the function of that name
    calls = []
    real = apply_mod.quantize
    monkeypatch.setattr(apply_mod, "quantize", lambda w, spec: calls.append(spec) or real(w, spec))
    fresh.preset("int4-g128")
    n_all = len(fresh.plan.quantized())
    assert len(calls) == n_all
    calls.clear()
    fresh.set(KV_B, bits=3)
    assert len(calls) == 1
    fresh.set(KV_B, bits=4)  # back to a spec already quantized: from the cache
    fresh.set(KV_B, bits=3)
    assert len(calls) == 1
    assert fresh.weights.hits > 0


def test_quick_path_matches_the_reference_pipeline(fresh):
    """The toggle path (cached baseline, verified drafts) gives what evaluate_plan and greedy give."""
    fresh.preset("int3-g128")
    fresh.set("moe.expert.*", blocks=[1], bits=2, group=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok, _ = load("tiny-deepseek-random")
    _, ref = evaluate_plan(model, tok, fresh.plan.as_recipe(), fresh.es, timing=False)
    rep = fresh.report
    assert rep["kl"] == pytest.approx(ref["kl"], rel=1e-4, abs=1e-7)
    assert rep["top1_agreement"] == pytest.approx(ref["top1_agreement"])
    assert rep["perplexity"]["after"] == pytest.approx(ref["perplexity"]["after"], rel=1e-5)
    assert rep["text"]["after"] == ref["text"]["after"]
    for name, e in ref["site_errors"].items():
        assert rep["site_errors"][name]["rel_error"] == pytest.approx(e["rel_error"], rel=1e-4)


def test_text_equals_plain_greedy_when_drafts_diverge():
    sess = _session(evalset="quick")
    for bits in (8, 2, 3):  # near the baseline, far from it, and back: drafts accepted, refused, partly
        sess.preset({8: "int8", 2: "int2-g64", 3: "int3-g128"}[bits])
        for i, prompt in enumerate(sess.es.prompts):
            assert sess.current.tokens[i] == greedy(sess.model, sess.tokenizer, prompt, sess.es.max_new_tokens)
    assert sess.report["same_text"] < len(sess.es.prompts)  # int3 changes the random model's text


def test_undo_redo_and_history(fresh):
    r1 = fresh.set(Q_A, bits=4)
    p1 = fresh.plan
    r2 = fresh.set(KV_B, bits=2)
    assert fresh.can_undo and not fresh.can_redo
    back = fresh.undo()
    assert fresh.plan == p1 and back["kl"] == r1["kl"]
    assert torch.equal(_logits(fresh), _logits_of_plan(p1))
    fwd = fresh.redo()
    assert fwd["kl"] == r2["kl"] and fresh.plan.configs[KV_B].spec.bits == 2
    fresh.undo()
    fresh.set(Q_A, bits=8)
    assert not fresh.can_redo
    with pytest.raises(CiuicError, match="nothing to redo"):
        fresh.redo()
    cmp = fresh.compare_with(1)
    assert cmp["earlier"]["kl"] == r1["kl"] and cmp["sites_changed"] == [Q_A]
    assert cmp["delta"]["kl"] == pytest.approx(cmp["current"]["kl"] - r1["kl"])
    fresh.restore(1)
    assert fresh.plan == p1 and fresh.report["kl"] == r1["kl"]
    with pytest.raises(CiuicError, match="no state #999"):
        fresh.restore(999)


_PLAIN = {}


def _logits_of_plan(plan):
    """Logits of a freshly loaded model with ``plan`` applied (the reference for the session's model)."""
    from ciuic_lab import apply

    if "m" not in _PLAIN:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _PLAIN["m"] = load("tiny-deepseek-random").model
    m = _PLAIN["m"]
    apply(m, resolve(plan.as_recipe(), plan.sites.values()))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        out = m(input_ids=ids, use_cache=False).logits.clone()
    return out


def test_reset_is_bit_exact(fresh):
    before = fingerprint(fresh.model)
    logits = _logits(fresh)
    fresh.preset("int2-g64")
    fresh.set("head", bits=4)
    fresh.set("norm.*", bits=8, group="channel")
    assert fingerprint(fresh.model) != before
    fresh.reset()
    assert fingerprint(fresh.model) == before
    assert torch.equal(_logits(fresh), logits)
    assert fresh.report["kl"] == 0.0


@pytest.mark.parametrize("target, fields, match", [
    (KV_B, {"bits": 7}, "bits 7 is not supported"),
    (KV_B, {"bits": "four"}, "bits 'four' is not supported"),
    (KV_B, {"bits": 4, "group": 100}, "group 100 does not divide"),
    (KV_B, {"bits": 4, "scheme": "zigzag"}, "scheme 'zigzag'"),
    ("no.such.site", {"bits": 4}, "selects no site"),
    (KV_B, {"colour": "red"}, "unknown field"),
    (KV_B, {}, "nothing to set"),
    (KV_B, {"layout": "diagonal"}, "layout 'diagonal' is not known"),
    (KV_B, {"bits": 4, "kernel": "turbo"}, "kernel 'turbo' is not known"),
    ([], {"bits": 4}, "selection is empty"),
])
def test_bad_input_is_one_clear_error_and_changes_nothing(s, target, fields, match):
    s.set(Q_A, bits=4)
    plan, index, logits = s.plan, s.current.index, _logits(s)
    with pytest.raises(CiuicError, match=match) as info:
        s.set(target, **fields)
    assert "\n" not in str(info.value)
    assert s.plan is plan and s.current.index == index and torch.equal(_logits(s), logits)


def test_error_while_running_puts_the_model_back(s):
    """A kernel that is not available fails at the first forward: the model is put back as it was."""
    s.set(Q_A, bits=4)
    plan, logits = s.plan, _logits(s)
    if s.machine()["backends"].get("cuda", {}).get("available", True):
        pytest.skip("needs a registered but unavailable backend")
    with pytest.raises(CiuicError, match="cuda"):
        s.set(KV_B, bits=4, kernel="cuda")
    assert s.plan is plan and torch.equal(_logits(s), logits)


def test_experts_of_one_bank_share_a_layout(s):
    layouts = [x for x in s.options()["layouts"] if x != "rowmajor"]
    if not layouts:
        pytest.skip("only one layout registered")
    s.set("moe.expert.*", blocks=[1], bits=4)
    plan = s.plan
    with pytest.raises(CiuicError, match="share one layout"):
        s.set(EXPERT, layout=layouts[0])
    assert s.plan is plan
    s.set("model.layers.1.mlp.experts.*", layout=layouts[0])
    assert {s.plan.configs[n].layout for n in s.select("model.layers.1.mlp.experts.*")} == {layouts[0]}


def test_recipe_export_round_trip(s, tmp_path):
    s.reset()
    s.preset("mixed")
    s.set(KV_B, bits=2, group=64)
    s.set_fusions(gate_up=True)
    path = tmp_path / "plan.json"
    rec = s.recipe(path, name="mine")
    again = resolve(load_recipe(str(path)), s.sites)
    assert again == s.plan and again.recipe.name == "mine" and rec.fusions == {"gate_up": True}
    with pytest.raises(CiuicError, match="does not exist"):
        s.recipe(tmp_path / "missing" / "x.json")
    s.set_fusions(gate_up=False)


def test_fusion_switches(s):
    s.set_fusions(qkv_a=True, kv_cache="latent")
    assert s.fusions()["qkv_a"] and s.plan.recipe.kv_cache == "latent"
    label = s.current.label
    with pytest.raises(CiuicError, match="unknown fusion"):
        s.set_fusions(warp=True)
    with pytest.raises(CiuicError, match="kv_cache 'huge'"):
        s.set_fusions(kv_cache="huge")
    assert s.current.label == label
    s.set_fusions(qkv_a=False, kv_cache="expanded")
    assert not any(s.fusions().values())


def test_weight_cache_is_an_lru_within_its_budget():
    from ciuic_lab import QuantSpec, quantize

    spec = QuantSpec(4, "asym", 32)
    qts = [quantize(torch.randn(64, 64), spec) for _ in range(4)]
    size = qts[0].nbytes
    c = WeightCache(3 * size)
    c["a"], c["b"], c["c"] = qts[:3]
    assert c.get("a") is qts[0]  # a is now the most recent
    c["d"] = qts[3]
    assert "b" not in c and set(c) == {"a", "c", "d"} and c.currsize == 3 * size
    c["big"] = quantize(torch.randn(512, 512), spec)  # larger than the budget: not kept
    assert "big" not in c and c.currsize <= c.maxsize
    assert c.get("zzz") is None and c.misses >= 1 and c.hits >= 1
    with pytest.raises(CiuicError, match="cache_bytes"):
        WeightCache(-1)


def test_grid_is_blocks_by_kinds(s):
    s.reset()
    s.set(KV_B, bits=3)
    s.set("moe.expert.*", blocks=[2], bits=8, group="channel")
    g = s.grid()
    assert g["cols"] == ["0", "1", "2", "-"]
    r, c = g["rows"].index("attn.kv_b"), g["cols"].index("1")
    assert g["sites"][r][c] == [KV_B] and g["bits"][r][c] == 3 and g["text"][r][c] == "3"
    assert g["bits"][g["rows"].index("head")][3] == 16 and g["text"][g["rows"].index("head")][3] == "keep"
    assert g["bits"][r][0] == 16 and g["bits"][g["rows"].index("mlp.gate")][1] is None
    ge = s.grid(experts=True)
    assert "moe.expert.down[3]" in ge["rows"] and len(ge["rows"]) == len(g["rows"]) - 2 + 16
    e = ge["rows"].index("moe.expert.down[3]")
    assert ge["sites"][e][2] == ["model.layers.2.mlp.experts.down_proj[3]"] and ge["bits"][e][2] == 8


def test_inspect_shows_the_grid_and_the_error_curve(s):
    d = s.inspect(KV_B, bits=3, scheme="asym", group=64, group_index=5)
    assert d["label"] == "int3 g64 asym" and d["group_size"] == 64 and d["groups"] == 256 * 2
    assert len(d["grid"]) == 8
    grid = torch.tensor(d["grid"])
    assert all(torch.isclose(grid, torch.tensor(v)).any() for v in d["levels"])
    assert sum(d["level_counts"]) == 64
    errs = [d["error_curve"][b]["rel_error"] for b in sorted(d["error_curve"])]
    assert errs == sorted(errs, reverse=True)
    assert d["error_curve"][3]["rel_error"] == pytest.approx(d["rel_error"])
    assert sum(d["hist"]["counts"]) == 256 * 128
    sym = s.inspect(KV_B, bits=4, scheme="sym", group="channel")
    assert sym["zero"] == 8 and len(sym["grid"]) == 16
    fp8 = s.inspect(KV_B, bits="fp8_e4m3")
    assert fp8["label"].startswith("fp8") and list(fp8["error_curve"]) == [8]
    with pytest.raises(CiuicError, match="group_index"):
        s.inspect(KV_B, bits=4, group_index=10**6)
    with pytest.raises(CiuicError, match="does not divide"):
        s.inspect(KV_B, bits=4, group=96)


def test_measure_on_demand_fills_latency(s):
    s.reset()
    s.set(Q_A, bits=4)
    assert s.summary()["decode_ms"] is None
    out = s.measure(repeats=1)
    m = s.summary()
    assert m["decode_ms"] > 0 and m["prefill_ms"] > 0 and m["tokens_per_s"] > 0
    assert out["before"]["decode_ms"] > 0 and "other" in out["after"]["op_ms"]
    assert s.report["op_ms"]["before"] and s.report["latency_ms"]["decode"]["before"] > 0
    s.set(KV_B, bits=4)  # a new state knows the baseline's timing, not its own yet
    assert s.report["latency_ms"]["decode"]["before"] > 0 and s.summary()["decode_ms"] is None


def test_full_report_agrees_with_the_quick_path(s):
    s.reset()
    s.preset("int3-g128")
    rep = s.full_report("tiny", timing=False)
    assert rep["kl"] == pytest.approx(s.report["kl"], rel=1e-4)
    assert rep["quantized_sites"]["count"] == len(s.plan.quantized())
    assert rep["recipe"]["rules"]


def test_scan_by_kind(s):
    s.reset()
    rows = s.scan(bits=2, by="kind")
    kls = [r["kl"] for r in rows]
    assert kls == sorted(kls, reverse=True) and all(k > 0 for k in kls)
    assert {r["kind"] for r in rows} >= {"attn.kv_b", "moe.expert.down"}
    assert s.plan.quantized() == []  # the scan leaves the session as it was
    with pytest.raises(CiuicError, match="scan by"):
        s.scan(by="planet")


def test_observers_and_progress(fresh):
    events, notes = [], []
    fresh.observe(events.append)
    fresh.progress = lambda f, m: notes.append((f, m))
    fresh.preset("int8")
    fresh.undo()
    assert events == ["plan", "plan"]
    assert notes and notes[-1][0] == 1.0 and all(0 <= f <= 1 for f, _ in notes)


def test_summary_and_model_arguments(fresh):
    m = summarize(fresh.report)
    assert m["kl"] == 0 and m["bits_per_weight"] == pytest.approx(32.0)
    with pytest.raises(CiuicError, match="needs its tokenizer"):
        Session(fresh.model)
    with pytest.raises(CiuicError, match="model must be"):
        Session(42)


def test_session_bench_quick():
    from ciuic_lab.session_bench import bench_session, bench_soak

    out = bench_session("tiny-deepseek-random", quick=True)
    assert out["toggle_median_ms"] > 0 and out["requantize_all_median_ms"] > 0
    assert {r["what"] for r in out["rows"]} >= {"toggle one site (Session.set)", "toggle one site (panel widgets)"}
    soak = bench_soak("tiny-deepseek-random", toggles=40, cache_bytes=2**20)
    assert soak["cache_ok"] and soak["cache"]["max_bytes_seen"] <= 2**20
    assert sum(soak["operations"].values()) == 40


def test_layer_reuse_gives_the_full_forward_bit_for_bit(fresh):
    """Replaying unchanged decoder layers is exact, whichever block, embedding, head or switch changes."""
    from ciuic_lab.session import LayerReuse

    reuse = LayerReuse(fresh.model, fresh.sites)
    assert reuse.layers is not None and len(reuse.layers) == 3
    x = fresh._heldout[:64].view(2, 32)
    steps = [lambda: fresh.preset("int4-g128"), lambda: fresh.set("attn.kv_b", blocks=[2], bits=2),
             lambda: fresh.set("moe.expert.down", blocks=[1], bits=3), lambda: fresh.set("head", bits=8),
             lambda: fresh.set_fusions(gate_up=True), lambda: fresh.set("embed", bits=4),
             lambda: fresh.set(Q_A, bits=8), lambda: fresh.undo()]
    for step in steps:
        step()
        got = reuse.forward(fresh.model, "t", x, fresh.plan)
        with torch.no_grad():
            want = fresh.model(input_ids=x, use_cache=False).logits
        assert torch.equal(got, want)
    assert all(type(m).__name__ != "_Replay" for m in reuse.layers)


def test_calibrated_formats_in_the_workbench(fresh):
    """GPTQ and output clipping are calibrated on first use, the Hessians kept for the next change,
    and the result is what a plain calibrated apply gives."""
    from ciuic_lab import apply, revert
    from ciuic_lab.search import prepare_calibrated

    s = fresh
    s.set("attn.kv_b", bits=3, group=32, method="gptq")
    assert all(s.plan.configs[n].spec.method == "gptq" for n in s.select("attn.kv_b"))
    held = len(s._hessians)
    assert held == len(s.select("attn.kv_b"))
    logits = _logits(s)
    s.set("attn.kv_b", clip="output")  # a new spec on the same sites: no new calibration pass
    assert len(s._hessians) == held and s.plan.configs[KV_B].spec.clip == "output"
    s.set("attn.kv_b", clip="minmax", method="rtn")
    s.undo()
    s.undo()
    assert torch.equal(_logits(s), logits)  # the cached GPTQ weights, bit for bit
    plan = s.plan
    s.reset()
    cache: dict = {}
    prepare_calibrated(s.model, s.tokenizer, plan, cache)
    apply(s.model, plan, cache=cache)
    assert torch.equal(_logits(s), logits)
    revert(s.model)
