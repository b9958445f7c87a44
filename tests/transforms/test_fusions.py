"""Each fusion is proven equal (fp32, logits within 1e-4 relative, same greedy tokens) before it is timed."""

import pytest
import torch
from transformers import DeepseekV3Config

from ciuic_lab import apply, load_recipe, resolve, revert
from ciuic_lab.measure import fingerprint
from ciuic_lab.models.cache import cache_kwargs, cache_of, greedy_steps
from ciuic_lab.recipe import FUSIONS
from ciuic_lab.transforms import backends_in_use, describe
from ciuic_lab.transforms.fusions import FusedMLA, FusedMoE, kv_cache_bytes_per_token, kv_cache_report

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
    step = model(nxt, **cache_kwargs(model, cache_of(out)), use_cache=True).logits
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
    if recipe == "int4-g128":  # the shared expert rode in the routed experts' grouped call
        moes = [mod for mod in m.modules() if isinstance(mod, FusedMoE)]
        assert moes and all(mod._shared is not None and mod._shared[1] is not None for mod in moes)
        # every site is reported with what ran its weight in the last (decode) step, fused or not
        used = backends_in_use(m)
        assert "not run yet" not in used.values(), used
        ran = m.model.layers[1].self_attn.qkv_a.fused.last_backend
        assert ran and used["model.layers.1.self_attn.q_a_proj"] == ran
        assert used["model.layers.1.self_attn.kv_b_proj"] == "torch"  # absorbed: torch products
        assert used["model.layers.1.mlp.shared_experts.down_proj"] == m.model.layers[1].mlp.experts.last_backend
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


# ------------------------------------------------------------------ the lean decode paths
@pytest.mark.parametrize("interleave", [True, False])
def test_rotary_as_one_product_is_transformers_rotary_bit_for_bit(interleave):
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    from ciuic_lab.transforms.fusions import rope_cos_sin, rope_matrix, rotary

    g = torch.Generator().manual_seed(0)
    dr = 32
    q, k = torch.randn(2, 4, 3, dr, generator=g), torch.randn(2, 1, 3, dr, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, dr, 2).float() / dr))
    f = (torch.arange(3)[None] + 17)[..., None].float() * inv
    emb = torch.cat([f, f], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    fn = hf.apply_rotary_pos_emb_interleave if interleave else hf.apply_rotary_pos_emb
    want_q, want_k = fn(q, k, cos, sin)
    mat, cs = rope_matrix(dr, interleave), rope_cos_sin(cos, sin, interleave, torch.float32)
    # rotary() takes [b, q, heads, dr]; transformers' layout is [b, heads, q, dr]
    got_q = rotary(q.transpose(1, 2), mat, cs).transpose(1, 2)
    got_k = rotary(k.transpose(1, 2), mat, cs).transpose(1, 2)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@torch.no_grad()
def _padded_steps(model, ids, mask, steps):
    """Prefill a left-padded batch, then feed each block of ``steps`` (a few tokens at a time)."""
    out = model(ids, attention_mask=mask, use_cache=True)
    logits, past = [out.logits.clone()], cache_of(out)
    for s in steps:
        mask = torch.cat([mask, torch.ones_like(s)], dim=1)
        out = model(s, attention_mask=mask, **cache_kwargs(model, past), use_cache=True)
        logits.append(out.logits.clone())
        past = cache_of(out)
    short = model(ids[:, -3:], use_cache=True).logits.clone()  # a prompt of <= 4 tokens: absorbed from the start
    return logits, short


@pytest.mark.parametrize("fusions", [{"mla_absorb": True}, ALL])
def test_absorbed_attention_batches_padding_and_few_token_steps(shaped, fusions):
    m = shaped.model
    g = torch.Generator().manual_seed(3)
    v = m.config.vocab_size
    ids = torch.randint(1, v, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    steps = [torch.randint(1, v, (2, n), generator=g) for n in (3, 1, 4, 2)]
    ref, ref_short = _padded_steps(m, ids, mask, steps)
    apply(m, resolve({"rules": [], "fusions": fusions}, __import__("ciuic_lab").sites(m)))
    got, got_short = _padded_steps(m, ids, mask, steps)
    revert(m)
    for a, b in zip(got, ref):
        assert _rel(a[1], b[1]) < 1e-4  # the unpadded row
        assert _rel(a[0, -1], b[0, -1]) < 1e-4  # the padded row's newest token
    assert _rel(got_short, ref_short) < 1e-4


def test_every_fusion_decodes_under_inference_mode(shaped, ids):
    """torch.inference_mode() (what serving code and the CPU decode benchmark use) makes tensors with
    no version counter; the fused attention's per-step rotary cache must take them."""
    m = shaped.model
    apply(m, resolve({"rules": [{"match": "*", "bits": 4, "group": 128}], "fusions": ALL}, __import__("ciuic_lab").sites(m)))
    ref = _gen(m, ids)
    with torch.inference_mode():
        steps = greedy_steps(m, ids)
        got = torch.cat([next(steps) for _ in range(ref.shape[1] - ids.shape[1])], dim=1)
    revert(m)
    assert torch.equal(got, ref[:, ids.shape[1]:])


def _mla(cfg_kw):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    kw = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32,
              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8, num_hidden_layers=1)
    cfg = DeepseekV3Config(**{**kw, **cfg_kw})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = DeepseekV3Attention(cfg, 0).eval()
    with torch.no_grad():
        for mod in (attn.q_a_layernorm, attn.kv_a_layernorm):
            mod.weight.uniform_(0.5, 1.5)
    return attn, DeepseekV3RotaryEmbedding(cfg)


@pytest.mark.parametrize("kw", [{}, {"kv_lora_rank": 128}, {"rope_interleave": False}])
@torch.no_grad()
def test_fused_mla_decode_equals_transformers_attention(kw):
    """Module against module: the composed absorbed query (where it is no larger) and the bmm form (where not)."""
    from transformers import DynamicCache

    attn, rope = _mla(kw)
    fused = FusedMLA(attn, None, True, "latent")
    composed = (fused.w_q is not None, fused.w_uk is None)
    assert composed == ((True, True) if not kw.get("kv_lora_rank") else (False, False))
    cfg = attn.config
    caches = [DynamicCache(config=cfg), DynamicCache(config=cfg)]
    g = torch.Generator().manual_seed(1)
    pos = 0
    for n in (7, 1, 1, 3, 1):
        x = torch.randn(2, n, cfg.hidden_size, generator=g)
        pe = rope(x, torch.arange(pos, pos + n)[None])
        i = torch.arange(n)[:, None] + pos
        mask = torch.where(torch.arange(pos + n)[None] <= i, 0.0, float("-inf"))[None, None].expand(2, 1, n, pos + n)
        want = attn(x, pe, mask, caches[0])[0]
        got = fused(x, pe, mask, caches[1])[0]
        assert _rel(got, want) < 1e-5, n
        pos += n
    assert torch.equal(caches[0].layers[0].keys, caches[1].layers[0].keys)  # the same latent cache
    assert _rel(caches[1].layers[0].values, caches[0].layers[0].values) == 0.0


def test_absorbed_query_weight_is_kept_quantized(tiny, tiny_sites):
    m = tiny.model
    apply(m, resolve({"rules": [], "fusions": {"mla_absorb": True}}, tiny_sites))
    att = m.model.layers[1].self_attn
    assert att.w_q is not None and att.w_uk is None
    apply(m, resolve({"rules": [{"match": "*", "bits": 8}], "fusions": {"mla_absorb": True}}, tiny_sites))
    att = m.model.layers[1].self_attn
    assert att.w_q is None and att.w_uk is not None  # q_b_proj stays a quantized product
    revert(m)


@pytest.mark.parametrize("tokens", [1, 3, 8, 9])
@torch.no_grad()
def test_grouped_dense_experts_equal_transformers_experts(tiny, tokens):
    from ciuic_lab.transforms import QuantExperts

    bank = tiny.model.model.layers[1].mlp.experts
    n = bank.gate_up_proj.shape[0]
    fused = QuantExperts(bank, [None] * n, [None] * n)
    fused.grouped = True
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, bank.gate_up_proj.shape[-1], generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    want = bank(x, idx, w)
    assert _rel(fused(x, idx, w), want) < 1e-6
    if tokens * 2 > 16:
        return
    # decode form: an index outside the bank (a masked-out slot) contributes nothing
    idx2 = idx.clone()
    idx2[0, 1] = -1
    w2 = w.clone()
    w2[0, 1] = 0.0
    want2 = bank(x, idx2.clamp(min=0), w2)
    assert _rel(fused(x, idx2, w2), want2) < 1e-6


@torch.no_grad()
def test_trained_model_all_fusions_same_greedy_tokens_on_the_evaluation_prompts():
    """The embedded trained model, fp32, every fusion on: 64 greedy tokens on each evaluation prompt equal
    the unfused model's, and the prompt's logits and each decode step's stay within 1e-4."""
    import warnings

    from ciuic_lab import load
    from ciuic_lab.measure import evalset
    from ciuic_lab.models import embedded_names

    if "tiny-deepseek" not in embedded_names():
        pytest.skip("the trained tiny-deepseek is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load("tiny-deepseek", dtype="fp32")
    m, tok = loaded.model, loaded.tokenizer

    def run():
        out = []
        for prompt in evalset("standard").prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            o = m(ids, use_cache=True)
            logits, past, new = [o.logits[0].clone()], cache_of(o), []
            nxt = o.logits[:, -1:].argmax(-1)
            for _ in range(64):
                new.append(int(nxt))
                o = m(nxt, **cache_kwargs(m, past), use_cache=True)
                logits.append(o.logits[0].clone())
                past, nxt = cache_of(o), o.logits[:, -1:].argmax(-1)
            out.append((new, logits))
        return out

    ref = run()
    apply(m, resolve({"rules": [], "fusions": ALL}, __import__("ciuic_lab").sites(m)))
    got = run()
    revert(m)
    for (new_g, lg), (new_r, lr) in zip(got, ref):
        assert new_g == new_r
        assert max(_rel(a, b) for a, b in zip(lg, lr)) < 1e-4


def test_stacked_dense_weight_is_the_same_values_stored_k_major(tiny):
    from ciuic_lab.transforms.fusions import stack_linears

    attn = tiny.model.model.layers[0].self_attn
    fused, why = stack_linears([attn.q_a_proj, attn.kv_a_proj_with_mqa])
    assert why == "" and fused.weight.shape == (attn.q_a_proj.out_features + attn.kv_a_proj_with_mqa.out_features,
                                                attn.q_a_proj.in_features)
    assert torch.equal(fused.weight, torch.cat([attn.q_a_proj.weight, attn.kv_a_proj_with_mqa.weight]))
    assert fused.weight.stride() == (1, fused.weight.shape[0])  # K-major: a transposed view of [K, N]
    x = torch.randn(3, attn.q_a_proj.in_features)
    want = torch.cat([attn.q_a_proj(x), attn.kv_a_proj_with_mqa(x)], dim=-1)
    assert _rel(fused(x), want) < 1e-6
