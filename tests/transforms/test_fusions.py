"""Each fusion is proven equal (fp32, logits within 1e-4 relative, same greedy tokens) before it is timed."""

import pytest
import torch
from transformers import DeepseekV3Config

from ciuic_lab import apply, load_recipe, resolve, revert
from ciuic_lab.measure import fingerprint
from ciuic_lab.recipe import FUSIONS
from ciuic_lab.transforms import describe
from ciuic_lab.transforms.fusions import FusedMLA, kv_cache_bytes_per_token, kv_cache_report

ALL = {f: True for f in FUSIONS}


@pytest.fixture
def shaped(tiny):
    """The random model with non-trivial norm scales and router biases, so folding is really tested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tiny.model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g))
        for name, b in tiny.model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return tiny


@torch.no_grad()
def _prefill_and_step(model, ids):
    out = model(ids, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    step = model(nxt, past_key_values=out.past_key_values, use_cache=True).logits
    return out.logits.clone(), step.clone()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _gen(model, ids, n=16):
    return model.generate(ids, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("fusion", list(FUSIONS) + ["all", "expanded-cache"])
def test_each_fusion_is_exact(shaped, ids, fusion):
    m = shaped.model
    sites = __import__("ciuic_lab").sites(m)
    pre, step = _prefill_and_step(m, ids)
    gen = _gen(m, ids)
    fus = ALL if fusion == "all" else ({} if fusion == "expanded-cache" else {fusion: True})
    kv = "expanded" if fusion == "expanded-cache" else "latent"
    apply(m, resolve({"rules": [], "fusions": fus, "kv_cache": kv}, sites))
    rep = describe(m)["fusions"]
    for f in fus:
        assert rep[f]["applied"] > 0, (f, rep[f])
    pre2, step2 = _prefill_and_step(m, ids)
    assert _rel(pre2, pre) < 1e-4 and _rel(step2, step) < 1e-4
    assert torch.equal(_gen(m, ids), gen)
    revert(m)
    assert torch.equal(_prefill_and_step(m, ids)[0], pre)


@pytest.mark.parametrize("recipe", ["int8", "int4-g128", "mixed"])
def test_fused_and_unfused_quantized_give_the_same_tokens(shaped, ids, recipe):
    m = shaped.model
    sites = __import__("ciuic_lab").sites(m)
    apply(m, resolve(recipe, sites))
    q_pre, q_step = _prefill_and_step(m, ids)
    q_gen = _gen(m, ids)
    r = load_recipe(recipe).to_dict()
    r["fusions"] = {f: True for f in FUSIONS if f != "norm_fold"}
    apply(m, resolve(r, sites))
    f_pre, f_step = _prefill_and_step(m, ids)
    assert _rel(f_pre, q_pre) < 1e-4 and _rel(f_step, q_step) < 1e-4
    assert torch.equal(_gen(m, ids), q_gen)
    revert(m)


def test_norm_fold_quantizes_the_folded_weight(shaped, ids):
    m = shaped.model
    sites = __import__("ciuic_lab").sites(m)
    fp = fingerprint(m)
    apply(m, resolve({"rules": [{"match": "*", "bits": 8, "scheme": "sym", "group": "channel"}],
                      "fusions": {"norm_fold": True}}, sites))
    q = m.model.layers[1].self_attn.q_a_proj.qt
    from ciuic_lab.quant import QuantSpec, dequantize, quantize
    gamma = shaped.model.model.layers[1].input_layernorm  # now a weightless norm
    assert gamma.weight is None
    revert(m)
    w = m.model.layers[1].self_attn.q_a_proj.weight * m.model.layers[1].input_layernorm.weight
    assert torch.equal(dequantize(q), dequantize(quantize(w, QuantSpec(bits=8, scheme="sym", group="channel"))))
    assert fingerprint(m) == fp


def test_mixed_specs_are_not_stacked_and_say_why(tiny, tiny_sites):
    m = tiny.model
    apply(m, resolve({"rules": [{"match": "attn.q_a", "bits": 8}, {"match": "attn.kv_a", "bits": 4}],
                      "fusions": {"qkv_a": True}}, tiny_sites))
    rep = describe(m)["fusions"]["qkv_a"]
    assert rep["applied"] == 0 and "specs differ" in rep["skipped"][0]
    assert isinstance(m.model.layers[0].self_attn, FusedMLA)
    revert(m)


def test_kv_cache_bytes_per_token():
    v3 = DeepseekV3Config()
    assert kv_cache_bytes_per_token(v3, "latent", 2) == (512 + 64) * 61 * 2
    assert kv_cache_bytes_per_token(v3, "expanded", 2) == 128 * (192 + 128) * 61 * 2
    assert kv_cache_report(v3)["expanded_over_latent"] == pytest.approx(40960 / 576)


def test_apply_json_lists_fusions(capsys):
    import json

    from ciuic_lab.cli import main

    rec = json.dumps({"name": "fused", "rules": [{"match": "*", "bits": 4}], "fusions": ALL})
    assert main(["apply", "--model", "tiny-deepseek-random", "--recipe", rec, "--json", "--evalset", "tiny",
                 "--no-timing"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fusions"]["qkv_a"]["enabled"] and data["fusions"]["mla_absorb"]["applied"] == 3
    assert data["layouts"] == {"rowmajor": 56} and data["kv_cache"] == "latent"
    assert data["kv_cache_bytes"]["expanded_over_latent"] == 2.0
