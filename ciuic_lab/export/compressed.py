"""compressed-tensors: the quantized checkpoint vLLM and transformers load, one config group per spec.

The checkpoint is a Hugging Face directory (``config.json`` with a ``quantization_config`` of
``quant_method: compressed-tensors``, ``model.safetensors``, tokenizer files). Every quantized linear
site (attention, dense MLP, shared experts, head) is targeted by its exact name
(``re:^model\\.layers\\.3\\.self_attn\\.kv_b_proj$``) in the config group of its spec, and stored by the
``compressed-tensors`` compressors from our dequantized weight, scales and zero points (which gives back
our codes exactly: ``(q - z) * s / s`` is ``q - z``):

- symmetric integer specs: ``pack-quantized`` (``weight_packed`` int32, ``weight_scale``, ``weight_shape``);
- asymmetric integer specs, by ``asym``: ``"widen"`` (default) writes asym intB as *sym int(B+1)* with the
  same scales and the codes ``q - z`` -- the very same weights, in the symmetric packed form transformers
  and vLLM both load (asym int8, which has no wider symmetric form, falls back to ``naive-quantized``);
  ``"naive-quantized"`` keeps them asymmetric with int8 codes and zero points; ``"pack-quantized"`` packs
  codes and zero points densely (what llm-compressor writes; transformers 5.23 with compressed-tensors
  0.20 cannot load its zero points);
- ``group`` -> strategy ``group``, ``channel`` -> ``channel``, ``tensor`` -> ``tensor``; scales are kept in
  float32 (``scale_dtype``), so the format dequantizes ``(q - z) * s`` in float32 as we do: exact;
- ``fp8_e4m3``: ``float-quantized``, strategy ``block`` 128x128 with our fp32 block scales (exact).

Routed experts are stored per expert (``mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``, the layout
transformers merges into its 3-D banks on load). transformers decompresses every routed expert of a
checkpoint with *one* scheme and without zero points: the experts' scheme is the most common expert
spec, symmetric (asym intB -> sym int(B+1), exact). An expert whose weights that scheme holds exactly
(fewer bits, coarser groups) is re-expressed losslessly; any other (and a kept expert, when others are
quantized) is re-quantized, and reported with the error added. Routers, norms and other vectors,
simulated in the model, are written dense as the model computes with them, and so is a quantized
embedding (transformers 5.23 cannot load a compressed one); a norm folded into its readers is written as
ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CiuicError
from ..quant import QTensor, QuantSpec, dequantize, pack, quantize
from ..sites import Site
from .common import Applied, applied, dtype_name, dtype_of, error_stats, loaded_state

QUANT_METHOD = "compressed-tensors"
PACK = "pack-quantized"
NAIVE = "naive-quantized"
FLOAT = "float-quantized"
WIDEN = "widen"
ASYM_MODES = (WIDEN, NAIVE, PACK)
WIDER = {2: 3, 3: 4, 4: 5, 5: 6, 6: 8}  # asym intB -> the symmetric width that holds q - z


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CiuicError("compressed-tensors export needs the 'compressed-tensors' package: "
                         "pip install compressed-tensors") from e
    import compressed_tensors as ct

    return ct


# ------------------------------------------------------------------ spec -> scheme
def scheme_args(spec: QuantSpec) -> dict[str, Any]:
    """QuantizationArgs fields for a spec."""
    if spec.is_fp8:
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                "block_structure": [128, 128], "dynamic": False, "scale_dtype": torch.float32}
    args: dict[str, Any] = {"num_bits": spec.bits, "type": "int", "symmetric": spec.scheme == "sym",
                            "dynamic": False, "scale_dtype": torch.float32}
    if spec.group == "channel":
        args["strategy"] = "channel"
    elif spec.group == "tensor":
        args["strategy"] = "tensor"
    else:
        args.update(strategy="group", group_size=int(spec.group))
    return args


def spec_format(spec: QuantSpec, asym_format: str = NAIVE) -> str:
    if spec.is_fp8:
        return FLOAT
    if spec.scheme == "sym":
        return PACK
    return NAIVE if asym_format == WIDEN else asym_format


def widened(spec: QuantSpec) -> QuantSpec | None:
    """The symmetric spec that holds every weight of the asymmetric ``spec`` exactly (one bit wider)."""
    if spec.is_fp8 or spec.keep or spec.scheme != "asym" or spec.bits not in WIDER:
        return None
    return spec.replace(bits=WIDER[spec.bits], scheme="sym")


def represent(qt: QTensor, spec: QuantSpec) -> QTensor | None:
    """``qt`` re-expressed exactly in the symmetric integer ``spec``, or None where that spec cannot hold it.

    It can when each of its groups lies inside one of ``qt``'s groups (equal or finer, sharing the
    scale) and every ``q - z`` fits the symmetric range: then the codes are ``q - z + 2**(bits-1)`` and
    the scales ``qt``'s, and the dequantized weights are the same numbers.
    """
    if qt.spec.is_fp8 or spec.is_fp8 or spec.scheme != "sym":
        return None
    k = qt.k
    src_g = k if qt.spec.group in ("channel", "tensor") else int(qt.spec.group)
    if spec.group == "tensor":
        if qt.spec.group != "tensor":
            return None
        dst_g = k
    else:
        dst_g = k if spec.group == "channel" else int(spec.group)
        if src_g % dst_g or k % dst_g:
            return None
    s = qt.group_scales()                       # [N, Gs]
    z = qt.group_zeros().to(torch.int16)
    rep = src_g // dst_g
    x = qt.codes_unpacked().to(torch.int16) - torch.repeat_interleave(z, src_g, dim=-1)[..., :k]
    half = 1 << (spec.bits - 1)
    if int(x.min()) < -half or int(x.max()) > half - 1:
        return None
    codes = pack((x + half).to(torch.uint8), spec.bits)
    if spec.group == "tensor":
        scales = qt.scales
    else:
        scales = torch.repeat_interleave(s, rep, dim=-1).contiguous()
    return QTensor(spec, qt.shape, codes, scales, None, qt.dtype)


def _qparams(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our scales and zero points in compressed-tensors' shapes and conventions (signed zero points)."""
    spec = qt.spec
    if spec.is_fp8:
        return qt.scales.to(torch.float32), None
    if spec.group == "tensor":
        s = qt.scales.reshape(1).to(torch.float32)
        z = None if qt.zeros is None else qt.zeros.reshape(1)
    else:
        s = qt.scales.to(torch.float32)
        z = qt.zeros
    if z is not None:
        z = (z.to(torch.int16) - (1 << (spec.bits - 1))).to(torch.int8)
    return s, z


def compress_site(qt: QTensor, spec: QuantSpec | None = None, asym_format: str = NAIVE) -> dict[str, torch.Tensor]:
    """One quantized weight as the compressed-tensors compressor stores it (``weight_packed`` ...).

    The compressor quantizes our dequantized weight on our scales and zero points: ``(q - z) * s`` divided
    by ``s`` is ``q - z`` exactly, so the stored codes are ours.
    """
    _ct()
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    spec = spec or qt.spec
    fmt = spec_format(spec, asym_format)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**scheme_args(spec)), format=fmt)
    comp = BaseCompressor.get_value_from_registry(fmt)
    s, z = _qparams(qt)
    sd = {"weight": dequantize(qt, torch.float32), "weight_scale": s}
    if z is not None:
        sd["weight_zero_point"] = z
    return dict(comp.compress(sd, scheme))


def decompress_site(tensors: dict[str, torch.Tensor], spec: QuantSpec, asym_format: str = NAIVE) -> torch.Tensor:
    """The dense weight the compressed-tensors decompressor reads back (for checks)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    fmt = spec_format(spec, asym_format)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**scheme_args(spec)), format=fmt)
    comp = BaseCompressor.get_value_from_registry(fmt)
    return comp.decompress(dict(tensors), scheme)["weight"]


# ------------------------------------------------------------------ report
@dataclass
class Conversion:
    """A site written in another spec than the plan's: exactly (the same weights) or re-quantized."""

    site: str
    spec: str
    written_as: str
    exact: bool
    reason: str
    max_abs: float = 0.0
    rmse: float = 0.0
    rel_rmse: float = 0.0


@dataclass
class CompressedReport:
    path: str
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantized_sites: int = 0
    dense_sites: list[str] = field(default_factory=list)
    converted: list[Conversion] = field(default_factory=list)
    experts_scheme: str | None = None
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"format": "compressed-tensors", "path": self.path, "bytes": self.bytes,
                "config_groups": self.groups, "quantized_sites": self.quantized_sites,
                "experts_scheme": self.experts_scheme, "written_dense": self.dense_sites,
                "converted": [asdict(c) for c in self.converted if not c.exact],
                "rewritten_exactly": [asdict(c) for c in self.converted if c.exact]}


def _module_re(name: str) -> str:
    return "re:^" + re.escape(name) + "$"


def _expert_modules(site: Site) -> list[tuple[str, slice | None]]:
    """Per-expert module names (the checkpoint layout) of an expert site, with the rows each takes."""
    base = f"{site.module}.{site.expert}"
    if site.param == "gate_up_proj":
        half = site.n // 2
        return [(f"{base}.gate_proj", slice(0, half)), (f"{base}.up_proj", slice(half, 2 * half))]
    if site.param in ("gate_proj", "up_proj", "down_proj"):
        return [(f"{base}.{site.param}", None)]
    raise CiuicError(f"cannot write the expert bank parameter {site.param!r} of {site.module}")


def _row_slice(qt: QTensor, rows: slice | None) -> QTensor:
    if rows is None:
        return qt
    if qt.spec.is_fp8:
        raise CiuicError("an fp8 expert bank cannot be split into gate and up (its 128-row blocks straddle them)")
    n = len(range(*rows.indices(qt.n)))
    t = qt.spec.group == "tensor"
    return QTensor(qt.spec, (n, qt.k), qt.codes[rows], qt.scales if t else qt.scales[rows],
                   None if qt.zeros is None else (qt.zeros if t else qt.zeros[rows]), qt.dtype)


def experts_spec(src: Applied) -> QuantSpec | None:
    """The one spec every routed expert is written in: the most common expert spec, made symmetric
    (asym intB -> sym int(B+1), which holds the same weights; fp8 and asym int8 -> sym int8)."""
    specs = [src.plan.configs[s.name].spec for s in src.sites.values()
             if s.role == "expert" and not src.plan.configs[s.name].keep]
    if not specs:
        return None
    common = Counter(specs).most_common(1)[0][0]
    if common.is_fp8:
        return QuantSpec(8, "sym", "channel")
    if common.scheme == "asym":
        return widened(common) or common.replace(scheme="sym")
    return common


# ------------------------------------------------------------------ export
def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise CiuicError(f"{str(out)!r} exists and is not empty; accepted: a new or empty directory, or "
                             "overwrite=True (--overwrite)")
        if not out.is_dir() or not (out / "config.json").exists():
            raise CiuicError(f"{str(out)!r} holds something else; overwrite only replaces a checkpoint directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def export_compressed(model, path: str | os.PathLike, tokenizer=None, *, asym: str = WIDEN,
                      overwrite: bool = False) -> CompressedReport:
    """Write the model as it computes now as a compressed-tensors checkpoint in the directory ``path``.

    ``asym``: how asymmetric integer sites are written: ``widen`` (default; as symmetric one bit wider,
    the same weights, packed), ``naive-quantized`` or ``pack-quantized`` (see the module's notes).
    """
    if asym not in ASYM_MODES:
        raise CiuicError(f"asym {asym!r} is not supported; accepted: {', '.join(ASYM_MODES)}")
    _ct()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    src = applied(model, tokenizer)
    out = Path(path).expanduser()
    _prepare(out, overwrite)
    state = loaded_state(src.model)
    folded_norms = set(src.folds.values())
    rep = CompressedReport(str(out))
    exp_spec = experts_spec(src)
    rep.experts_scheme = exp_spec.label() if exp_spec else None
    sites_by_key: dict[str, list[Site]] = {}
    for s in src.sites.values():
        sites_by_key.setdefault(f"{s.module}.{s.param}", []).append(s)
    cfg = src.model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    untie = tied and any(src.sites[n].role in ("head", "embedding") for n in src.qweights)

    tensors: dict[str, torch.Tensor] = {}
    targets: dict[QuantSpec, list[str]] = {}
    for key, t in state.items():
        group = sites_by_key.get(key)
        if group and group[0].role == "expert":
            for s in sorted(group, key=lambda s: s.expert):
                _write_expert(src, s, exp_spec, tensors, rep)
            continue
        if group:
            s = group[0]
            qt = src.qweights.get(s.name)
            # embeddings stay dense: transformers 5.23 cannot initialize a compressed nn.Embedding
            if qt is not None and s.role in ("linear", "head") and len(s.shape) == 2:
                wide = widened(qt.spec) if asym == WIDEN else None
                q = represent(qt, wide) if wide is not None else None
                if q is not None:
                    rep.converted.append(Conversion(s.name, qt.spec.label(), wide.label(), True,
                                                    "asymmetric, written as the symmetric spec one bit wider"))
                else:
                    q = qt
                for k, v in compress_site(q, asym_format=asym).items():
                    tensors[f"{s.module}.{k}"] = v.contiguous()
                targets.setdefault(q.spec, []).append(s.module)
                rep.quantized_sites += 1
                continue
            w = src.site_weight(s.name)  # kept (folded where the plan folds), or a simulated router/norm
            if qt is not None:
                rep.dense_sites.append(s.name)
        else:
            w = t
        if key.rpartition(".")[0] in folded_norms:
            w = torch.ones_like(t)
        tensors[key] = w.to(t.dtype).contiguous()
    if tied and not untie:
        tensors.pop("lm_head.weight", None)

    # transformers reads the routed experts with the first group one of whose `re:` targets mentions
    # "experts" (shared_experts included): the experts' group goes first
    order = ([exp_spec] if exp_spec is not None else []) + [sp for sp in targets if sp != exp_spec]
    groups: dict[str, Any] = {}
    for spec in order:
        names = sorted(_module_re(m) for m in targets.get(spec, []))
        if spec == exp_spec:
            names.insert(0, EXPERTS_TARGET)
        groups[f"group_{len(groups)}"] = QuantizationScheme(
            targets=names, weights=QuantizationArgs(**scheme_args(spec)), format=spec_format(spec, asym))
    formats = sorted({g.format for g in groups.values()})
    qconfig = QuantizationConfig(config_groups=groups, quant_method=QUANT_METHOD,
                                 format=formats[0] if len(formats) == 1 else "mixed-precision",
                                 quantization_status="compressed", ignore=[])
    rep.groups = {name: {"targets": g.targets, "weights": g.weights.model_dump(mode="json"), "format": g.format}
                  for name, g in groups.items()}

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    config = cfg.to_dict()
    if groups:
        config["quantization_config"] = qconfig.model_dump(mode="json")
    config["dtype"] = dtype_name(model_dtype)
    if untie:
        config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    gen = getattr(src.model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(out))
        except Exception:  # noqa: BLE001 - a generation config that does not validate is not ours to fix
            pass
    if src.tokenizer is not None:
        src.tokenizer.save_pretrained(str(out))
    rep.bytes = sum(p.stat().st_size for p in out.iterdir())
    return rep


EXPERTS_TARGET = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"


def _write_expert(src: Applied, s: Site, exp_spec: QuantSpec | None, tensors: dict[str, torch.Tensor],
                  rep: CompressedReport) -> None:
    """One expert of a bank as per-expert modules in the experts' one scheme: re-expressed exactly where
    the scheme holds its weights, else re-quantized (and reported with the error added)."""
    spec = src.plan.configs[s.name].spec
    qt = src.qweights.get(s.name)
    ours = src.site_weight(s.name, torch.float32)
    for module, rows in _expert_modules(s):
        part = ours if rows is None else ours[rows]
        if exp_spec is None:  # no routed expert quantized: every expert dense
            tensors[f"{module}.weight"] = part.to(dtype_of(s.dtype)).contiguous()
            continue
        label = s.name if rows is None else f"{s.name} {module.rpartition('.')[2]}"
        q = None
        if qt is not None and not qt.spec.is_fp8:
            q = represent(_row_slice(qt, rows), exp_spec)
        if q is not None:
            if spec != exp_spec:
                rep.converted.append(Conversion(label, spec.label(), exp_spec.label(), True,
                                                "the experts' one scheme holds this expert's weights exactly"))
        else:
            q = quantize(part, exp_spec)
            err = error_stats(part, dequantize(q, torch.float32))
            why = ("kept, but transformers reads every routed expert in one scheme" if qt is None else
                   "transformers reads every routed expert in one scheme, and this one's weights do not fit it")
            rep.converted.append(Conversion(label, spec.label(), exp_spec.label(), False, why, **err))
        for k, v in compress_site(q, exp_spec).items():
            tensors[f"{module}.{k}"] = v.contiguous()
    if exp_spec is not None:
        rep.quantized_sites += 1
