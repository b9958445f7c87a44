import pytest
import torch

from ciuic_lab import apply, baseline, evaluate_plan, resolve, revert, safe_optimize
from ciuic_lab.errors import SafetyError
from ciuic_lab.measure import compare, evalset, fingerprint, kl_top1, snapshot


def test_evalset_sizes():
    std = evalset("standard")
    assert len(std.prompts) == 8 and "def is_prime(n):" in std.prompts[0] + "".join(std.prompts)
    assert len(evalset("tiny").prompts) == 1
    with pytest.raises(Exception, match="accepted: standard, quick, tiny"):
        evalset("huge")


def test_search_set_scores_held_out_tokens_the_standard_set_does_not(tiny):
    from ciuic_lab.errors import CiuicError
    from ciuic_lab.measure.snapshot import heldout_ids

    _, tok, _ = tiny
    std, search = heldout_ids(tok, evalset("standard")), heldout_ids(tok, evalset("search"))
    assert search.numel() == std.numel() == 2048
    whole = tok(evalset("standard").heldout, return_tensors="pt", add_special_tokens=False).input_ids[0]
    assert torch.equal(whole[:2048], std) and torch.equal(whole[2048:4096], search)  # adjacent, disjoint
    with pytest.raises(CiuicError, match="skips 100000 held-out tokens but the text has"):
        heldout_ids(tok, evalset("search").resized(heldout_offset=100_000))


def test_identical_models_compare_to_zero(tiny):
    m, tok, _ = tiny
    a = snapshot(m, tok, "tiny", timing=False)
    b = snapshot(m, tok, "tiny", timing=False)
    kl, top1 = kl_top1(a, b)
    assert kl == 0.0 and top1 == 1.0
    rep = compare(a, b)
    assert rep["first_divergence"] == [None] and rep["perplexity"]["change"] == 0.0


def test_report_has_the_promised_keys(tiny):
    m, tok, _ = tiny
    plan, rep = evaluate_plan(m, tok, "int4-g128", "tiny", timing=True, keep=False)
    for key in ("bits_per_weight", "weight_bytes", "kl", "top1_agreement", "perplexity", "latency_ms", "text",
                "site_errors", "quantized_sites"):
        assert key in rep, key
    assert rep["weight_bytes"]["after"] < rep["weight_bytes"]["before"]
    assert rep["quantized_sites"]["ratio_vs_bf16"] <= 0.30
    assert rep["kl"] > 0 and 0 <= rep["top1_agreement"] <= 1
    assert rep["latency_ms"]["decode"]["before"] > 0 and rep["latency_ms"]["prefill"]["after"] > 0
    errs = rep["site_errors"]
    assert len(errs) == len(plan.quantized())
    assert all(0 < e["rel_error"] < 1 for e in errs.values())
    assert errs["model.layers.0.self_attn.q_a_proj"]["basis"] == "output"


def test_site_error_grows_as_bits_shrink(tiny):
    m, tok, _ = tiny
    base = baseline(m, tok, "tiny", timing=False)
    errs = {}
    for r in ("int8", "int4", "int2-g64"):
        _, rep = evaluate_plan(m, tok, r, "tiny", timing=False, base=base, keep=False)
        errs[r] = rep["site_errors"]["model.layers.1.mlp.experts.down_proj[0]"]["rel_error"]
        assert rep["kl"] >= 0
    assert errs["int8"] < errs["int4"] < errs["int2-g64"]


def test_safe_optimize_accepts_and_refuses(tiny):
    m, tok, _ = tiny
    fp = fingerprint(m)
    model, rep = safe_optimize(m, tok, "int8", max_kl=0.05, es="tiny", timing=False)
    assert rep["safe"]["accepted"]
    revert(m)
    with pytest.raises(SafetyError, match="refused: KL") as e:
        safe_optimize(m, tok, "int2-g64", max_kl=1e-6, es="tiny", timing=False)
    assert e.value.report["safe"]["restored_bit_exact"] is True
    assert fingerprint(m) == fp


def test_site_error_of_a_folded_site_is_its_quantization_error_alone():
    """With norm_fold, a site quantizes W * gamma and sees the normed input without gamma; its reported
    error must be that of the quantization (small at int8), not the gap between W * gamma and W."""
    import ciuic_lab as cl
    from ciuic_lab.measure import snapshot
    from ciuic_lab.measure.compare import site_errors

    try:
        loaded = cl.load("tiny-deepseek")
    except cl.errors.CiuicError:
        pytest.skip("the trained embedded model is not installed")
    m, tok = loaded.model, loaded.tokenizer
    sites = cl.sites(m)
    q_a = next(s for s in sites if s.name.endswith("layers.1.self_attn.q_a_proj"))
    base = snapshot(m, tok, "tiny", timing=False, capture=[q_a])
    errs = {}
    for fold in (False, True):
        plan = cl.resolve({"rules": [{"match": q_a.name, "bits": 8, "group": "channel"}], "fusions": {"norm_fold": fold}}, sites)
        cl.apply(m, plan)
        try:
            errs[fold] = site_errors(m, [q_a], base.site_inputs)[q_a.name]["rel_error"]
        finally:
            cl.revert(m)
    assert errs[False] < 0.01 and errs[True] < 0.01, errs


def test_held_out_text_tokenizes_without_the_tokenizers_length_warning():
    """The held-out text is longer than the embedded tokenizer's window on purpose (it is scored in
    windows); tokenizing it must not print transformers' 'indexing errors' warning in the demo."""
    import logging

    from transformers.utils import logging as hf_logging

    from ciuic_lab import load
    from ciuic_lab.measure.snapshot import heldout_ids

    tok = load("tiny-deepseek").tokenizer
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    root = hf_logging.get_logger()
    root.addHandler(handler)
    try:
        ids = heldout_ids(tok, evalset("standard"))
    finally:
        root.removeHandler(handler)
    assert ids.numel() > tok.model_max_length
    assert not [r.getMessage() for r in records if "sequence length" in r.getMessage()]
