"""compressed-tensors: transformers loads the export; its logits are our dequantized model's."""

import json
import warnings

import pytest
import torch

pytest.importorskip("compressed_tensors")

from ciuic_lab.errors import CiuicError  # noqa: E402
from ciuic_lab.export.compressed import compress_site, decompress_site, export_compressed, represent  # noqa: E402
from ciuic_lab.quant import QuantSpec, dequantize, quantize  # noqa: E402
from ciuic_lab.transforms import state_of  # noqa: E402
from export_helpers import UNIFORM_EXPERTS, applied_tiny, dense_twin, logits  # noqa: E402


def _hf_load(path, model):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation=model.config._attn_implementation)
    return m.eval()


@pytest.mark.parametrize("spec", [
    QuantSpec(4, "sym", 32), QuantSpec(4, "asym", 64), QuantSpec(3, "asym", 32), QuantSpec(8, "sym", "channel"),
    QuantSpec(5, "asym", "channel"), QuantSpec(6, "sym", "tensor"), QuantSpec(8, "asym", "tensor"),
    QuantSpec(format="fp8_e4m3", bits=8),
])
@pytest.mark.parametrize("asym_format", ["naive-quantized", "pack-quantized"])
def test_compressors_give_back_our_weights(spec, asym_format):
    torch.manual_seed(0)
    qt = quantize(torch.randn(96, 256) * 0.02, spec)
    stored = compress_site(qt, asym_format=asym_format)
    if not spec.is_fp8 and (spec.scheme == "sym" or asym_format == "pack-quantized"):
        assert stored["weight_packed"].dtype == torch.int32
    assert torch.equal(decompress_site(stored, spec, asym_format), dequantize(qt))


def test_represent_rewrites_only_what_it_holds_exactly():
    torch.manual_seed(0)
    w = torch.randn(32, 256) * 0.02
    for src, dst in ((QuantSpec(4, "asym", 128), QuantSpec(5, "sym", 128)),
                     (QuantSpec(6, "asym", "channel"), QuantSpec(8, "sym", 64)),
                     (QuantSpec(3, "sym", 64), QuantSpec(4, "sym", 32)),
                     (QuantSpec(2, "asym", "tensor"), QuantSpec(3, "sym", "tensor"))):
        qt = quantize(w, src)
        q = represent(qt, dst)
        assert q is not None and q.spec == dst and torch.equal(dequantize(q), dequantize(qt)), (src, dst)
    assert represent(quantize(w, QuantSpec(4, "sym", 32)), QuantSpec(4, "sym", 64)) is None  # coarser groups
    assert represent(quantize(w, QuantSpec(4, "asym", 32)), QuantSpec(4, "sym", 32)) is None  # q - z leaves int4
    assert represent(quantize(w, QuantSpec(8, "asym", 32)), QuantSpec(8, "sym", 32)) is None


@pytest.mark.parametrize("asym", ["widen", "naive-quantized"])
def test_transformers_loads_the_export_and_matches_our_dequantized_model(prompt_ids, tmp_path, asym):
    loaded = applied_tiny(UNIFORM_EXPERTS)
    rep = export_compressed(loaded, tmp_path / "ct", asym=asym)
    assert rep.to_dict()["converted"] == [] and rep.experts_scheme == "int4 g32 sym"
    hf = _hf_load(tmp_path / "ct", loaded.model)
    twin = dense_twin(loaded)
    out = logits(hf, prompt_ids)
    assert torch.equal(out, logits(twin, prompt_ids))
    assert torch.allclose(out, logits(loaded.model, prompt_ids), atol=1e-4, rtol=0)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "mixed-precision"
    groups = list(cfg["config_groups"].values())
    assert groups[0]["targets"][0].startswith("re:.*mlp\\.experts")  # transformers takes the first such group

    def group_of(module):
        return next(g for g in groups if "re:^" + module.replace(".", "\\.") + "$" in g["targets"])

    g = group_of("model.layers.0.self_attn.kv_b_proj")
    assert g["weights"]["num_bits"] == 8 and g["weights"]["strategy"] == "channel" and g["format"] == "pack-quantized"
    fp8 = group_of("model.layers.2.self_attn.o_proj")
    assert fp8["weights"]["type"] == "float" and fp8["weights"]["block_structure"] == [128, 128]
    q_b = group_of("model.layers.0.self_attn.q_b_proj")  # int4 g64 asym
    if asym == "widen":
        assert (q_b["weights"]["num_bits"], q_b["weights"]["symmetric"], q_b["format"]) == (5, True, "pack-quantized")
        assert "model.layers.0.self_attn.q_b_proj" in {c["site"] for c in rep.to_dict()["rewritten_exactly"]}
    else:
        assert (q_b["weights"]["num_bits"], q_b["weights"]["symmetric"], q_b["format"]) == (4, False, "naive-quantized")
    o1 = group_of("model.layers.1.self_attn.o_proj")  # asym int8 has no wider symmetric form
    assert (o1["weights"]["symmetric"], o1["format"]) == (False, "naive-quantized")


def test_folded_plan_matches_too(prompt_ids, tmp_path):
    loaded = applied_tiny(UNIFORM_EXPERTS, {"norm_fold": True, "qkv_a": True})
    export_compressed(loaded, tmp_path / "ct")
    hf = _hf_load(tmp_path / "ct", loaded.model)
    assert torch.equal(logits(hf, prompt_ids), logits(dense_twin(loaded), prompt_ids))


def test_experts_outside_the_one_scheme_are_converted_and_reported(mixed, tmp_path):
    rep = export_compressed(mixed, tmp_path / "ct").to_dict()
    assert rep["experts_scheme"] == "int4 g32 sym"
    conv = {c["site"]: c for c in rep["converted"]}
    exact = {c["site"]: c for c in rep["rewritten_exactly"]}
    # an int3 g64 expert fits int4 g32 blocks exactly; the kept expert has to be re-quantized
    assert exact["model.layers.1.mlp.experts.down_proj[3]"]["written_as"] == "int4 g32 sym"
    assert set(conv) == {"model.layers.2.mlp.experts.gate_up_proj[5] gate_proj",
                         "model.layers.2.mlp.experts.gate_up_proj[5] up_proj"}
    assert all(c["spec"] == "keep" and c["rel_rmse"] > 0.01 for c in conv.values())
    hf = _hf_load(tmp_path / "ct", mixed.model)
    held = state_of(mixed.model).qweights
    for layer in (1, 2):
        for bank in ("gate_up_proj", "down_proj"):
            for e in range(8):
                qt = held.get(f"model.layers.{layer}.mlp.experts.{bank}[{e}]")
                got = getattr(hf.model.layers[layer].mlp.experts, bank)[e].detach()
                if qt is None:  # the kept expert: its reported error is the error it has
                    want = mixed.model.model.layers[layer].mlp.experts._gate_up_w[e]
                    err = float((got.double() - want.double()).abs().max())
                    assert err == pytest.approx(max(c["max_abs"] for c in conv.values()), rel=1e-6)
                else:
                    assert torch.equal(got, dequantize(qt)), (layer, bank, e)


def test_refusals(mixed, tmp_path):
    with pytest.raises(CiuicError, match="asym 'int4' is not supported; accepted: widen, naive-quantized"):
        export_compressed(mixed, tmp_path / "a", asym="int4")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(CiuicError, match="not empty"):
        export_compressed(mixed, tmp_path / "b")
