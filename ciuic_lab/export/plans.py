"""The plan compiler: one plan written as another tool's per-layer quantization config.

These files carry the *plan*, not our weights: the other tool quantizes the original weights itself,
with its own rounding, and the types below are the nearest it offers to each site's spec.

- ``llama.cpp`` (``llama-quantize --tensor-type-file FILE``): one ``regex=type`` per line, each regex
  anchored to one GGUF tensor (``^blk\\.3\\.attn_kv_b\\.weight$=q8_0``); names from ``gguf``'s own name map.
  Types: int8 -> q8_0, int6 -> q6_k, int5 -> q5_0 / q5_1 (sym / asym, groups of 32) else q5_k,
  int4 -> q4_0 / q4_1 (groups of 32) else q4_k, int3 -> q3_k, int2 -> q2_k, fp8 -> q8_0, kept -> the
  model's float type. An expert bank is one tensor: its type is the bank's most common spec, and experts
  with another spec are reported. ``kv_b_proj`` is written for ``attn_kv_b`` and for the ``attn_k_b`` /
  ``attn_v_b`` pair llama.cpp's converter makes of it.
- ``torchao`` (``FqnToConfig``): a Python file defining ``config``; ``quantize_(model, config,
  filter_fn=None)``. Integer specs -> ``IntxWeightOnlyConfig`` (int1-int8, ``PerGroup`` / ``PerAxis(0)``,
  symmetric or asymmetric); ``tensor`` scales -> ``PerAxis(0)`` (torchao has no per-tensor intx);
  fp8 -> ``Float8WeightOnlyConfig(granularity=PerRow())``. torchao quantizes 2-D weights only: the 3-D
  expert banks of transformers' DeepSeek-V3, routers and norms are left out and reported.
- ``gptqmodel`` (``QuantizeConfig(dynamic=...)``): JSON with the base ``bits`` / ``group_size`` / ``sym``
  (the most common spec) and a ``dynamic`` map of anchored regexes: ``+:`` overrides per module, ``-:``
  for modules kept. Routed experts are named per expert (``mlp.experts.5.gate_proj``, ``up_proj``,
  ``down_proj``), as GPTQModel quantizes them. GPTQ's bits are 2, 3, 4, 8: int5 / int6 / fp8 become 8;
  ``channel`` is ``group_size -1``; ``tensor`` becomes ``-1`` too.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CiuicError
from ..plan import Plan
from ..quant import QuantSpec
from ..sites import Site

TOOLS = ("llama.cpp", "torchao", "gptqmodel")
SUFFIX = {"llama.cpp": ".txt", "torchao": ".py", "gptqmodel": ".json"}
GPTQ_BITS = (2, 3, 4, 8)


@dataclass
class Compiled:
    tool: str
    text: str
    entries: int
    converted: list[dict[str, str]] = field(default_factory=list)   # sites whose spec the tool cannot hold
    left_out: list[dict[str, str]] = field(default_factory=list)    # sites the file does not cover
    notes: list[str] = field(default_factory=list)
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("text")
        d["format"] = self.tool
        return d


def _plan_of(obj) -> Plan:
    if isinstance(obj, Plan):
        return obj
    from .common import applied

    return applied(obj).plan


def _dtype_type(site: Site) -> str:
    return {"bfloat16": "bf16", "float16": "f16"}.get(site.dtype, "f32")


# ------------------------------------------------------------------ llama.cpp
def llama_type(spec: QuantSpec, site: Site) -> str:
    """The llama-quantize type nearest to ``spec`` (lower case, as ``--tensor-type`` takes it)."""
    if spec.keep:
        return _dtype_type(site)
    if spec.is_fp8:
        return "q8_0"
    g32 = spec.group == 32 or (spec.group in ("channel", "tensor") and site.k == 32)
    sym = spec.scheme == "sym"
    return {
        8: "q8_0",
        6: "q6_k",
        5: ("q5_0" if sym else "q5_1") if g32 else "q5_k",
        4: ("q4_0" if sym else "q4_1") if g32 else "q4_k",
        3: "q3_k",
        2: "q2_k",
    }[spec.bits]


def _arch(plan: Plan, arch: str | None):
    import gguf

    if arch:
        try:
            return gguf.MODEL_ARCH[arch.upper().replace(".", "").replace("-", "_")]
        except KeyError:
            raise CiuicError(f"unknown GGUF architecture {arch!r}; accepted e.g. deepseek2, llama, qwen2") from None
    kinds = {s.kind for s in plan.sites.values()}
    if "attn.kv_b" in kinds or any(k.startswith("moe.") for k in kinds):
        return gguf.MODEL_ARCH.DEEPSEEK2
    return gguf.MODEL_ARCH.LLAMA


def _gguf_names(site: Site, tmap) -> list[str]:
    from .gguf_export import tensor_name

    if site.role == "expert":
        if site.param == "gate_up_proj":
            base = site.module
            return [tensor_name(tmap, f"{base}.gate_proj"), tensor_name(tmap, f"{base}.up_proj")]
        return [tensor_name(tmap, f"{site.module}.{site.param}")]
    name = tensor_name(tmap, f"{site.module}.{site.param}")
    if site.kind == "attn.kv_b":
        return [name, name.replace("attn_kv_b", "attn_k_b"), name.replace("attn_kv_b", "attn_v_b")]
    return [name]


def to_llama_cpp(plan: Plan, arch: str | None = None) -> Compiled:
    import gguf

    a = _arch(plan, arch)
    blocks = 1 + max((s.block for s in plan.sites.values() if s.block is not None), default=0)
    tmap = gguf.get_tensor_name_map(a, blocks)
    out = Compiled("llama.cpp", "", 0)
    lines: list[tuple[str, str]] = []
    banks: dict[str, list[Site]] = {}
    for s in plan.sites.values():
        if s.role == "expert":
            banks.setdefault(f"{s.module}.{s.param}", []).append(s)
            continue
        if s.role in ("norm", "router") or len(s.shape) < 2:
            if not plan.configs[s.name].keep:
                out.left_out.append({"site": s.name, "spec": plan.configs[s.name].spec.label(),
                                     "reason": "llama-quantize keeps vectors and routers in F32"})
            continue
        spec = plan.configs[s.name].spec
        t = llama_type(spec, s)
        for name in _gguf_names(s, tmap):
            lines.append((name, t))
    for experts in banks.values():
        specs = [plan.configs[s.name].spec for s in experts]
        common = Counter(specs).most_common(1)[0][0]
        t = llama_type(common, experts[0])
        for s, spec in zip(experts, specs, strict=True):
            if llama_type(spec, s) != t:
                out.converted.append({"site": s.name, "spec": spec.label(), "written_as": t,
                                      "reason": "an expert bank is one GGUF tensor: its most common spec decides"})
        for name in _gguf_names(experts[0], tmap):
            lines.append((name, t))
    out.text = "".join(f"^{re.escape(n)}$={t}\n" for n, t in lines)
    out.entries = len(lines)
    quantized = [t for _, t in lines if t.startswith(("q", "iq"))]
    base = Counter(quantized).most_common(1)[0][0] if quantized else "q8_0"
    out.notes.append(f"llama-quantize --tensor-type-file FILE model-f16.gguf out.gguf {base.upper()}")
    if any(t.endswith("_k") for _, t in lines):
        out.notes.append("K-quants need rows of a multiple of 256; llama-quantize falls back to a legacy type "
                         "for other rows")
    return out


# ------------------------------------------------------------------ torchao
def _torchao_config(spec: QuantSpec, k: int) -> tuple[str, str | None]:
    """Python source of the torchao config for ``spec``, and why it is not the spec exactly (or None)."""
    if spec.is_fp8:
        return "Float8WeightOnlyConfig(granularity=PerRow())", "torchao's fp8 weight-only config scales per row, not per 128x128 block"
    mapping = "MappingType.SYMMETRIC" if spec.scheme == "sym" else "MappingType.ASYMMETRIC"
    why = None
    if spec.group == "channel":
        gran = "PerAxis(0)"
    elif spec.group == "tensor":
        gran, why = "PerAxis(0)", "torchao's intx has no per-tensor scale: per output row instead"
    else:
        gran = f"PerGroup({int(spec.group)})"
    return f"IntxWeightOnlyConfig(weight_dtype=torch.int{spec.bits}, granularity={gran}, mapping_type={mapping})", why


def _key(spec: QuantSpec) -> str:
    return re.sub(r"[^0-9a-z]+", "_", spec.label().lower()).strip("_")


def to_torchao(plan: Plan) -> Compiled:
    out = Compiled("torchao", "", 0)
    configs: dict[str, str] = {}
    entries: list[tuple[str, str]] = []
    for s in plan.sites.values():
        spec = plan.configs[s.name].spec
        if spec.keep:
            continue
        if s.role == "expert" or s.role in ("norm", "router") or len(s.shape) != 2:
            out.left_out.append({"site": s.name, "spec": spec.label(),
                                 "reason": "torchao quantizes 2-D linear and embedding weights only"})
            continue
        src, why = _torchao_config(spec, s.k)
        key = _key(spec)
        configs[key] = src
        entries.append((s.module, key))
        if why:
            out.converted.append({"site": s.name, "spec": spec.label(), "written_as": src, "reason": why})
    lines = [
        f'"""torchao per-module quantization for the plan {plan.recipe.name!r}: written by ciuic-lab export.',
        "",
        "    from torchao.quantization import quantize_",
        "    quantize_(model, config, filter_fn=None)",
        '"""',
        "",
        "import torch",
        "from torchao.quantization import FqnToConfig, Float8WeightOnlyConfig, IntxWeightOnlyConfig",
        "from torchao.quantization.granularity import PerAxis, PerGroup, PerRow",
        "from torchao.quantization.quant_primitives import MappingType",
        "",
        "CONFIGS = {",
        *[f"    {k!r}: {v}," for k, v in configs.items()],
        "}",
        "",
        "config = FqnToConfig({",
        *[f"    {m!r}: CONFIGS[{k!r}]," for m, k in entries],
        "})",
        "",
    ]
    out.text = "\n".join(lines)
    out.entries = len(entries)
    out.notes.append("quantize_(model, config, filter_fn=None) with torchao>=0.15 (FqnToConfig)")
    return out


# ------------------------------------------------------------------ GPTQModel
def _gptq_fields(spec: QuantSpec, k: int) -> tuple[dict[str, Any], str | None]:
    if spec.is_fp8:
        return {"bits": 8, "group_size": -1, "sym": True}, "GPTQ has no fp8: int8 per channel"
    why = None
    bits = spec.bits
    if bits not in GPTQ_BITS:
        bits, why = 8, f"GPTQ's bits are {', '.join(map(str, GPTQ_BITS))}: int{spec.bits} widened to 8"
    if spec.group in ("channel", "tensor"):
        group = -1
        if spec.group == "tensor":
            why = (why + "; " if why else "") + "GPTQ has no per-tensor scale: per channel"
    else:
        group = int(spec.group)
    return {"bits": bits, "group_size": group, "sym": spec.scheme == "sym"}, why


def _gptq_modules(site: Site) -> list[str]:
    if site.role == "expert":
        base = f"{site.module}.{site.expert}"
        if site.param == "gate_up_proj":
            return [f"{base}.gate_proj", f"{base}.up_proj"]
        return [f"{base}.{site.param}"]
    return [site.module]


def to_gptqmodel(plan: Plan) -> Compiled:
    out = Compiled("gptqmodel", "", 0)
    linear = [s for s in plan.sites.values() if s.role in ("linear", "expert", "head")]
    quantized = [s for s in linear if not plan.configs[s.name].keep]
    if not quantized:
        raise CiuicError("the plan quantizes no linear layer: there is nothing for GPTQModel to do")
    fields = {s.name: _gptq_fields(plan.configs[s.name].spec, s.k) for s in quantized}
    base_fields = Counter(json.dumps(f[0], sort_keys=True) for f in fields.values()).most_common(1)[0][0]
    base = json.loads(base_fields)
    dynamic: dict[str, dict[str, Any]] = {}
    covered = 0
    for s in linear:
        spec = plan.configs[s.name].spec
        for m in _gptq_modules(s):
            rx = "^" + re.escape(m) + "$"
            if spec.keep:
                if s.role != "head":  # GPTQModel leaves lm_head alone unless asked
                    dynamic[f"-:{rx}"] = {}
                continue
            f, why = fields[s.name]
            covered += 1
            if s.role == "head":
                out.notes.append("lm_head is quantized in the plan: pass lm_head=True to QuantizeConfig")
            if f != base:
                dynamic[f"+:{rx}"] = f
            if why:
                out.converted.append({"site": s.name, "spec": spec.label(), "written_as": json.dumps(f), "reason": why})
    for s in plan.sites.values():
        if s.role not in ("linear", "expert", "head") and not plan.configs[s.name].keep:
            out.left_out.append({"site": s.name, "spec": plan.configs[s.name].spec.label(),
                                 "reason": "GPTQModel quantizes linear layers only"})
    doc = {**base, "desc_act": False, "dynamic": dynamic}
    if any(s.role == "head" for s in quantized):
        doc["lm_head"] = True
    out.text = json.dumps(doc, indent=2) + "\n"
    out.entries = covered  # modules quantized: by the base config or a `+:` rule
    out.notes.append("QuantizeConfig(**json.load(open(FILE))) then GPTQModel.load(model_id, quant_config).quantize(...)")
    out.notes = sorted(set(out.notes), key=out.notes.index)
    return out


# ------------------------------------------------------------------ entry point
def compile_plan(obj, tool: str, path: str | os.PathLike | None = None, *, arch: str | None = None,
                 overwrite: bool = False) -> Compiled:
    """Write the plan of ``obj`` (a Plan, or an applied model / Loaded / Session) for ``tool``."""
    if tool not in TOOLS:
        raise CiuicError(f"unknown tool {tool!r}; accepted: {', '.join(TOOLS)}")
    plan = _plan_of(obj)
    if tool == "llama.cpp":
        out = to_llama_cpp(plan, arch)
    elif tool == "torchao":
        out = to_torchao(plan)
    else:
        out = to_gptqmodel(plan)
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / f"plan-{tool.replace('.', '')}{SUFFIX[tool]}"
        if p.exists() and not overwrite:
            raise CiuicError(f"{str(p)!r} exists; accepted: a new path, or overwrite=True (--overwrite)")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(out.text)
        out.path = str(p)
    return out
