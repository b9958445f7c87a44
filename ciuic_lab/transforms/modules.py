"""Modules that hold quantized weights and compute with a backend from the kernel registry."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import REGISTRY
from ..quant import QTensor, dequantize


class _Kerneled:
    """Picks a backend per call (device, format, layout, batch) and keeps each backend's prepared weight."""

    layout: str
    kernel: str

    def _init_kernel(self, layout: str, kernel: str) -> None:
        self.layout = layout
        self.kernel = kernel
        self._prepared: dict[tuple[str, int], Any] = {}
        self.last_backend: str | None = None

    def _run(self, qt: QTensor, x2d: torch.Tensor, bias: torch.Tensor | None, slot: int = 0) -> torch.Tensor:
        backend = REGISTRY.pick(x2d.device.type, qt.spec, self.layout, x2d.shape[0], self.kernel)
        key = (backend.name, slot)
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = backend.prepare(qt, self.layout)
            self._prepared[key] = prepared
        if self.last_backend != backend.name:  # (a module's setattr costs as much as a small kernel)
            self.last_backend = backend.name
        return backend.linear(x2d, prepared, bias)


class QuantLinear(nn.Module, _Kerneled):
    """An ``nn.Linear`` whose weight is a :class:`QTensor`."""

    def __init__(self, qt: QTensor, bias: torch.Tensor | None, layout: str = "rowmajor", kernel: str = "auto",
                 site: str = ""):
        super().__init__()
        self.qt = qt
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features = qt.k
        self.out_features = qt.n
        self.site = site
        self._init_kernel(layout, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._run(self.qt, x.reshape(-1, x.shape[-1]), self.bias)
        return y.reshape(*lead, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """Dense view of the quantized weight (for code that reads ``.weight``; computes, stores nothing)."""
        return dequantize(self.qt)

    def ran_for(self) -> dict[str, str]:
        """A stacked projection (site ``a+b``) runs its parts' weights: each part's site -> its backend."""
        if "+" not in self.site or self.last_backend is None:
            return {}
        return {part: self.last_backend for part in self.site.split("+")}

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.qt.spec.label()}, layout={self.layout}"


def is_silu(act: nn.Module) -> bool:
    """Whether ``act`` is SiLU (torch's or transformers'), so ``F.silu`` may stand for its call."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


class QuantExperts(nn.Module, _Kerneled):
    """A 3-D expert bank (``gate_up_proj [E, 2I, K]``, ``down_proj [E, K, I]``) with per-expert weights.

    Each expert of each bank is either a :class:`QTensor` or kept as a view of the loaded weight.
    The forward is transformers' DeepseekV3Experts maths; a backend with a grouped ``moe`` form runs
    the selected experts of the layer in one call, otherwise experts run one after another.
    """

    def __init__(self, original: nn.Module, gate_up: list[QTensor | None], down: list[QTensor | None],
                 layout: str = "rowmajor", kernel: str = "auto", gate_up_w: torch.Tensor | None = None):
        super().__init__()
        self.num_experts = original.gate_up_proj.shape[0]
        self.act_fn = original.act_fn
        self.gate_up_q = gate_up
        self.down_q = down
        # dense weights for experts kept as they are: the loaded bank (or its norm-folded copy)
        self._gate_up_w = original.gate_up_proj if gate_up_w is None else gate_up_w
        self._down_w = original.down_proj
        self.grouped = False  # the moe_grouped fusion: one grouped call per layer
        self._init_kernel(layout, kernel)
        self._moe_prepared: tuple | None = None
        self._moe_extra: tuple | None = None  # (gate_up, down QTensors, lists with their prepared forms)
        # the per-expert lists are fixed at construction: which banks are quantized, and the activation
        self._all_dense = all(q is None for q in gate_up) and all(q is None for q in down)
        self._any_dense = any(q is None for q in gate_up) or any(q is None for q in down)
        self._silu = is_silu(self.act_fn)
        self._views: tuple | None = None

    def _linear(self, e: int, which: str, x: torch.Tensor) -> torch.Tensor:
        qs = self.gate_up_q if which == "gate_up" else self.down_q
        qt = qs[e]
        if qt is None:
            w = (self._gate_up_w if which == "gate_up" else self._down_w)[e]
            return F.linear(x, w.to(x.dtype))
        return self._run(qt, x, None, slot=e * 2 + (which == "down"))

    def _grouped(self, hidden: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, extra: tuple | None = None):
        """The selected experts in one grouped backend call, or NotImplemented. ``extra``: one more
        ``(gate_up, down)`` pair of QTensors (a shared expert), addressed as expert ``num_experts``."""
        if self._any_dense:
            return NotImplemented
        spec = self.gate_up_q[0].spec
        if any(q.spec != spec for q in self.gate_up_q + self.down_q + list(extra or ())):
            return NotImplemented
        backend = REGISTRY.pick(hidden.device.type, spec, self.layout, hidden.shape[0], self.kernel)
        moe = getattr(backend, "moe", None)
        if moe is None:
            return NotImplemented
        if self._moe_prepared is None or self._moe_prepared[0] != backend.name:
            gu = [backend.prepare(q, self.layout) for q in self.gate_up_q]
            dn = [backend.prepare(q, self.layout) for q in self.down_q]
            self._moe_prepared = (backend.name, gu, dn)
            self._moe_extra = None
        gu, dn = self._moe_prepared[1], self._moe_prepared[2]
        if extra is not None:
            # the lists with the extra pair are kept (the backend keys its pointer tables on them); they
            # share the routed experts' prepared weights, only the extra pair is prepared anew
            x = self._moe_extra
            if x is None or x[0] is not extra[0] or x[1] is not extra[1]:
                x = (extra[0], extra[1], gu + [backend.prepare(extra[0], self.layout)],
                     dn + [backend.prepare(extra[1], self.layout)])
                self._moe_extra = x
            gu, dn = x[2], x[3]
        out = moe(hidden, idx, wts, gu, dn)
        if out is not NotImplemented:
            self.last_backend = backend.name
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self._all_dense and (self.grouped or top_k_index.shape[0] == 1):
            # one token runs its few experts one after another either way: the lean per-pair form
            return self._grouped_dense(hidden_states, top_k_index, top_k_weights)
        out = self._grouped(hidden_states, top_k_index, top_k_weights)
        if out is not NotImplemented:
            return out
        final = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if e < 0 or e >= self.num_experts:
                continue
            tok, pos = torch.where(top_k_index == e)
            x = hidden_states[tok]
            gate, up = self._linear(e, "gate_up", x).chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            y = self._linear(e, "down", h) * top_k_weights[tok, pos, None]
            final.index_add_(0, tok, y.to(final.dtype))
        return final

    def _grouped_dense(self, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        """Dense experts as one batched call over the (token, expert) pairs; sorted segments for long inputs."""
        t, k = idx.shape
        flat = idx.reshape(-1)
        if t * k <= 16:
            # decode: a handful of (token, expert) pairs; run each on views of the bank (no gather of
            # whole expert matrices, which costs more than the products at this size). Each token sums
            # its experts' weighted outputs in top-k order, as transformers' grouped forms do.
            views = self._bank_views(x.dtype)
            pairs = idx.tolist()
            rows = []
            for ti in range(t):
                xi = x if t == 1 else x[ti:ti + 1]
                acc = None
                for j, e in enumerate(pairs[ti]):
                    if e < 0 or e >= self.num_experts:
                        continue
                    if views is None:
                        gw, dw = self._gate_up_w[e].to(x.dtype), self._down_w[e].to(x.dtype)
                    else:
                        gw, dw = views[0][e], views[1][e]
                    g, u = F.linear(xi, gw).chunk(2, dim=-1)
                    h = F.silu(g) * u if self._silu else self.act_fn(g) * u
                    y = F.linear(h, dw) * wts[ti:ti + 1, j:j + 1]
                    acc = y if acc is None else acc.add_(y)
                rows.append(torch.zeros_like(xi) if acc is None else acc.to(x.dtype))
            return rows[0] if t == 1 else torch.cat(rows)
        xs = x.repeat_interleave(k, dim=0)
        w = wts.reshape(-1, 1).to(x.dtype)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = xs[order]
        out = torch.empty(t * k, x.shape[-1], dtype=x.dtype, device=x.device)
        start = 0
        for e, c in enumerate(counts):
            if c:
                seg = xs[start:start + c]
                g, u = F.linear(seg, self._gate_up_w[e].to(x.dtype)).chunk(2, dim=-1)
                out[start:start + c] = F.linear(self.act_fn(g) * u, self._down_w[e].to(x.dtype))
                start += c
        y = torch.empty_like(out)
        y[order] = out
        return (y * w).view(t, k, -1).sum(1)

    def _bank_views(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Each expert's dense gate_up and down as views of the banks, made once (None: convert per call)."""
        gw, dw = self._gate_up_w, self._down_w
        if gw.dtype != dtype or dw.dtype != dtype or torch.is_grad_enabled():
            return None
        key = (gw.data_ptr(), dw.data_ptr(), gw.device, dtype)
        if self._views is None or self._views[0] != key:
            self._views = (key, list(gw.detach().unbind(0)), list(dw.detach().unbind(0)))
        return self._views[1], self._views[2]

    def extra_repr(self) -> str:
        nq = sum(q is not None for q in self.gate_up_q + self.down_q)
        return f"{self.num_experts} experts, {nq} of {2 * self.num_experts} expert weights quantized"


class QuantEmbedding(nn.Module):
    """An embedding table held quantized; rows are dequantized as they are looked up."""

    def __init__(self, qt: QTensor, original: nn.Embedding):
        super().__init__()
        self.qt = qt
        self.padding_idx = original.padding_idx
        self.num_embeddings, self.embedding_dim = qt.n, qt.k
        self.last_backend = "torch"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        qt = self.qt
        flat = ids.reshape(-1)
        if qt.spec.is_fp8:
            rows = dequantize(qt)[flat]
        else:
            sub = QTensor(qt.spec.replace(group=qt.spec.group if qt.spec.group != "tensor" else "channel"),
                          (flat.numel(), qt.k), qt.codes[flat], qt.group_scales()[flat],
                          qt.group_zeros()[flat] if qt.zeros is not None else None, qt.dtype)
            rows = dequantize(sub)
        return rows.reshape(*ids.shape, qt.k)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qt)
