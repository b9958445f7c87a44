"""Site names and kinds for each family, on tiny configs built here."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, GPTNeoXConfig, LlamaConfig,
                          Qwen2Config)

from ciuic_lab.models import family_of
from ciuic_lab.sites import get_weight, sites

MLA = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
           q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
           intermediate_size=48, moe_intermediate_size=16, first_k_dense_replace=1, n_routed_experts=4,
           num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1)


def _build(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _names(model):
    return {s.name: s for s in sites(model)}


def test_deepseek_v3_sites():
    m = _build(DeepseekV3Config(**MLA))
    s = _names(m)
    assert family_of(m) == "deepseek_v3"
    assert s["model.layers.0.self_attn.q_a_proj"].kind == "attn.q_a"
    assert s["model.layers.0.self_attn.kv_a_proj_with_mqa"].kind == "attn.kv_a"
    assert s["model.layers.1.self_attn.kv_b_proj"].kind == "attn.kv_b"
    assert s["model.layers.0.mlp.down_proj"].kind == "mlp.down"
    assert s["model.layers.1.mlp.shared_experts.up_proj"].kind == "moe.shared.up"
    e = s["model.layers.1.mlp.experts.down_proj[3]"]
    assert (e.kind, e.block, e.expert, e.shape, e.role) == ("moe.expert.down", 1, 3, (32, 16), "expert")
    assert s["model.layers.1.mlp.experts.gate_up_proj[0]"].shape == (32, 32)
    assert s["model.layers.1.mlp.gate"].kind == "moe.router"
    for kept in ("model.embed_tokens", "lm_head", "model.layers.1.mlp.gate", "model.norm",
                 "model.layers.0.input_layernorm"):
        assert s[kept].keep_default, kept
    assert not s["model.layers.0.self_attn.o_proj"].keep_default
    # every parameter is covered exactly once
    assert sum(x.params for x in s.values()) == sum(p.numel() for p in m.parameters())
    w = get_weight(m, e)
    assert torch.equal(w, m.model.layers[1].mlp.experts.down_proj[3])


def test_deepseek_v2_lite_without_q_lora():
    m = _build(DeepseekV2Config(**{**MLA, "q_lora_rank": None}))
    s = _names(m)
    assert family_of(m) == "deepseek_v2"
    assert s["model.layers.0.self_attn.q_proj"].kind == "attn.q"
    assert "model.layers.0.self_attn.q_a_proj" not in s
    assert any(x.kind == "moe.expert.gate_up" for x in s.values())


@pytest.mark.parametrize("cfg,family", [
    (LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2), "llama"),
    (Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2), "qwen2"),
])
def test_llama_and_qwen2(cfg, family):
    m = _build(cfg)
    s = _names(m)
    assert family_of(m) == family
    for proj, kind in [("q_proj", "attn.q"), ("k_proj", "attn.k"), ("v_proj", "attn.v"), ("o_proj", "attn.o")]:
        assert s[f"model.layers.1.self_attn.{proj}"].kind == kind
        assert s[f"model.layers.1.self_attn.{proj}"].block == 1
    assert s["model.layers.0.mlp.gate_proj"].kind == "mlp.gate"
    assert s["lm_head"].kind == "head"


def test_generic_fallback_lists_every_linear():
    m = _build(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64))
    s = sites(m)
    assert family_of(m) == "generic"
    linears = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) >= 9
    assert [x.name for x in s if x.role in ("linear", "head")] == linears
    assert {x.kind for x in s if x.role == "linear"} == {"linear"}
    assert s[-1].kind == "head"
