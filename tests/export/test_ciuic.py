"""The own format: save, restore bit for bit, refuse what it cannot read."""

import json

import pytest
import torch
from safetensors import safe_open

import ciuic_lab
from ciuic_lab.errors import CiuicError, ModelLoadError
from ciuic_lab.export.ciuic import MARKER, load_saved, save
from ciuic_lab.export.common import loaded_module, loaded_state
from ciuic_lab.transforms import state_of
from export_helpers import MIXED, applied_tiny, load_tiny, logits

ALL_FUSIONS = {"qkv_a": True, "gate_up": True, "norm_fold": True, "mla_absorb": True, "moe_grouped": True}


def test_saved_model_restores_bit_for_bit(mixed, prompt_ids, tmp_path):
    before = logits(mixed.model, prompt_ids)
    info = save(mixed, tmp_path / "m")
    model, tok, plan = load_saved(tmp_path / "m")
    assert torch.equal(logits(model, prompt_ids), before)
    assert plan == state_of(mixed.model).plan
    assert tok is not None and tok("x").input_ids == mixed.tokenizer("x").input_ids
    held, saved = state_of(mixed.model).qweights, state_of(model).qweights
    assert set(held) == set(saved) and info["quantized_sites"] == len(held)
    for n, qt in held.items():
        assert saved[n].spec == qt.spec and torch.equal(saved[n].codes, qt.codes)
        assert torch.equal(saved[n].scales, qt.scales)


def test_fused_and_folded_plan_restores_bit_for_bit(prompt_ids, tmp_path):
    loaded = applied_tiny(MIXED, ALL_FUSIONS)
    before = logits(loaded.model, prompt_ids)
    save(loaded, tmp_path / "f")
    model, _, plan = load_saved(tmp_path / "f")
    assert torch.equal(logits(model, prompt_ids), before)
    assert plan.recipe.fusions == ALL_FUSIONS
    meta = json.loads((tmp_path / "f" / MARKER).read_text())
    assert any(q["folded"] for q in meta["quantized"].values())


def test_files_hold_packed_weights_not_the_weights_they_replace(mixed, tmp_path):
    save(mixed, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        bank = f.get_tensor("model.layers.2.mlp.experts.gate_up_proj")  # expert 5 kept: bank stored
        assert torch.equal(bank[5], loaded_state(mixed.model)["model.layers.2.mlp.experts.gate_up_proj"][5])
        assert not bank[0].any()  # quantized experts zeroed
    assert "model.layers.0.self_attn.kv_b_proj.weight" not in keys
    assert "model.layers.1.mlp.experts.down_proj" not in keys  # every expert quantized: bank left out
    assert {"model.layers.0.self_attn.kv_b_proj.codes", "model.layers.0.self_attn.kv_b_proj.scales"} <= keys
    assert "model.layers.0.self_attn.kv_b_proj.zeros" not in keys  # symmetric
    assert "model.layers.0.self_attn.q_b_proj.zeros" in keys
    assert "model.layers.1.mlp.experts.down_proj[3].codes" in keys
    for f in ("config.json", "recipe.json", "plan.json", "tokenizer.json", MARKER):
        assert (tmp_path / "m" / f).is_file()


def test_loaded_state_sees_through_apply_and_fusions():
    fresh = load_tiny().model.state_dict()
    loaded = applied_tiny(MIXED, ALL_FUSIONS)
    state = loaded_state(loaded.model)
    assert set(state) == set(fresh)
    assert all(torch.equal(state[k], fresh[k]) for k in fresh)


def test_unapplied_model_round_trips(prompt_ids, tmp_path):
    loaded = load_tiny()
    before = logits(loaded.model, prompt_ids)
    info = save(loaded.model, tmp_path / "plain", tokenizer=loaded.tokenizer)
    model, _, plan = load_saved(tmp_path / "plain")
    assert info["quantized_sites"] == 0 and not plan.quantized()
    assert torch.equal(logits(model, prompt_ids), before)


def test_revert_of_a_restored_model_is_its_dequantized_weights(mixed, tmp_path):
    save(mixed, tmp_path / "m")
    model, _, _ = load_saved(tmp_path / "m")
    ciuic_lab.revert(model)
    w = model.model.layers[0].self_attn.kv_b_proj.weight
    qt = state_of(mixed.model).qweights["model.layers.0.self_attn.kv_b_proj"]
    assert torch.equal(w, ciuic_lab.dequantize(qt))


def test_ciuic_lab_load_reads_a_saved_directory(mixed, prompt_ids, tmp_path):
    save(mixed, tmp_path / "m")
    loaded = ciuic_lab.load(str(tmp_path / "m"))
    assert loaded.source == "ciuic" and loaded.family == "deepseek_v3"
    assert torch.equal(logits(loaded.model, prompt_ids), logits(mixed.model, prompt_ids))


def test_save_refuses_to_clobber(mixed, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CiuicError, match="not empty"):
        save(mixed, tmp_path / "other")
    with pytest.raises(CiuicError, match="holds other files"):
        save(mixed, tmp_path / "other", overwrite=True)
    save(mixed, tmp_path / "m")
    save(mixed, tmp_path / "m", overwrite=True)
    with pytest.raises(CiuicError, match="accepted: a model from ciuic_lab.load"):
        save(object(), tmp_path / "x")


def test_load_names_what_is_wrong(mixed, tmp_path):
    with pytest.raises(ModelLoadError, match="ciuic_config.json is missing"):
        load_saved(tmp_path)
    save(mixed, tmp_path / "m")
    plan = json.loads((tmp_path / "m" / "plan.json").read_text())
    plan["sites"]["model.layers.0.self_attn.kv_b_proj"]["bits"] = 4
    (tmp_path / "m" / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ModelLoadError, match="kv_b_proj: plan.json says int4"):
        load_saved(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        load_saved(tmp_path / "m")


def test_tied_embeddings_stay_tied_and_exact(prompt_ids, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ciuic_lab.models import EMBEDDED, Loaded

    cfg = AutoConfig.from_pretrained(str(EMBEDDED["tiny-deepseek-random"]))
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    tok = load_tiny().tokenizer
    for rules in ([{"match": "*", "bits": 4, "group": 32}],
                  [{"match": "lm_head", "bits": 8, "scheme": "sym", "group": "channel"}]):
        ciuic_lab.apply(model, ciuic_lab.resolve({"rules": rules}, ciuic_lab.sites(model)))
        before = logits(model, prompt_ids)
        save(Loaded(model, tok, "deepseek_v3", "tied", "object"), tmp_path / "t", overwrite=True)
        restored, _, _ = load_saved(tmp_path / "t")
        assert torch.equal(logits(restored, prompt_ids), before)
        assert restored.model.embed_tokens.weight is loaded_module(restored, "lm_head").weight
        ciuic_lab.revert(model)
