"""Fusions and the MLA KV-cache form for DeepSeek-V3 blocks; each one a recipe switch, each exact.

- ``qkv_a``: ``q_a_proj`` and ``kv_a_proj_with_mqa`` read the same normalized hidden state: one matmul
  over their stacked rows, split after.
- ``gate_up``: gate and up of the dense MLP and of the shared experts: one matmul, then SiLU(gate) * up.
- ``norm_fold``: the input norm's weight folded into the MLA input projections, the post-attention norm's
  into what reads it (dense gate/up; in MoE blocks the router, the shared expert and every routed expert),
  before quantization, so quantized sites quantize the folded weight.
- ``mla_absorb``: ``kv_b_proj`` absorbed into the query and output paths for decode (DeepSeek's own
  inference trick): attention runs on the cached latent and nothing is expanded per step.
- ``moe_grouped``: the routed experts of one layer computed as one grouped call over the selected tokens.
- ``kv_cache``: ``latent`` caches the compressed latent and rotary key (576 values a token and layer in
  DeepSeek-V3), ``expanded`` caches full per-head keys and values.

Stacking quantized projections is exact because quantization is row-wise (groups run along K): the
stacked weight holds the very same codes, scales and zero points.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import QTensor, concat_rows, dequantize
from .modules import QuantLinear

FUSABLE_ATTENTION = ("DeepseekV3Attention",)


# ------------------------------------------------------------------ stacking projections
def stack_linears(mods: list[nn.Module]) -> tuple[nn.Module | None, str]:
    """One projection computing ``cat([m(x) for m in mods], -1)``, or (None, why not)."""
    if all(type(m) is nn.Linear for m in mods):
        if any(m.bias is not None for m in mods):
            return None, "a projection has a bias"
        w = torch.cat([m.weight.detach() for m in mods], dim=0)
        out = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        out.weight = nn.Parameter(w, requires_grad=False)
        return out, ""
    if all(isinstance(m, QuantLinear) for m in mods):
        specs = {m.qt.spec for m in mods}
        if len(specs) > 1:
            return None, "their quantization specs differ"
        if {m.layout for m in mods} != {mods[0].layout} or {m.kernel for m in mods} != {mods[0].kernel}:
            return None, "their layouts or kernels differ"
        if any(m.bias is not None for m in mods):
            return None, "a projection has a bias"
        try:
            qt = concat_rows([m.qt for m in mods])
        except ValueError as e:
            return None, str(e)
        return QuantLinear(qt, None, mods[0].layout, mods[0].kernel, site="+".join(m.site for m in mods)), ""
    return None, "one is quantized and the other is not"


class StackedLinear(nn.Module):
    """Runs one stacked projection and splits its output."""

    def __init__(self, fused: nn.Module, sizes: list[int]):
        super().__init__()
        self.fused = fused
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(self.fused(x), self.sizes, dim=-1)


# ------------------------------------------------------------------ MLP
class FusedGateUpMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up stacked into one matmul."""

    def __init__(self, mlp: nn.Module, gate_up: nn.Module):
        super().__init__()
        self.gate_up = gate_up
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.inter = mlp.gate_proj.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).split(self.inter, dim=-1)
        return self.down_proj(self.act_fn(g) * u)


# ------------------------------------------------------------------ norms and MoE
class FastRMSNorm(nn.Module):
    """RMSNorm as one fused op, computed in fp32 like transformers' (weight None once folded away)."""

    def __init__(self, weight: torch.Tensor | None, eps: float, dim: int):
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight.detach(), requires_grad=False)
        self.eps = eps
        self.dim = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.dim, self.weight, self.eps)
        y = F.rms_norm(x.float(), self.dim, None, self.eps).to(x.dtype)
        return y if self.weight is None else self.weight * y


def fast_norm(norm: nn.Module, folded: bool = False) -> FastRMSNorm:
    w = norm.weight
    return FastRMSNorm(None if folded else w, getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)), w.shape[0])


class FusedMoE(nn.Module):
    """A DeepSeek-V3 MoE layer with a lean router (one group) and the experts as one grouped call."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.experts, self.gate, self.shared_experts = moe.experts, moe.gate, moe.shared_experts
        g = moe.gate
        self.simple_router = getattr(g, "num_group", 1) == 1 and getattr(g, "topk_group", 1) == 1

    def _route(self, h: torch.Tensor):
        g = self.gate
        if not self.simple_router:
            _, w, idx = g(h)
            return w, idx
        scores = F.linear(h.float(), g.weight.float()).sigmoid()
        idx = torch.topk(scores + g.e_score_correction_bias, k=g.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if g.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * g.routed_scaling_factor, idx

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        w, idx = self._route(h)
        out = self.experts(h, idx, w).view(*shape)
        return out + self.shared_experts(hidden_states)


# ------------------------------------------------------------------ MLA
def _rope_fns(attn: nn.Module):
    mod = sys.modules[type(attn).__module__]
    if getattr(attn.config, "rope_interleave", False):
        return mod.apply_rotary_pos_emb_interleave
    return mod.apply_rotary_pos_emb


class FusedMLA(nn.Module):
    """DeepSeek-V3 multi-head latent attention with the fusions and cache form of a plan.

    Computes what transformers' ``DeepseekV3Attention`` computes (same projections, same rotary
    embedding, same scaling), on the very submodules it had (quantized or not).
    """

    def __init__(self, attn: nn.Module, qkv_a: nn.Module | None, absorb: bool, kv_cache: str):
        super().__init__()
        cfg = attn.config
        self.config = cfg
        self.layer_idx = attn.layer_idx
        self.num_heads = attn.num_heads
        self.q_lora_rank = attn.q_lora_rank
        self.kv_lora_rank = attn.kv_lora_rank
        self.dn, self.dr, self.dv = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
        self.scaling = attn.scaling
        self.q_proj = attn.q_proj
        self.q_a_proj, self.q_b_proj = attn.q_a_proj, attn.q_b_proj
        self.q_a_layernorm = fast_norm(attn.q_a_layernorm) if attn.q_a_layernorm is not None else None
        self.kv_a_proj_with_mqa, self.kv_a_layernorm = attn.kv_a_proj_with_mqa, fast_norm(attn.kv_a_layernorm)
        self.kv_b_proj, self.o_proj = attn.kv_b_proj, attn.o_proj
        self.qkv_a = qkv_a
        self.absorb = absorb
        self.kv_cache = kv_cache
        self._rope = _rope_fns(attn)
        self.is_causal = True
        if absorb:
            w = self.kv_b_proj.qt if isinstance(self.kv_b_proj, QuantLinear) else self.kv_b_proj.weight
            w = dequantize(w) if isinstance(w, QTensor) else w.detach()
            w = w.view(self.num_heads, self.dn + self.dv, self.kv_lora_rank)
            self.register_buffer("w_uk", w[:, : self.dn].contiguous(), persistent=False)  # [H, dn, r]
            self.register_buffer("w_uv", w[:, self.dn:].contiguous(), persistent=False)   # [H, dv, r]

    def _expand(self, c: torch.Tensor, k_rot: torch.Tensor):
        b, _, s, _ = c.shape
        kv = self.kv_b_proj(c).view(b, s, self.num_heads, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, self.num_heads, -1, -1)], dim=-1)
        return k, v

    @staticmethod
    def _mask(mask: torch.Tensor | None, q: int, s: int, device, dtype):
        if mask is not None:
            return mask[..., :s]
        if q == 1:
            return None
        i = torch.arange(q, device=device)[:, None] + (s - q)
        j = torch.arange(s, device=device)[None, :]
        return torch.where(j <= i, 0.0, float("-inf")).to(dtype)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        b, q_len, _ = hidden_states.shape
        if self.qkv_a is not None:
            q_lat, ckv = self.qkv_a(hidden_states)
        else:
            q_lat = self.q_a_proj(hidden_states) if self.q_lora_rank is not None else None
            ckv = self.kv_a_proj_with_mqa(hidden_states)
        q = self.q_b_proj(self.q_a_layernorm(q_lat)) if self.q_lora_rank is not None else self.q_proj(hidden_states)
        q = q.view(b, q_len, self.num_heads, self.dn + self.dr).transpose(1, 2)
        q_nope, q_rot = q.split([self.dn, self.dr], dim=-1)
        c, k_rot = ckv.split([self.kv_lora_rank, self.dr], dim=-1)
        c = self.kv_a_layernorm(c).view(b, 1, q_len, self.kv_lora_rank)
        k_rot = k_rot.view(b, 1, q_len, self.dr)
        cos, sin = position_embeddings
        q_rot, k_rot = self._rope(q_rot, k_rot, cos, sin)

        if self.kv_cache == "expanded":
            k, v = self._expand(c, k_rot)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
            qf = torch.cat([q_nope, q_rot], dim=-1)
            out = self._attend(qf, k, v, attention_mask)
        else:
            if past_key_values is not None:
                c, k_rot = past_key_values.update(c, k_rot, self.layer_idx)
            if self.absorb and q_len <= 4:
                out = self._attend_absorbed(q_nope, q_rot, c, k_rot, attention_mask)
            else:
                k, v = self._expand(c, k_rot)
                out = self._attend(torch.cat([q_nope, q_rot], dim=-1), k, v, attention_mask)
        out = out.transpose(1, 2).reshape(b, q_len, self.num_heads * self.dv)
        return self.o_proj(out), None

    def _softmax(self, scores, mask, q, s):
        m = self._mask(mask, q, s, scores.device, scores.dtype)
        if m is not None:
            scores = scores + m
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)

    def _attend(self, q, k, v, mask):
        s = k.shape[-2]
        p = self._softmax(torch.matmul(q, k.transpose(2, 3)) * self.scaling, mask, q.shape[-2], s)
        return torch.matmul(p, v)

    def _attend_absorbed(self, q_nope, q_rot, c, k_rot, mask):
        # scores = (W_uk^T q_nope) . c + q_rot . k_rot ; out = W_uv (P . c)
        q_lat = torch.einsum("bhqd,hdr->bhqr", q_nope, self.w_uk.to(q_nope.dtype))
        s = c.shape[-2]
        scores = torch.matmul(q_lat, c.transpose(2, 3)) + torch.matmul(q_rot, k_rot.transpose(2, 3))
        p = self._softmax(scores * self.scaling, mask, q_nope.shape[-2], s)
        o_lat = torch.matmul(p, c)
        return torch.einsum("bhqr,hvr->bhqv", o_lat, self.w_uv.to(o_lat.dtype))


# ------------------------------------------------------------------ cache bytes
def kv_cache_bytes_per_token(config: Any, form: str, dtype_bytes: int = 2) -> int:
    """Bytes one token adds to the KV cache over all layers, for an MLA config."""
    layers = config.num_hidden_layers
    if form == "latent":
        per = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        h = config.num_attention_heads
        per = h * (config.qk_nope_head_dim + config.qk_rope_head_dim) + h * config.v_head_dim
    return per * layers * dtype_bytes


def kv_cache_report(config: Any, dtype_bytes: int = 2) -> dict[str, Any]:
    lat = kv_cache_bytes_per_token(config, "latent", dtype_bytes)
    exp = kv_cache_bytes_per_token(config, "expanded", dtype_bytes)
    return {"latent_bytes_per_token": lat, "expanded_bytes_per_token": exp, "expanded_over_latent": exp / lat,
            "dtype_bytes": dtype_bytes}


@dataclass
class FusionReport:
    """What each switch did, layer by layer."""

    enabled: dict[str, bool] = field(default_factory=dict)
    applied: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def note(self, fusion: str, where: str, why: str = "") -> None:
        if why:
            self.skipped.setdefault(fusion, []).append(f"{where}: {why}")
        else:
            self.applied.setdefault(fusion, []).append(where)

    def to_dict(self) -> dict[str, Any]:
        return {name: {"enabled": on, "applied": len(self.applied.get(name, [])),
                       "skipped": self.skipped.get(name, [])} for name, on in self.enabled.items()}


def is_mla(attn: nn.Module) -> bool:
    return type(attn).__name__ in FUSABLE_ATTENTION and hasattr(attn, "kv_b_proj")


__all__ = ["FusedMLA", "FusedGateUpMLP", "FusedMoE", "FastRMSNorm", "fast_norm", "StackedLinear", "stack_linears", "kv_cache_bytes_per_token",
           "kv_cache_report", "FusionReport", "is_mla"]
