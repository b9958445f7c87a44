"""Fusions and the MLA KV-cache form for DeepSeek-V3 blocks; each one a recipe switch, each exact.

- ``qkv_a``: ``q_a_proj`` and ``kv_a_proj_with_mqa`` read the same normalized hidden state: one matmul
  over their stacked rows, split after.
- ``gate_up``: gate and up of the dense MLP and of the shared experts: one matmul, then SiLU(gate) * up.
- ``norm_fold``: the input norm's weight folded into the MLA input projections, the post-attention norm's
  into what reads it (dense gate/up; in MoE blocks the router, the shared expert and every routed expert),
  before quantization, so quantized sites quantize the folded weight.
- ``mla_absorb``: ``kv_b_proj`` absorbed into the query and output paths for decode (DeepSeek's own
  inference trick): attention runs on the cached latent and nothing is expanded per step. Where it is no
  larger, ``W_uk`` is composed with a dense ``q_b_proj`` at apply time (one query product per step); the
  heads attend to the shared latent as rows of one batched product, and the rotary embedding of query and
  key is one product with a signed permutation (bit for bit transformers' rotary).
- ``moe_grouped``: the routed experts of one layer computed as one grouped call over the selected tokens.
- ``kv_cache``: ``latent`` caches the compressed latent and rotary key (576 values a token and layer in
  DeepSeek-V3), ``expanded`` caches full per-head keys and values.

Stacking quantized projections is exact because quantization is row-wise (groups run along K): the
stacked weight holds the very same codes, scales and zero points. Dense weights that a fusion creates
(stacked, composed) are stored K-major on the CPU (:func:`gemv_layout`), the layout a one-row product reads
fastest; the loaded weights themselves are never copied or changed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import QTensor, concat_rows, dequantize
from ..kernels import REGISTRY
from .modules import QuantExperts, QuantLinear, is_silu

FUSABLE_ATTENTION = ("DeepseekV3Attention",)


def _site_names(module: nn.Module) -> list[str]:
    """The sites whose quantized weights ``module`` holds (a stacked projection's parts one by one)."""
    return [part for m in module.modules() if isinstance(m, QuantLinear) and m.site for part in m.site.split("+")]


# ------------------------------------------------------------------ stacking projections
def stack_linears(mods: list[nn.Module]) -> tuple[nn.Module | None, str]:
    """One projection computing ``cat([m(x) for m in mods], -1)``, or (None, why not)."""
    if all(type(m) is nn.Linear for m in mods):
        if any(m.bias is not None for m in mods):
            return None, "a projection has a bias"
        w = torch.cat([m.weight.detach() for m in mods], dim=0)
        out = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
        out.weight = nn.Parameter(gemv_layout(w), requires_grad=False)
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


def gemv_layout(w: torch.Tensor) -> torch.Tensor:
    """The same ``[N, K]`` weight, stored K-major on the CPU (a transposed view of a ``[K, N]`` tensor).

    A decode step multiplies one row by each weight; on the CPU that product reads a K-major weight
    row by row along N (vectorized, streamed) rather than as N short dot products, which is markedly
    faster for the small K of these projections. Only for weights a fusion creates (stacked or composed),
    so nothing is stored twice; values are identical, only the summation order of the product changes.
    """
    if w.device.type != "cpu" or w.dim() < 2:
        return w
    return w.transpose(-1, -2).contiguous().transpose(-1, -2)


class StackedLinear(nn.Module):
    """Runs one stacked projection and splits its output."""

    def __init__(self, fused: nn.Module, sizes: list[int]):
        super().__init__()
        self.fused = fused
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.fused(x).split_with_sizes(self.sizes, -1)


# ------------------------------------------------------------------ MLP
class FusedGateUpMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up stacked into one matmul."""

    def __init__(self, mlp: nn.Module, gate_up: nn.Module):
        super().__init__()
        self.gate_up = gate_up
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.inter = mlp.gate_proj.out_features
        self._silu = is_silu(mlp.act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).split_with_sizes([self.inter, self.inter], -1)
        h = F.silu(g) * u if self._silu else self.act_fn(g) * u
        return self.down_proj(h)


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
        y = rms_unscaled(x, self.dim, self.eps)
        return y if self.weight is None else self.weight * y


def rms_unscaled(x: torch.Tensor, dim: tuple[int], eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps)`` computed in fp32 and rounded once to ``x``'s dtype.

    On a GPU the fused kernel reads bf16/fp16 and accumulates in fp32 itself: one launch instead of
    three (up-cast, norm, down-cast), which at decode is 48 launches per step of a 6-layer model.
    """
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return F.rms_norm(x, dim, None, eps)
    return F.rms_norm(x.float(), dim, None, eps).to(x.dtype)


def fast_norm(norm: nn.Module, folded: bool = False) -> FastRMSNorm:
    w = norm.weight
    return FastRMSNorm(None if folded else w, getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)), w.shape[0])


class FusedMoE(nn.Module):
    """A DeepSeek-V3 MoE layer with a lean router (one group) and the experts as one grouped call."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self._pair_ran = False  # the last forward took the shared expert into the grouped launch (ran_for)
        self.experts, self.gate, self.shared_experts = moe.experts, moe.gate, moe.shared_experts
        g = moe.gate
        self.simple_router = getattr(g, "num_group", 1) == 1 and getattr(g, "topk_group", 1) == 1
        self.top_k, self.norm_topk_prob = g.top_k, bool(g.norm_topk_prob)
        self.scale = float(g.routed_scaling_factor)
        # the router scores in fp32 as transformers computes them; its weight up-cast once, not every step
        # (stage 2 is rebuilt on every apply, so this copy follows any change to the router)
        w = g.weight.detach()
        self.register_buffer("_router_w", w if w.dtype == torch.float32 else w.float(), persistent=False)
        self.register_buffer("_router_b", g.e_score_correction_bias.detach().float(), persistent=False)

    def _route(self, h: torch.Tensor):
        g = self.gate
        if not self.simple_router:
            _, w, idx = g(h)
            return w, idx
        scores = self._logits(h).sigmoid()
        idx = torch.topk(scores + self._router_b, k=self.top_k, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return (w if self.scale == 1.0 else w * self.scale), idx  # (x * 1.0 is x)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        pair = self._shared_pair()
        idx, w = self._select(h, shared=pair is not None)
        self._pair_ran = False
        if pair is not None:
            # the shared expert as one more selected expert of weight 1, in the same grouped launch
            out = self.experts._grouped(h, idx, w, extra=pair)
            if out is not NotImplemented:
                self._pair_ran = True
                return out.view(shape)
            idx, w = idx[:, :-1], w[:, :-1]  # the backend declined: the routed experts, then the shared one
        return self.experts(h, idx, w).view(shape) + self.shared_experts(hidden_states)

    def ran_for(self) -> dict[str, str]:
        """After a forward that took the shared expert into the grouped launch: its sites -> the experts'
        backend (its own modules did not run)."""
        backend = getattr(self.experts, "last_backend", None)
        if not self._pair_ran or backend is None:
            return {}
        return {name: backend for name in _site_names(self.shared_experts)}

    def _select(self, h: torch.Tensor, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts and weights ``[T, top_k]``; with ``shared``, the shared expert's column
        (index ``num_experts``, weight 1) appended. One launch on the backend's router where it has one."""
        route = self._route_kernel(h)
        if route is not None:
            return route(self._logits(h), self._router_b, self.top_k, self.norm_topk_prob, self.scale,
                         extra=self.experts.num_experts if shared else -1)
        w, idx = self._route(h)
        if not shared:
            return idx, w
        col_i, col_w = self._shared_columns(h.shape[0], idx.device)
        return torch.cat([idx, col_i], 1), torch.cat([w, col_w], 1)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h if h.dtype == torch.float32 else h.float(), self._router_w)

    def _route_kernel(self, h: torch.Tensor):
        """The backend's one-launch router (the CUDA one) for quantized experts on a GPU, or None."""
        ex = self.experts
        if not (self.simple_router and h.is_cuda and isinstance(ex, QuantExperts) and not ex._any_dense):
            return None
        backend = REGISTRY.pick(h.device.type, ex.gate_up_q[0].spec, ex.layout, h.shape[0], ex.kernel)
        return getattr(backend, "route", None)

    _shared: tuple | None = None    # (shared_experts module seen, its (gate_up, down) QTensors or None)
    _columns: tuple | None = None   # (tokens, device, expert-index column, weight column)

    def _shared_pair(self) -> tuple[QTensor, QTensor] | None:
        """The shared expert's ``(gate_up, down)`` when it can ride in the routed experts' grouped launch:
        quantized like them, same shapes, SiLU, no biases. Looked up on first use, because the gate_up
        fusion may replace the shared expert after this module is built."""
        se, ex = self.shared_experts, self.experts
        if self._shared is not None and self._shared[0] is se:
            return self._shared[1]
        pair = None
        if isinstance(ex, QuantExperts) and not ex._any_dense and ex._silu and is_silu(getattr(se, "act_fn", None)):
            gu = None
            if isinstance(se, FusedGateUpMLP) and isinstance(se.gate_up, QuantLinear) and se.gate_up.bias is None:
                gu = se.gate_up.qt
            elif all(isinstance(getattr(se, a, None), QuantLinear) and getattr(se, a).bias is None
                     for a in ("gate_proj", "up_proj")):
                try:
                    gu = concat_rows([se.gate_proj.qt, se.up_proj.qt])
                except ValueError:
                    gu = None
            dn = se.down_proj
            g0, d0 = ex.gate_up_q[0], ex.down_q[0]
            if gu is not None and isinstance(dn, QuantLinear) and dn.bias is None and gu.spec == g0.spec \
                    and dn.qt.spec == d0.spec and gu.shape == g0.shape and dn.qt.shape == d0.shape:
                pair = (gu, dn.qt)
        self._shared = (se, pair)
        return pair

    def _shared_columns(self, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Constant columns appended to the routing: the shared expert's index (one past the routed ones)
        and its weight 1; kept, so a decode step adds one concatenation each and no fills."""
        c = self._columns
        if c is None or c[0] != tokens or c[1] != device:
            e = self.experts.num_experts
            c = (tokens, device, torch.full((tokens, 1), e, dtype=torch.int64, device=device),
                 torch.ones((tokens, 1), dtype=torch.float32, device=device))
            self._columns = c
        return c[2], c[3]


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
        self._absorbed_ran = False  # the last forward took the absorbed path (ran_for)
        self._rope = _rope_fns(attn)
        self.is_causal = True
        self._interleave = bool(getattr(cfg, "rope_interleave", False))
        if absorb:
            w = self.kv_b_proj.qt if isinstance(self.kv_b_proj, QuantLinear) else self.kv_b_proj.weight
            w = dequantize(w) if isinstance(w, QTensor) else w.detach()
            w = w.view(self.num_heads, self.dn + self.dv, self.kv_lora_rank)
            w_q = self._absorbed_query_weight(w[:, : self.dn])
            self.register_buffer("w_q", w_q, persistent=False)  # [H*(r+dr), q_lora_rank] or None
            self.register_buffer("w_uk", None if w_q is not None else w[:, : self.dn].contiguous(),
                                 persistent=False)                                 # [H, dn, r]
            self.register_buffer("w_uv", gemv_layout(w[:, self.dn:]), persistent=False)   # [H, dv, r]
            # the rotary embedding as one product with a fixed signed permutation (see rope_matrix)
            self.register_buffer("rope_mat", rope_matrix(self.dr, self._interleave, w.dtype).to(w.device), persistent=False)

    def ran_for(self) -> dict[str, str]:
        """After an absorbed (decode) forward: ``kv_b_proj`` (and ``q_b_proj`` where the query is
        composed) ran as torch products on the absorbed weights, not through their own modules."""
        if not self._absorbed_ran:
            return {}
        mods = [self.kv_b_proj] + ([self.q_b_proj] if self.w_q is not None else [])
        return {name: "torch" for m in mods if m is not None for name in _site_names(m)}

    def _absorbed_query_weight(self, w_uk: torch.Tensor) -> torch.Tensor | None:
        """``W_uk^T`` composed with the no-rope rows of ``q_b_proj`` (and the rope rows after them), with
        ``q_a_layernorm``'s scale folded in: one projection from the normalized query latent straight to the
        absorbed query ``[H*r | H*dr]``, made once here in float64 and rounded once.

        Only where it is no larger than the two products it replaces (so decode reads no more bytes) and
        ``q_b_proj`` is a dense, bias-free ``nn.Linear``; a quantized one keeps its quantized product.
        """
        qb, qn = self.q_b_proj, self.q_a_layernorm
        if self.q_lora_rank is None or type(qb) is not nn.Linear or qb.bias is not None or type(qn) is not FastRMSNorm:
            return None
        H, dn, dr, r, k = self.num_heads, self.dn, self.dr, self.kv_lora_rank, self.q_lora_rank
        if H * (r + dr) * k > H * (dn + dr) * k + H * dn * r:
            return None
        wq = qb.weight.detach().double().view(H, dn + dr, k)
        w_lat = torch.matmul(w_uk.double().transpose(1, 2), wq[:, :dn])  # [H, r, k]
        w = torch.cat([w_lat.reshape(H * r, k), wq[:, dn:].reshape(H * dr, k)])
        if qn.weight is not None:
            w = w * qn.weight.detach().double()
        return gemv_layout(w.to(qb.weight.dtype))

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
        if past_key_values is None:  # transformers >= 5.24 passes the cache as `cache`
            past_key_values = kwargs.get("cache")
        b, q_len, _ = hidden_states.shape
        self._absorbed_ran = self.absorb and q_len <= 4 and self.kv_cache == "latent"
        if self._absorbed_ran:
            return self._forward_absorbed(hidden_states, position_embeddings, attention_mask, past_key_values), None
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

    def _forward_absorbed(self, x, position_embeddings, mask, past_key_values):
        """Decode (a few tokens): attention on the latent, with every step's work reduced to a few products.

        Same maths as the expanded path: ``scores = (W_uk^T q_nope) . c + q_rot . k_rot``,
        ``out = W_uv (P . c)``; the heads of a step are laid out as rows of one batched product against
        the shared latent (MQA-like), and the rotary embedding is one product with a signed permutation.
        """
        b, q, _ = x.shape
        H, dn, dr, r = self.num_heads, self.dn, self.dr, self.kv_lora_rank
        if self.qkv_a is not None:
            q_lat, ckv = self.qkv_a(x)
        else:
            q_lat = self.q_a_proj(x) if self.q_lora_rank is not None else None
            ckv = self.kv_a_proj_with_mqa(x)
        c, k_rot = ckv.split_with_sizes([r, dr], -1)
        c = _rms(self.kv_a_layernorm, c).view(b, 1, q, r)
        w_q = self.w_q
        if w_q is not None:  # the absorbed query in one product: [b, q, H*r | H*dr]
            ql, q_rot = F.linear(_rms(self.q_a_layernorm, q_lat, False), w_q).split_with_sizes([H * r, H * dr], -1)
            q_rot = q_rot.view(b, q, H, dr)
        else:
            qh = self.q_b_proj(_rms(self.q_a_layernorm, q_lat)) if self.q_lora_rank is not None else self.q_proj(x)
            q_nope, q_rot = qh.view(b, q, H, dn + dr).split_with_sizes([dn, dr], -1)
        # rotary embedding of the H query heads and the shared key in one go: [b, q, H + 1, dr]
        rot = torch.cat([q_rot, k_rot.view(b, q, 1, dr)], dim=2)
        rot = rotary(rot, self._mat(self.rope_mat, rot.dtype), self._rope_cs(position_embeddings, rot.dtype))
        q_rot, k_rot = rot.split_with_sizes([H, 1], 2)
        k_rot = k_rot.transpose(1, 2)  # [b, 1, q, dr]
        if past_key_values is not None:
            c, k_rot = past_key_values.update(c, k_rot, self.layer_idx)
        s = c.shape[-2]
        c, k_rot = c.view(b, s, r), k_rot.view(b, s, dr)
        # absorbed query, heads as rows: [b, H*q, r]
        if w_q is not None:
            ql = ql.view(b, q, H, r).transpose(1, 2).reshape(b, H * q, r)
        else:
            ql = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, b * q, dn), self._mat(self.w_uk, q_nope.dtype))
            ql = ql.view(H, b, q, r).transpose(0, 1).reshape(b, H * q, r)
        qr = q_rot.transpose(1, 2).reshape(b, H * q, dr)
        scores = torch.baddbmm(torch.bmm(qr, k_rot.mT), ql, c.mT, beta=self.scaling, alpha=self.scaling)
        scores = scores.view(b, H, q, s)
        m = self._mask(mask, q, s, scores.device, scores.dtype)
        if m is not None:
            scores = scores + m
        if scores.is_cuda and scores.dtype in (torch.bfloat16, torch.float16):
            p = torch.softmax(scores, dim=-1)  # the GPU kernel accumulates in fp32 and rounds once
        else:
            p = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if p.dtype != c.dtype:
            p = p.to(c.dtype)
        o = torch.bmm(p.view(b, H * q, s), c)  # [b, H*q, r]
        o = torch.bmm(o.view(b, H, q, r).transpose(0, 1).reshape(H, b * q, r), self._mat(self.w_uv, o.dtype).mT)
        return self.o_proj(o.view(H, b, q, self.dv).permute(1, 2, 0, 3).reshape(b, q, H * self.dv))

    @staticmethod
    def _mat(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return w if w.dtype == dtype else w.to(dtype)

    _cs: tuple = ()  # (cos, sin, key, [cos | sin]) of the last step, read and written as one

    def _rope_cs(self, position_embeddings, dtype) -> torch.Tensor:
        """``[cos | sin]`` in the layout ``rope_mat`` produces, ``[b, q, 1, 2 dr]``; built once per step.

        Every layer of a step receives the very same ``(cos, sin)`` tensors, so the last one is kept
        (on the class; the entry holds the tensors themselves, so their identity cannot be reused, and
        their version counters, so a tensor changed in place is not mistaken for the one seen). Tensors
        made under ``torch.inference_mode()`` have no version counter: those are matched by identity
        alone (the model makes them afresh every step and nothing writes to them within one).
        """
        cos, sin = position_embeddings
        e = FusedMLA._cs
        versions = (-1, -1) if cos.is_inference() or sin.is_inference() else (cos._version, sin._version)
        key = (*versions, self._interleave, dtype)
        if e and e[0] is cos and e[1] is sin and e[2] == key:
            return e[3]
        cs = rope_cos_sin(cos, sin, self._interleave, dtype)
        FusedMLA._cs = (cos, sin, key, cs)
        return cs


def rope_cos_sin(cos: torch.Tensor, sin: torch.Tensor, interleave: bool, dtype: torch.dtype) -> torch.Tensor:
    """``[cos | sin]`` (``[b, q, 1, 2 dr]``) to multiply ``x @ rope_matrix(dr, interleave)`` with."""
    if interleave:  # transformers uses the first half of cos and sin for both halves
        h = cos.shape[-1] // 2
        cos, sin = cos[..., :h], sin[..., :h]
        cs = torch.cat([cos, cos, sin, sin], dim=-1)
    else:
        cs = torch.cat([cos, sin], dim=-1)
    return cs.to(dtype).unsqueeze(2)


def rotary(x: torch.Tensor, mat: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding of ``x [b, q, heads, dr]``: ``(x @ mat) * cs``, its two halves summed."""
    dr = x.shape[-1]
    return torch.matmul(x, mat).mul_(cs).view(*x.shape[:-1], 2, dr).sum(-2)


def rope_matrix(dr: int, interleave: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``M [dr, 2 dr]`` such that ``(x @ M) * [cos | sin]`` summed over its two halves is transformers' rotary
    embedding of ``x`` (``apply_rotary_pos_emb`` or, with ``interleave``, ``apply_rotary_pos_emb_interleave``).

    Each column of ``M`` has one entry, +1 or -1, so ``x @ M`` is a signed permutation of ``x`` and exact;
    the products with cos and sin and their sums are then the very ones transformers computes.
    """
    h = dr // 2
    m = torch.zeros(dr, 2 * dr, dtype=torch.float64)
    j = torch.arange(h)
    if interleave:  # out[:h] = x[0::2] cos - x[1::2] sin ; out[h:] = x[1::2] cos + x[0::2] sin
        m[2 * j, j] = 1
        m[2 * j + 1, h + j] = 1
        m[2 * j + 1, dr + j] = -1
        m[2 * j, dr + h + j] = 1
    else:  # x cos + rotate_half(x) sin, rotate_half(x) = [-x[h:], x[:h]]
        m[torch.arange(dr), torch.arange(dr)] = 1
        m[h + j, dr + j] = -1
        m[j, dr + h + j] = 1
    return m.to(dtype)


def _rms(norm: nn.Module, x: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """``norm(x)`` without the module call; ``scale=False``: without its weight (folded elsewhere)."""
    if type(norm) is FastRMSNorm:
        w = norm.weight if scale else None
        if x.dtype == torch.float32:
            return F.rms_norm(x, norm.dim, w, norm.eps)
        y = rms_unscaled(x, norm.dim, norm.eps)
        return y if w is None else w * y
    return norm(x)


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
           "kv_cache_report", "FusionReport", "is_mla", "gemv_layout", "is_silu", "rope_matrix", "rope_cos_sin", "rotary"]
