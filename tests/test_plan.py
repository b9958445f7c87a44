import pytest

from ciuic_lab.errors import RecipeError
from ciuic_lab.plan import from_dict, keep_plan, resolve
from ciuic_lab.quant import QuantSpec


def test_later_rules_win_field_by_field(tiny_sites):
    p = resolve({"rules": [{"match": "*", "bits": 4, "group": 64, "scheme": "sym"},
                           {"match": "attn.kv_b", "bits": 8}]}, tiny_sites)
    kvb = p["model.layers.1.self_attn.kv_b_proj"].spec
    assert (kvb.bits, kvb.group, kvb.scheme) == (8, 64, "sym")
    assert p["model.layers.1.self_attn.o_proj"].spec == QuantSpec(bits=4, group=64, scheme="sym")


def test_kept_sites_need_a_rule_that_names_them(tiny_sites):
    p = resolve("int4", tiny_sites)
    for name in ("model.embed_tokens", "lm_head", "model.layers.1.mlp.gate", "model.norm"):
        assert p[name].keep
    p = resolve({"rules": [{"match": "*", "bits": 4}, {"match": "head", "bits": 8},
                           {"match": "model.embed_tokens", "bits": 8}]}, tiny_sites)
    assert p["lm_head"].spec.bits == 8 and p["model.embed_tokens"].spec.bits == 8
    assert p["model.norm"].keep


def test_exact_names_with_brackets_and_blocks(tiny_sites):
    p = resolve({"rules": [{"match": "model.layers.2.mlp.experts.down_proj[5]", "bits": 2},
                           {"match": "moe.expert.gate_up", "blocks": ["2-2"], "bits": 3}]}, tiny_sites)
    assert p["model.layers.2.mlp.experts.down_proj[5]"].spec.bits == 2
    assert p["model.layers.2.mlp.experts.down_proj[4]"].keep
    assert p["model.layers.2.mlp.experts.gate_up_proj[0]"].spec.bits == 3
    assert p["model.layers.1.mlp.experts.gate_up_proj[0]"].keep


def test_mixed_preset(tiny_sites):
    p = resolve("mixed", tiny_sites)
    assert p["model.layers.0.self_attn.q_a_proj"].spec.bits == 8
    assert p["model.layers.1.mlp.experts.down_proj[0]"].spec == QuantSpec(bits=4, group=128)
    assert p["lm_head"].keep and p["model.embed_tokens"].keep


def test_int4_g128_bytes_goal(tiny_sites):
    s = resolve("int4-g128", tiny_sites).summary()
    q = s["quantized_site_bytes"]
    assert q["after"] / q["bf16"] <= 0.30
    assert s["quantized_bits_per_weight"] == pytest.approx(4.1875)


def test_errors_name_rule_and_site(tiny_sites):
    with pytest.raises(RecipeError, match=r"rule 2 \(match nothing\*\) matches no site"):
        resolve({"rules": [{"match": "*", "bits": 4}, {"match": "nothing*", "bits": 4}]}, tiny_sites)
    with pytest.raises(RecipeError, match="group 96 does not divide the row length 128"):
        resolve({"rules": [{"match": "*", "bits": 4, "group": 96}]}, tiny_sites)
    resolve({"rules": [{"match": "nothing*", "bits": 4, "optional": True}]}, tiny_sites)


def test_diff_and_roundtrip(tiny_sites):
    a, b = resolve("int4-g128", tiny_sites), resolve("mixed", tiny_sites)
    d = a.diff(b)
    assert d and all(n.split(".")[3] == "self_attn" for n, _, _ in d)
    assert from_dict(b.to_dict(), tiny_sites) == b
    assert resolve(b.as_recipe(), tiny_sites) == b
    assert keep_plan(tiny_sites).quantized() == []
