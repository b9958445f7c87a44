"""GGUF: read back with gguf's own reader and dequantizer; exact where we say exact, errors where not."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from ciuic_lab.errors import CiuicError  # noqa: E402
from ciuic_lab.export.common import applied  # noqa: E402
from ciuic_lab.export.gguf_export import encode, export_gguf, read_gguf, type_for  # noqa: E402
from ciuic_lab.quant import QuantSpec, dequantize, quantize  # noqa: E402
from export_helpers import MIXED, applied_tiny  # noqa: E402

Q = gguf.GGMLQuantizationType


def _expected(src, p):
    """The part of our weight a placement's GGUF tensor holds: (expert index or None, weight)."""
    cfg = src.model.config
    w = src.site_weight(p.site).to(torch.float32)
    t = p.tensor
    site = src.sites[p.site]
    nh, nope, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    if t.endswith("ffn_gate_exps.weight"):
        return site.expert, w[: w.shape[0] // 2]
    if t.endswith("ffn_up_exps.weight"):
        return site.expert, w[w.shape[0] // 2:]
    if t.endswith("ffn_down_exps.weight"):
        return site.expert, w
    if "attn_v_b" in t:
        return None, w.reshape(nh, nope + vd, -1)[:, nope:, :]
    if "attn_k_b" in t:
        return None, w.reshape(nh, nope + vd, -1)[:, :nope, :].transpose(1, 2)
    return None, w


def _check_placements(loaded, rep, path):
    """Every placement the report calls exact reads back equal to our weight; every other one does not,
    and its reported error is the error the file really has."""
    src = applied(loaded)
    back = read_gguf(path)
    assert set(rep.tensors) == set(back)
    for p in rep.placements:
        typ, arr = back[p.tensor]
        assert typ == p.type
        e, w = _expected(src, p)
        got = torch.from_numpy(np.array(arr[e] if e is not None else arr)).reshape(w.shape)
        assert torch.equal(got, w) == p.exact, (p.site, p.tensor)
        if not p.exact:
            assert p.max_abs == pytest.approx(float((got.double() - w.double()).abs().max()), rel=1e-6)
    return back


@pytest.mark.parametrize("spec,qtype", [
    (QuantSpec(8, "sym", 32), Q.Q8_0),
    (QuantSpec(8, "sym", "channel"), Q.Q8_0),
    (QuantSpec(8, "sym", "tensor"), Q.Q8_0),
    (QuantSpec(4, "sym", 32), Q.Q4_0),
    (QuantSpec(4, "sym", 128), Q.Q4_0),
    (QuantSpec(3, "sym", 64), Q.Q4_0),
    (QuantSpec(2, "sym", 32), Q.Q4_0),
    (QuantSpec(5, "sym", 32), Q.Q5_0),
    (QuantSpec(6, "sym", 32), Q.Q8_0),
    (QuantSpec(6, "asym", 64), Q.Q8_0),
    (QuantSpec(5, "asym", 32, clip="mse"), Q.Q8_0),
])
def test_exact_types_dequantize_to_our_weights(spec, qtype):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    prefer = "exact" if spec.scheme == "asym" else "size"
    assert type_for(spec, 256, prefer=prefer) == (qtype, None)
    qt = quantize(w, spec)
    data, exact, why = encode(qt, qtype)
    assert exact and why is None
    back = gguf.quants.dequantize(data, qtype)
    assert np.array_equal(back, dequantize(qt).numpy())


def test_asym_4_bit_is_q4_1_exact_only_where_the_offset_is_an_fp16_value():
    spec = QuantSpec(4, "asym", 32)
    assert type_for(spec, 256)[0] == Q.Q4_1
    # scales that are powers of two make every offset -z*s an fp16 value
    w = torch.randint(-7, 9, (16, 256)).float() * 2.0**-8
    w[:, ::32] = -7 * 2.0**-8
    w[:, 1::32] = 8 * 2.0**-8
    qt = quantize(w, spec)
    data, exact, _ = encode(qt, Q.Q4_1)
    assert exact and np.array_equal(gguf.quants.dequantize(data, Q.Q4_1), dequantize(qt).numpy())
    torch.manual_seed(1)
    qt = quantize(torch.randn(64, 256) * 0.02, spec)
    data, exact, why = encode(qt, Q.Q4_1)
    err = np.abs(gguf.quants.dequantize(data, Q.Q4_1) - dequantize(qt).numpy())
    assert not exact and "offset" in why
    assert 0 < err.max() <= np.abs(dequantize(qt).numpy()).max() * 2**-10


def test_gguf_own_quantizers_do_not_reproduce_our_codes():
    """Why the blocks are written from our codes: gguf's Q8_0 rounds the scale to nearest (ours rounds it
    up), its Q4_0 maps the signed extreme to -8 (ours: amax to 7)."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    for spec, qtype in ((QuantSpec(8, "sym", 32), Q.Q8_0), (QuantSpec(4, "sym", 32), Q.Q4_0)):
        ours = dequantize(quantize(w, spec)).numpy()
        theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
        assert not np.array_equal(ours, theirs)


def test_mixed_plan_reads_back_exact_where_reported(mixed, tmp_path):
    rep = export_gguf(mixed, tmp_path / "m.gguf")
    back = _check_placements(mixed, rep, tmp_path / "m.gguf")
    d = rep.to_dict()
    assert back["blk.0.attn_kv_b.weight"][0] == "Q8_0"
    assert back["blk.1.ffn_down_exps.weight"][0] == "Q4_0" and back["blk.1.ffn_down_exps.weight"][1].shape == (8, 128, 128)
    assert back["blk.0.ffn_gate.weight"][0] == "Q5_1" and back["blk.2.attn_output.weight"][0] == "Q8_0"
    assert back["blk.1.ffn_gate_inp.weight"][0] == "F32" and back["blk.1.exp_probs_b.bias"][0] == "F32"
    assert back["output.weight"][0] == "Q8_0" and back["token_embd.weight"][0] == "F32"
    conv = {(c["site"], c["tensor"]): c for c in d["converted"]}
    kept = conv[("model.layers.2.mlp.experts.gate_up_proj[5]", "blk.2.ffn_gate_exps.weight")]
    assert kept["natural_type"] == "F32" and kept["type"] == "Q4_0" and kept["rel_rmse"] > 0.01
    assert conv[("model.layers.2.self_attn.o_proj", "blk.2.attn_output.weight")]["reason"] == "GGUF has no fp8 e4m3 type"
    assert "q - z" in conv[("model.layers.1.self_attn.o_proj", "blk.1.attn_output.weight")]["reason"]
    # an int3 g64 sym expert in an int4 g32 sym bank: both are Q4_0 blocks, so it is written exactly
    odd = next(p for p in rep.placements if p.site == "model.layers.1.mlp.experts.down_proj[3]")
    assert odd.exact and odd.type == "Q4_0" and odd.widened and (odd.site, odd.tensor) not in conv
    assert {"site": "lm_head", "spec": "int6 tensor sym", "type": "Q8_0"} in d["widened"]


def test_metadata_and_tokenizer(mixed, tmp_path):
    export_gguf(mixed, tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))

    def field(key):
        f = r.fields[key]
        return f.contents()

    cfg = mixed.model.config
    assert field("general.architecture") == "deepseek2"
    assert field("deepseek2.block_count") == cfg.num_hidden_layers
    assert field("deepseek2.expert_count") == cfg.n_routed_experts
    assert field("deepseek2.expert_used_count") == cfg.num_experts_per_tok
    assert field("deepseek2.leading_dense_block_count") == cfg.first_k_dense_replace
    assert field("deepseek2.attention.kv_lora_rank") == cfg.kv_lora_rank
    assert field("deepseek2.rope.dimension_count") == cfg.qk_rope_head_dim
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[0] == "<|bos|>"
    assert field("tokenizer.ggml.bos_token_id") == 0


def test_split_kv_b_and_folded_norms(tmp_path):
    loaded = applied_tiny(MIXED, {"norm_fold": True})
    rep = export_gguf(loaded, tmp_path / "s.gguf", kv_b="split")
    back = _check_placements(loaded, rep, tmp_path / "s.gguf")
    assert "blk.0.attn_kv_b.weight" not in back
    assert back["blk.0.attn_k_b.weight"][1].shape == (2, 128, 64)  # [heads, kv_lora, nope]
    assert back["blk.0.attn_v_b.weight"][1].shape == (2, 64, 128)  # [heads, v, kv_lora]
    kinds = {(p.tensor.split(".")[2], p.exact) for p in rep.placements if "attn_" in p.tensor and "_b." in p.tensor}
    assert ("attn_v_b", True) in kinds and ("attn_k_b", False) in kinds
    assert np.array_equal(back["blk.0.attn_norm.weight"][1], np.ones(128, np.float32))  # folded into readers
    r = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    assert r.fields["deepseek2.attention.key_length_mla"].contents() == 96


def test_prefer_exact_leaves_only_bank_conversions(mixed, tmp_path):
    rep = export_gguf(mixed, tmp_path / "e.gguf", prefer="exact")
    _check_placements(mixed, rep, tmp_path / "e.gguf")
    inexact = {p.site for p in rep.placements if not p.exact}
    assert inexact == {"model.layers.2.mlp.experts.gate_up_proj[5]"}


def test_refusals(mixed, tmp_path):
    (tmp_path / "m.gguf").write_text("")
    with pytest.raises(CiuicError, match="exists"):
        export_gguf(mixed, tmp_path / "m.gguf")
    with pytest.raises(CiuicError, match="kv_b 'both' is not supported; accepted: fused, split"):
        export_gguf(mixed, tmp_path / "n.gguf", kv_b="both")
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(CiuicError, match="family is llama; accepted: deepseek_v3, deepseek_v2"):
        export_gguf(llama, tmp_path / "l.gguf")


def test_a_tied_head_is_written_once_it_differs_from_the_embedding(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ciuic_lab import apply, resolve, sites
    from ciuic_lab.models import EMBEDDED

    cfg = AutoConfig.from_pretrained(str(EMBEDDED["tiny-deepseek-random"]))
    cfg.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(cfg).eval()
    rep = export_gguf(model, tmp_path / "a.gguf")
    assert "output.weight" not in rep.tensors  # llama.cpp reads the output from token_embd
    apply(model, resolve({"rules": [{"match": "model.embed_tokens", "bits": 8, "scheme": "sym", "group": 32}]},
                         sites(model)))
    rep = export_gguf(model, tmp_path / "b.gguf")
    back = read_gguf(tmp_path / "b.gguf")
    assert back["token_embd.weight"][0] == "Q8_0" and back["output.weight"][0] == "F32"
    assert np.array_equal(back["output.weight"][1], model.lm_head.weight.detach().numpy())


def test_llama_cpp_runs_the_export(mixed, tmp_path):
    """Where llama-cpp-python is installed: llama.cpp loads the file, tokenizes as we do, and its logits
    follow ours (it quantizes activations to 8 bits in quantized matmuls, so not to the bit)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from export_helpers import logits

    export_gguf(mixed, tmp_path / "m.gguf")
    params = llama_cpp.llama_model_default_params

    def no_repack():  # llama.cpp's CPU weight repacking does not take the tiny model's shapes
        p = params()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama.llama_cpp.llama_model_default_params = no_repack
    try:
        llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), logits_all=True, n_ctx=128, verbose=False)
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = params
    text = "def is_prime(n):\n    if n < 2:\n        return False\n"
    ids = mixed.tokenizer(text, add_special_tokens=False).input_ids
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    ours = logits(mixed.model, torch.tensor([ids]))[0]
    kl = torch.nn.functional.kl_div(theirs.log_softmax(-1), ours.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert float(kl) < 0.01 and (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9
