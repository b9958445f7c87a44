"""The plan compiler: each tool's file selects exactly the layers the plan names, with the nearest spec."""

import json
import re
import runpy
import sys
import types

import pytest
import torch

pytest.importorskip("gguf")

from ciuic_lab import resolve  # noqa: E402
from ciuic_lab.errors import CiuicError  # noqa: E402
from ciuic_lab.export.gguf_export import export_gguf  # noqa: E402
from ciuic_lab.export.plans import TOOLS, compile_plan, llama_type  # noqa: E402
from ciuic_lab.transforms import state_of  # noqa: E402


def test_llama_cpp_file_names_each_gguf_tensor_once(mixed, tmp_path):
    out = compile_plan(mixed, "llama.cpp", tmp_path)
    text = (tmp_path / "plan-llamacpp.txt").read_text()
    assert out.path.endswith("plan-llamacpp.txt") and text == out.text
    lines = text.splitlines()
    assert all(" " not in ln and "#" not in ln and re.fullmatch(r"\^.+\$=[a-z0-9_]+", ln) for ln in lines)
    rules = [(re.compile(ln.rsplit("=", 1)[0]), ln.rsplit("=", 1)[1]) for ln in lines]
    assert r"^blk\.3\.attn_kv_b\.weight$" not in text  # three blocks: 0..2
    assert r"^blk\.2\.attn_kv_b\.weight$=q8_0" in lines
    assert r"^blk\.2\.attn_k_b\.weight$=q8_0" in lines and r"^blk\.2\.attn_v_b\.weight$=q8_0" in lines
    assert r"^blk\.0\.ffn_gate\.weight$=q5_k" in lines  # int5 g128 asym
    assert r"^blk\.1\.attn_output\.weight$=q8_0" in lines and r"^output\.weight$=q6_k" in lines
    assert r"^blk\.1\.ffn_down_exps\.weight$=q4_0" in lines and r"^token_embd\.weight$=f32" in lines
    # every tensor of the model's own GGUF file is matched by exactly one rule (regex_search, as llama.cpp)
    rep = export_gguf(mixed, tmp_path / "m.gguf")
    for name in rep.tensors:
        hits = [t for rx, t in rules if rx.search(name)]
        assert len(hits) <= 1, name
        if name.endswith(".weight") and ("attn_" in name or "ffn_" in name) and "norm" not in name \
                and "ffn_gate_inp" not in name:
            assert hits, name
    conv = {c["site"] for c in out.converted}
    assert conv == {"model.layers.1.mlp.experts.down_proj[3]", "model.layers.2.mlp.experts.gate_up_proj[5]"}


def test_llama_type_table(mixed):
    site = next(s for s in state_of(mixed.model).plan.sites.values() if s.kind == "attn.kv_b")
    from ciuic_lab.quant import QuantSpec

    table = {QuantSpec(8, "sym", "channel"): "q8_0", QuantSpec(6, "asym", 64): "q6_k",
             QuantSpec(5, "sym", 32): "q5_0", QuantSpec(5, "asym", 32): "q5_1", QuantSpec(5, "sym", 64): "q5_k",
             QuantSpec(4, "sym", 32): "q4_0", QuantSpec(4, "asym", 32): "q4_1", QuantSpec(4, "asym", 128): "q4_k",
             QuantSpec(3, "sym", 32): "q3_k", QuantSpec(2, "asym", 64): "q2_k",
             QuantSpec(format="fp8_e4m3", bits=8): "q8_0", QuantSpec(): "f32"}
    assert {spec: llama_type(spec, site) for spec in table} == table


class _Cfg:
    def __init__(self, kind, **kw):
        self.kind, self.kw = kind, kw


def _stub_torchao(monkeypatch):
    """Just enough of torchao's names for the generated file to run and be inspected."""
    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    class MappingType:
        SYMMETRIC, ASYMMETRIC = "sym", "asym"

    mod("torchao")
    mod("torchao.quantization", FqnToConfig=lambda d: dict(d),
        IntxWeightOnlyConfig=lambda **kw: _Cfg("intx", **kw), Float8WeightOnlyConfig=lambda **kw: _Cfg("fp8", **kw))
    mod("torchao.quantization.granularity", PerAxis=lambda a: ("axis", a), PerGroup=lambda g: ("group", g),
        PerRow=lambda: ("row",))
    mod("torchao.quantization.quant_primitives", MappingType=MappingType)


def test_torchao_file_maps_each_module_to_its_spec(mixed, tmp_path, monkeypatch):
    out = compile_plan(mixed, "torchao", tmp_path / "ta.py")
    _stub_torchao(monkeypatch)
    config = runpy.run_path(str(tmp_path / "ta.py"))["config"]
    plan = state_of(mixed.model).plan
    want = {s.module: plan.configs[n].spec for n, s in plan.sites.items()
            if not plan.configs[n].keep and s.role in ("linear", "head", "embedding")}
    assert set(config) == set(want)
    for fqn, cfg in config.items():
        spec = want[fqn]
        if spec.is_fp8:
            assert cfg.kind == "fp8" and cfg.kw["granularity"] == ("row",)
            continue
        assert cfg.kw["weight_dtype"] == getattr(torch, f"int{spec.bits}")
        assert cfg.kw["mapping_type"] == spec.scheme
        assert cfg.kw["granularity"] == (("group", spec.group) if isinstance(spec.group, int) else ("axis", 0))
    left = {c["site"] for c in out.left_out}
    assert "model.layers.1.mlp.gate" in left and "model.layers.1.mlp.experts.down_proj[0]" in left
    assert {c["site"] for c in out.converted} == {"lm_head", "model.layers.2.self_attn.o_proj"}


def test_torchao_file_quantizes_with_real_torchao(mixed, tmp_path):
    pytest.importorskip("torchao")
    from ciuic_lab.models import load
    from torchao.quantization import quantize_

    compile_plan(mixed, "torchao", tmp_path / "ta.py")
    model = load("tiny-deepseek-random").model
    quantize_(model, runpy.run_path(str(tmp_path / "ta.py"))["config"], filter_fn=None)
    plan = state_of(mixed.model).plan
    for n, s in plan.sites.items():
        spec = plan.configs[n].spec
        if spec.keep or spec.is_fp8 or s.role not in ("linear", "head", "embedding"):
            continue
        w = model.get_submodule(s.module).weight
        assert w.target_dtype == getattr(torch, f"int{spec.bits}")


def _gptq_get(dynamic, module):
    """GPTQModel's rule: the first pattern that re.match-es wins; '-:' means not quantized."""
    for pattern, fields in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], module):
                return False
        elif re.match(pattern.removeprefix("+:"), module):
            return fields
    return None


def test_gptqmodel_dynamic_resolves_every_module(mixed, tmp_path):
    out = compile_plan(mixed, "gptqmodel", tmp_path / "g.json")
    doc = json.loads((tmp_path / "g.json").read_text())
    assert (doc["bits"], doc["group_size"], doc["sym"]) == (4, 32, True) and doc["lm_head"] is True
    base = {k: doc[k] for k in ("bits", "group_size", "sym")}
    dyn = doc["dynamic"]
    assert _gptq_get(dyn, "model.layers.0.self_attn.kv_b_proj") == {"bits": 8, "group_size": -1, "sym": True}
    assert _gptq_get(dyn, "model.layers.0.mlp.gate_proj") == {"bits": 8, "group_size": 128, "sym": False}
    assert _gptq_get(dyn, "model.layers.1.mlp.experts.3.down_proj") == {"bits": 3, "group_size": 64, "sym": True}
    assert _gptq_get(dyn, "model.layers.1.mlp.experts.2.down_proj") is None  # the base config
    assert _gptq_get(dyn, "model.layers.2.mlp.experts.5.gate_proj") is False  # kept
    assert _gptq_get(dyn, "model.layers.2.mlp.experts.5.up_proj") is False
    assert _gptq_get(dyn, "model.layers.12.self_attn.kv_b_proj") is None  # anchored: no layer 12 here
    assert base == {"bits": 4, "group_size": 32, "sym": True}
    conv = {c["site"]: c for c in out.converted}
    assert "int5 widened to 8" in conv["model.layers.0.mlp.gate_proj"]["reason"]
    assert "no fp8" in conv["model.layers.2.self_attn.o_proj"]["reason"]


def test_a_plan_compiles_without_weights(mixed):
    site_list = list(state_of(mixed.model).plan.sites.values())
    plan = resolve("int4-g128", site_list)
    for tool in TOOLS:
        assert compile_plan(plan, tool).entries > 0
    with pytest.raises(CiuicError, match="unknown tool 'vllm'; accepted: llama.cpp, torchao, gptqmodel"):
        compile_plan(plan, "vllm")
    with pytest.raises(CiuicError, match="nothing for GPTQModel"):
        compile_plan(resolve("keep", site_list), "gptqmodel")
