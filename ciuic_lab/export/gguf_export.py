"""GGUF: the optimized DeepSeek model as llama.cpp's ``deepseek2`` architecture, one type per tensor.

Written with the ``gguf`` package (``GGUFWriter`` for the file, ``TensorNameMap`` for the names,
``gguf.quants`` for every conversion); our own codes and scales go into GGUF blocks directly where the
block math is ours, so those tensors dequantize to exactly our weights.

Which GGUF type a spec becomes (blocks of 32 along a row; a group of g shares its scale, so any g that is a
multiple of 32, ``channel`` or ``tensor`` on rows of a multiple of 32 fits the blocks):

===========================  ========  =====================================================================
our spec                     GGUF      exact?
===========================  ========  =====================================================================
sym int2-4                   Q4_0      yes: ``(q - 8) * d`` with d our fp16 scale and q our code shifted to 8
sym int5                     Q5_0      yes
sym int6, int8               Q8_0      yes (int6 widened to 8 bits)
asym int2-4                  Q4_1      where every group's offset ``-z * s`` is an fp16 value (checked per
                                       tensor); else our codes and scale with the offset rounded to fp16
asym int5                    Q5_1      same as Q4_1
asym int6                    Q8_0      yes: ``q - z`` fits int8
asym int8                    Q8_0      where every ``q - z`` fits int8; else re-quantized by ``gguf``
fp8_e4m3                     Q8_0      no GGUF fp8 type: re-quantized by ``gguf`` from our dequantized weight
keep                         F32/F16/  yes (the model's dtype; vectors always F32)
                             BF16
===========================  ========  =====================================================================

Groups that do not cover whole blocks of 32 are re-quantized by ``gguf`` to the same row's type. Norm
weights, routers and other vectors are written as F32 (dequantized where the plan quantizes them: exact,
since the model computes with exactly that value). A norm whose scale the plan folds into its readers is
written as ones, its readers folded, as the model computes.

Expert banks are one 3-D tensor per kind (``ffn_gate_exps``, ``ffn_up_exps``, ``ffn_down_exps``), so a bank's
experts share one type: the type of the bank's most common spec. Experts with another spec are converted
to it and reported with the error added.

``kv_b="fused"`` (default) writes ``attn_kv_b`` whole (exact; llama.cpp then runs the expanded attention);
``kv_b="split"`` writes ``attn_k_b`` (transposed per head, so re-quantized along its new rows) and
``attn_v_b`` (exact row slices), the layout llama.cpp's own converter writes for its latent attention.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CiuicError
from ..models import family_of
from ..quant import QTensor, QuantSpec
from ..sites import Site
from .common import Applied, applied, error_stats, loaded_state

ARCH = "deepseek2"
BLOCK = 32
FAMILIES = ("deepseek_v3", "deepseek_v2")
KV_B_MODES = ("fused", "split")
PREFER = ("size", "exact")


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CiuicError("GGUF export needs the 'gguf' package: pip install gguf") from e
    return gguf


# ------------------------------------------------------------------ which type
def float_type(dtype: torch.dtype):
    g = _gguf().GGMLQuantizationType
    return {torch.float16: g.F16, torch.bfloat16: g.BF16}.get(dtype, g.F32)


def type_for(spec: QuantSpec, k: int, dtype: torch.dtype = torch.float32, prefer: str = "size"):
    """``(GGML type, why it cannot be exact or None)`` for a weight of row length ``k`` under ``spec``.

    ``prefer="size"`` picks the type of our own width; ``"exact"`` widens where only a wider type is
    exact (asymmetric int2-6 -> Q8_0; no block type at all -> F32). ``None`` means our codes fit the
    type's blocks; whether a tensor is exact is then settled by :func:`encode` (the Q4_1/Q5_1 offset and
    the asym int8 range depend on the values).
    """
    if prefer not in PREFER:
        raise CiuicError(f"prefer {prefer!r} is not supported; accepted: {', '.join(PREFER)}")
    g = _gguf().GGMLQuantizationType
    if spec.keep:
        return float_type(dtype), None
    exact = prefer == "exact"
    if spec.is_fp8:
        return (g.F32, None) if exact else (g.Q8_0, "GGUF has no fp8 e4m3 type")
    bits, sym = spec.bits, spec.scheme == "sym"
    if bits <= 4:
        t = g.Q4_0 if sym else (g.Q8_0 if exact else g.Q4_1)
    elif bits == 5:
        t = g.Q5_0 if sym else (g.Q8_0 if exact else g.Q5_1)
    else:
        t = g.Q8_0
    gsize = k if spec.group in ("channel", "tensor") else int(spec.group)
    if k % BLOCK:
        return g.F32, None  # no block type holds such rows: written dequantized, exactly
    if gsize % BLOCK:
        return (g.F32, None) if exact else (t, f"group {spec.group} does not cover whole blocks of {BLOCK}")
    return t, None


# ------------------------------------------------------------------ our blocks
def _block_fields(qt: QTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes ``[N, K]`` (int32), and per block of 32 the fp16 scale and the zero point ``[N, K/32]``."""
    q = qt.codes_unpacked().to(torch.int32).numpy()
    k = qt.k
    g = k if qt.spec.group in ("channel", "tensor") else int(qt.spec.group)
    idx = (np.arange(k // BLOCK) * BLOCK) // g
    s = qt.group_scales().numpy().astype(np.float16)
    z = qt.group_zeros().to(torch.int32).numpy()
    return q, s[:, idx], z[:, idx]


def _nibbles(x: np.ndarray) -> np.ndarray:
    """``[R, 32]`` values < 16 -> ``[R, 16]`` bytes: element j in the low nibble, j + 16 in the high one."""
    x = x.astype(np.uint8)
    return (x[:, :16] & 0x0F) | (x[:, 16:] << 4)


def _high_bits(x: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 values, as one little-endian uint32 (4 bytes)."""
    return np.packbits((x.astype(np.uint8) >> 4) & 1, axis=-1, bitorder="little")


def encode(qt: QTensor, qtype) -> tuple[np.ndarray, bool, str | None]:
    """Our 2-D QTensor as GGUF blocks of ``qtype``: ``(bytes [N, K/32 * type size], exact, why not)``.

    Writes our codes and scales as they are. ``exact`` is False where the type cannot hold them (the
    Q4_1/Q5_1 offset is not an fp16 value: it is rounded; ``q - z`` of asym int8 leaves int8: caller
    re-quantizes instead).
    """
    g = _gguf().GGMLQuantizationType
    q, d, z = _block_fields(qt)
    n, k = q.shape
    nb = k // BLOCK
    qb = q.reshape(n * nb, BLOCK)
    zb = np.repeat(z.reshape(n * nb, 1), BLOCK, axis=1)
    db = d.reshape(n * nb, 1)
    exact, why = True, None
    if qtype in (g.Q8_0, g.Q4_0, g.Q5_0):
        x = qb - zb
        lo, hi = {g.Q8_0: (-128, 127), g.Q4_0: (-8, 7), g.Q5_0: (-16, 15)}[qtype]
        if x.min() < lo or x.max() > hi:
            return np.empty(0, np.uint8), False, f"q - z leaves [{lo}, {hi}]"
        dbytes = db.astype(np.float16).view(np.uint8)
        if qtype == g.Q8_0:
            body = [dbytes, x.astype(np.int8).view(np.uint8)]
        elif qtype == g.Q4_0:
            body = [dbytes, _nibbles(x + 8)]
        else:
            u = x + 16
            body = [dbytes, _high_bits(u), _nibbles(u & 0x0F)]
    elif qtype in (g.Q4_1, g.Q5_1):
        top = 15 if qtype == g.Q4_1 else 31
        if qb.max() > top:
            return np.empty(0, np.uint8), False, f"codes above {top}"
        m = -(z.reshape(n * nb, 1).astype(np.float64) * db.astype(np.float64))
        m16 = m.astype(np.float16)
        if not np.array_equal(m16.astype(np.float64), m):
            bad = int((m16.astype(np.float64) != m).sum())
            exact, why = False, f"offset -z*s is not an fp16 value in {bad} of {n * nb} blocks (rounded)"
        dbytes = db.astype(np.float16).view(np.uint8)
        mbytes = m16.view(np.uint8)
        if qtype == g.Q4_1:
            body = [dbytes, mbytes, _nibbles(qb)]
        else:
            body = [dbytes, mbytes, _high_bits(qb), _nibbles(qb & 0x0F)]
    else:
        raise CiuicError(f"no block encoder for {qtype.name}")
    out = np.concatenate(body, axis=1).reshape(n, -1)
    return np.ascontiguousarray(out), exact, why


def gguf_quantize(w: torch.Tensor, qtype) -> np.ndarray:
    """A dense weight ``[..., K]`` in ``qtype``, by the ``gguf`` package (floats as their own dtype)."""
    gg = _gguf()
    g = gg.GGMLQuantizationType
    a = w.detach().to(torch.float32).cpu().numpy()
    if qtype == g.F32:
        return a
    if qtype == g.F16:
        return a.astype(np.float16)
    return gg.quants.quantize(a, qtype)  # BF16 and the block types


def gguf_dequantize(data: np.ndarray, qtype) -> np.ndarray:
    return _gguf().quants.dequantize(data, qtype)


# ------------------------------------------------------------------ names
def name_map(n_blocks: int):
    gg = _gguf()
    return gg.get_tensor_name_map(gg.MODEL_ARCH.DEEPSEEK2, n_blocks)


def tensor_name(tmap, hf_name: str) -> str:
    """The GGUF name of a state-dict key (``model.layers.3.self_attn.kv_b_proj.weight`` ->
    ``blk.3.attn_kv_b.weight``; the bank ``model.layers.3.mlp.experts.down_proj`` ->
    ``blk.3.ffn_down_exps.weight``)."""
    if hf_name.endswith(".e_score_correction_bias"):  # a buffer whose name carries its suffix
        name = tmap.get_name(hf_name[: -len("_bias")])
        if name:
            return name + ".bias"
    elif hf_name.endswith((".weight", ".bias")):
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name:
            return name
    else:  # a parameter named for itself (the 3-D expert banks)
        name = tmap.get_name(hf_name)
        if name:
            return name + ".weight"
    raise CiuicError(f"no GGUF name for {hf_name!r} in llama.cpp's {ARCH} architecture")


# ------------------------------------------------------------------ report
@dataclass
class Placement:
    """Where one site went and how faithfully."""

    site: str
    tensor: str
    spec: str
    type: str
    exact: bool
    natural_type: str = ""       # the type the site's spec maps to on its own
    widened: bool = False        # stored in more bits than the spec has
    reason: str | None = None
    max_abs: float = 0.0
    rmse: float = 0.0
    rel_rmse: float = 0.0

    def set_error(self, err: dict[str, float]) -> None:
        self.max_abs, self.rmse, self.rel_rmse = err["max_abs"], err["rmse"], err["rel_rmse"]


@dataclass
class GGUFReport:
    path: str
    arch: str
    kv_b: str
    tensors: dict[str, str] = field(default_factory=dict)           # GGUF name -> type
    placements: list[Placement] = field(default_factory=list)
    tokenizer: str = ""
    bytes: int = 0
    prefer: str = "size"

    @property
    def converted(self) -> list[Placement]:
        """Sites not written exactly, or written in another type than their spec's own."""
        return [p for p in self.placements if not p.exact or (p.natural_type and p.type != p.natural_type)]

    def to_dict(self) -> dict[str, Any]:
        types = Counter(self.tensors.values())
        return {
            "format": "gguf", "path": self.path, "arch": self.arch, "kv_b": self.kv_b, "prefer": self.prefer,
            "bytes": self.bytes,
            "tensor_types": dict(sorted(types.items())), "tensors": self.tensors,
            "sites": len({p.site for p in self.placements}),
            "exact_sites": len({p.site for p in self.placements} - {p.site for p in self.placements if not p.exact}),
            "converted": [asdict(p) for p in self.converted],
            "widened": [{"site": p.site, "spec": p.spec, "type": p.type} for p in self.placements if p.widened],
            "tokenizer": self.tokenizer,
        }


_TYPE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}


def _widened(spec: QuantSpec, tname: str) -> bool:
    return not spec.keep and not spec.is_fp8 and _TYPE_BITS.get(tname, 16) > spec.bits


# ------------------------------------------------------------------ per tensor
class _Writer:
    def __init__(self, src: Applied, kv_b: str, prefer: str = "size"):
        self.src = src
        self.prefer = prefer
        self.gg = _gguf()
        self.g = self.gg.GGMLQuantizationType
        self.kv_b = kv_b
        cfg = src.model.config
        self.tmap = name_map(cfg.num_hidden_layers)
        self.out: list[tuple[str, np.ndarray, Any]] = []
        self.bank_tensors: set[str] = set()
        self.blocks = {self.g.Q4_0, self.g.Q4_1, self.g.Q5_0, self.g.Q5_1, self.g.Q8_0}
        self.placements: list[Placement] = []
        self.state = loaded_state(src.model)
        self.dtype = next((t.dtype for t in self.state.values() if t.is_floating_point()), torch.float32)
        self.folded_norms = set(src.folds.values())

    def site_in(self, site: Site, qtype, tensor: str, rows: slice | None = None):
        """``site`` (rows ``rows`` of it) as ``qtype``: our own blocks where they fit, else converted by
        ``gguf`` from the weight the model computes with. Returns ``(data, Placement)``."""
        qt = self.src.qweights.get(site.name)
        spec = self.src.plan.configs[site.name].spec
        ours = self.src.site_weight(site.name, torch.float32)
        if rows is not None:
            ours = ours[rows]
            qt = _rows(qt, rows) if qt is not None else None
        natural, why = type_for(spec, site.k, self.dtype, self.prefer)
        pl = Placement(site.name, tensor, spec.label(), qtype.name, True, natural.name, _widened(spec, qtype.name))
        if qt is not None and natural == qtype and why is None and not qt.spec.is_fp8 and qtype in self.blocks:
            data, exact, why = encode(qt, qtype)
            if data.size:
                if not exact:
                    pl.exact, pl.reason = False, why
                    pl.set_error(self._err(ours, data, qtype))
                return data, pl
            if self.prefer == "exact" and rows is None and tensor not in self.bank_tensors:
                qtype = self.g.F32  # our codes do not fit the type: the dequantized weight is exact
                pl.type, pl.widened = "F32", True
        data = gguf_quantize(ours, qtype)
        err = self._err(ours, data, qtype)
        if err["max_abs"] != 0.0:
            pl.exact = False
            pl.reason = why if natural == qtype else f"the bank is {qtype.name} (its most common spec)"
            pl.set_error(err)
        elif natural != qtype:
            pl.reason = f"the bank is {qtype.name} (its most common spec)"
        return data, pl

    def _err(self, ours: torch.Tensor, data: np.ndarray, qtype) -> dict[str, float]:
        back = torch.from_numpy(np.asarray(gguf_dequantize(data, qtype), dtype=np.float32)).reshape(ours.shape)
        return error_stats(ours.to(torch.float32), back)

    def add(self, name: str, data: np.ndarray, qtype) -> None:
        self.out.append((name, data, qtype))

    # ---------------------------------------------------------- the model
    def build(self) -> None:
        src = self.src
        sites_by_key: dict[str, list[Site]] = {}
        for s in src.sites.values():
            sites_by_key.setdefault(f"{s.module}.{s.param}", []).append(s)
        cfg = src.model.config
        # a tied head is left out only while it still equals the embedding (neither side quantized)
        self.tied_alike = bool(getattr(cfg, "tie_word_embeddings", False)) and not any(
            src.sites[n].role in ("head", "embedding") for n in src.qweights)
        done: set[str] = set()
        for key, t in self.state.items():
            if key in done:
                continue
            if key == "lm_head.weight" and self.tied_alike:
                continue  # llama.cpp reads the output from token_embd when the file has no output.weight
            group = sites_by_key.get(key)
            if group and group[0].role == "expert":
                self._bank(key, group)
            elif key.endswith("kv_b_proj.weight") and self.kv_b == "split" and group:
                self._kv_b_split(key, group[0])
            elif group:
                self._site(key, group[0])
            else:
                self._plain(key, t)
            done.add(key)

    def _plain(self, key: str, t: torch.Tensor) -> None:
        name = tensor_name(self.tmap, key)
        path = key.rpartition(".")[0]
        w = t.detach().to(torch.float32)
        if path in self.folded_norms:
            w = torch.ones_like(w)
        qtype = self.g.F32 if t.dim() <= 1 else float_type(t.dtype)
        self.add(name, gguf_quantize(w, qtype), qtype)

    def _site(self, key: str, site: Site) -> None:
        name = tensor_name(self.tmap, key)
        spec = self.src.plan.configs[site.name].spec
        if site.role in ("norm", "router") or len(site.shape) < 2:
            w = self.src.site_weight(site.name, torch.float32)
            if site.module in self.folded_norms:
                w = torch.ones_like(w)
            self.add(name, w.numpy(), self.g.F32)
            self.placements.append(Placement(site.name, name, spec.label(), "F32", True, "F32"))
            return
        qtype, _ = type_for(spec, site.k, self.dtype, self.prefer)
        data, pl = self.site_in(site, qtype, name)
        qtype = getattr(self.g, pl.type)
        self.add(name, data, qtype)
        self.placements.append(pl)

    def _bank(self, key: str, experts: list[Site]) -> None:
        experts = sorted(experts, key=lambda s: s.expert)
        specs = [self.src.plan.configs[s.name].spec for s in experts]
        common = Counter(specs).most_common(1)[0][0]
        qtype, _ = type_for(common, experts[0].k, self.dtype, self.prefer)
        if key.endswith("gate_up_proj"):
            half = experts[0].n // 2
            parts = [(key[: -len("gate_up_proj")] + "gate_proj", slice(0, half)),
                     (key[: -len("gate_up_proj")] + "up_proj", slice(half, 2 * half))]
        else:
            parts = [(key, None)]
        for hf, rows in parts:
            name = tensor_name(self.tmap, hf)
            self.bank_tensors.add(name)
            blocks = []
            for s in experts:
                data, pl = self.site_in(s, qtype, name, rows)
                blocks.append(data)
                self.placements.append(pl)
            self.add(name, np.ascontiguousarray(np.stack(blocks)), qtype)

    def _kv_b_split(self, key: str, site: Site) -> None:
        cfg = self.src.model.config
        nh, nope, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        base = tensor_name(self.tmap, key).replace("attn_kv_b", "{}")
        spec = self.src.plan.configs[site.name].spec
        qtype, _ = type_for(spec, site.k, self.dtype, self.prefer)
        # v_b [nh, v, kv_lora]: row slices of kv_b, exact where kv_b's type is
        v_name = base.format("attn_v_b")
        self.bank_tensors.add(v_name)
        vb = []
        for h in range(nh):
            r0 = h * (nope + vd) + nope
            data, pl = self.site_in(site, qtype, v_name, slice(r0, r0 + vd))
            vb.append(data)
            self.placements.append(pl)
        self.add(v_name, np.ascontiguousarray(np.stack(vb)), qtype)
        # k_b [nh, kv_lora, nope]: each head's key rows transposed, so its blocks run along other rows
        k_name = base.format("attn_k_b")
        w = self.src.site_weight(site.name, torch.float32)
        kb = w.reshape(nh, nope + vd, -1)[:, :nope, :].transpose(1, 2).contiguous()
        ktype = self.g.F32 if self.prefer == "exact" else type_for(spec, nope, self.dtype, self.prefer)[0]
        data = gguf_quantize(kb, ktype)
        pl = Placement(site.name, k_name, spec.label(), ktype.name, True, ktype.name, _widened(spec, ktype.name))
        err = self._err(kb, data, ktype)
        if err["max_abs"] != 0.0:
            pl.exact, pl.reason = False, "attn_k_b holds kv_b's key rows transposed per head: re-quantized"
            pl.set_error(err)
        self.placements.append(pl)
        self.add(k_name, data, ktype)


def _rows(qt: QTensor, rows: slice) -> QTensor | None:
    """Rows of a 2-D QTensor, exactly (codes, scales and zero points are per row; a per-tensor scale
    serves every row). None for fp8, whose 128-row blocks do not slice."""
    if qt.spec.is_fp8:
        return None
    n = len(range(*rows.indices(qt.n)))
    per_tensor = qt.spec.group == "tensor"
    return QTensor(qt.spec, (n, qt.k), qt.codes[rows], qt.scales if per_tensor else qt.scales[rows],
                   None if qt.zeros is None else (qt.zeros if per_tensor else qt.zeros[rows]), qt.dtype)


# ------------------------------------------------------------------ metadata
def _metadata(w, src: Applied, kv_b: str) -> None:
    gg = _gguf()
    cfg = src.model.config
    w.add_name(str(src.name or getattr(cfg, "_name_or_path", "") or "model"))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_head_count(int(cfg.num_attention_heads))
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_expert_used_count(int(cfg.num_experts_per_tok))
    w.add_leading_dense_block_count(int(cfg.first_k_dense_replace))
    w.add_vocab_size(int(cfg.vocab_size))
    if getattr(cfg, "q_lora_rank", None):
        w.add_q_lora_rank(int(cfg.q_lora_rank))
    w.add_kv_lora_rank(int(cfg.kv_lora_rank))
    if kv_b == "split":  # latent attention: MQA over the latent, heads expanded after
        w.add_head_count_kv(1)
        w.add_key_length(int(cfg.kv_lora_rank + cfg.qk_rope_head_dim))
        w.add_value_length(int(cfg.kv_lora_rank))
        w.add_key_length_mla(int(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim))
        w.add_value_length_mla(int(cfg.v_head_dim))
    else:
        w.add_head_count_kv(int(cfg.num_key_value_heads or cfg.num_attention_heads))
        w.add_key_length(int(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim))
        w.add_value_length(int(cfg.v_head_dim))
    w.add_expert_feed_forward_length(int(cfg.moe_intermediate_size))
    w.add_expert_count(int(cfg.n_routed_experts))
    w.add_expert_shared_count(int(cfg.n_shared_experts or 0))
    w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
    if getattr(cfg, "norm_topk_prob", False):
        w.add_expert_weights_norm(True)
    if family_of(cfg) == "deepseek_v3":
        w.add_expert_gating_func(gg.ExpertGatingFuncType.SIGMOID)
    if getattr(cfg, "n_group", None):
        w.add_expert_group_count(int(cfg.n_group))
        w.add_expert_group_used_count(int(cfg.topk_group))
    w.add_rope_dimension_count(int(cfg.qk_rope_head_dim))
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gg.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings", cfg.max_position_embeddings)))
        if rope.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))
    w.add_quantization_version(gg.GGML_QUANT_VERSION)
    w.add_string("ciuic_lab.recipe", src.plan.recipe.to_json(indent=None))


def _tokenizer(w, tokenizer, vocab_size: int | None = None) -> str:
    """Byte-level BPE vocabularies as llama.cpp's ``gpt2`` tokenizer; anything else is left out (noted)."""
    if tokenizer is None:
        return "not written: no tokenizer"
    gg = _gguf()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tj = Path(tmp) / "tokenizer.json"
        if not tj.exists():
            return "not written: no tokenizer.json (only byte-level BPE tokenizers are exported)"
        import json

        data = json.loads(tj.read_text())
        model = data.get("model", {})
        pre = json.dumps(data.get("pre_tokenizer") or {})
        if model.get("type") != "BPE" or "ByteLevel" not in pre:
            return f"not written: a {model.get('type')} tokenizer (only byte-level BPE is exported)"
        vocab: dict[str, int] = dict(model["vocab"])
        special = {}
        for t in data.get("added_tokens", []):
            vocab[t["content"]] = t["id"]
            if t.get("special"):
                special[t["id"]] = t["content"]
        size = max(max(vocab.values()) + 1, int(vocab_size or 0))
        by_id = {i: tok for tok, i in vocab.items()}
        tokens, types = [], []
        for i in range(size):
            if i not in by_id:
                tokens.append(f"[PAD{i}]")
                types.append(gg.TokenType.UNUSED)
            else:
                tokens.append(by_id[i])
                types.append(gg.TokenType.CONTROL if i in special else gg.TokenType.NORMAL)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        sv = gg.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens))
        sv.add_to_gguf(w)
    return f"gpt2 (byte-level BPE), {len(tokens)} tokens"


# ------------------------------------------------------------------ entry point
def export_gguf(model, path: str | os.PathLike, tokenizer=None, *, kv_b: str = "fused", prefer: str = "size",
                overwrite: bool = False) -> GGUFReport:
    """Write the model as it computes now (plan in force) to the GGUF file ``path``.

    ``kv_b``: ``fused`` (``attn_kv_b``, exact) or ``split`` (``attn_k_b`` re-quantized, ``attn_v_b`` exact).
    ``prefer``: ``size`` (each site in the type of its own width) or ``exact`` (wider types where only
    those hold our weights exactly). Returns a :class:`GGUFReport` naming every converted site.
    """
    if prefer not in PREFER:
        raise CiuicError(f"prefer {prefer!r} is not supported; accepted: {', '.join(PREFER)}")
    if kv_b not in KV_B_MODES:
        raise CiuicError(f"kv_b {kv_b!r} is not supported; accepted: {', '.join(KV_B_MODES)}")
    src = applied(model, tokenizer)
    fam = family_of(src.model)
    if fam not in FAMILIES:
        raise CiuicError(f"GGUF export writes llama.cpp's {ARCH} architecture; this model's family is {fam}; "
                         f"accepted: {', '.join(FAMILIES)}")
    out = Path(path).expanduser()
    if out.is_dir():
        raise CiuicError(f"{str(out)!r} is a directory; accepted: a file path ending in .gguf")
    if out.exists() and not overwrite:
        raise CiuicError(f"{str(out)!r} exists; accepted: a new path, or overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    gg = _gguf()
    wr = _Writer(src, kv_b, prefer)
    wr.build()
    writer = gg.GGUFWriter(str(out), ARCH)
    try:
        _metadata(writer, src, kv_b)
        tok = _tokenizer(writer, src.tokenizer, getattr(src.model.config, "vocab_size", None))
        types = {}
        for name, data, qtype in wr.out:
            writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
            types[name] = qtype.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return GGUFReport(str(out), ARCH, kv_b, types, wr.placements, tok, out.stat().st_size, prefer)


def read_gguf(path: str | os.PathLike) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a GGUF file, dequantized by ``gguf``: ``{name: (type, float32 array)}``."""
    gg = _gguf()
    reader = gg.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        arr = gg.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, np.asarray(arr, dtype=np.float32))
    return out
