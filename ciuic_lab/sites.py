"""Sites: every weight a user can change.

A site is one ``nn.Linear``, one expert of a 3-D expert bank, the embedding, the head, a router or a
norm. Its name follows the model's own parameter names (one expert of a bank is
``model.layers.3.mlp.experts.down_proj[5]``), its *kind* says what it is across models
(``attn.kv_b``, ``moe.expert.down``, ``mlp.gate``...), and it knows its block index and shape.

Router, norms, embedding and head are listed but kept by default (``keep_default``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .models import family_of

# last path component -> kind suffix, per role
ATTN = {
    "q_a_proj": "attn.q_a", "q_b_proj": "attn.q_b", "q_proj": "attn.q", "k_proj": "attn.k",
    "v_proj": "attn.v", "kv_a_proj_with_mqa": "attn.kv_a", "kv_b_proj": "attn.kv_b", "o_proj": "attn.o",
    "wq_b": "attn.indexer.q_b", "wk": "attn.indexer.k", "weights_proj": "attn.indexer.weights",
}
MLP = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
NORMS = {
    "input_layernorm": "norm.input", "post_attention_layernorm": "norm.post_attn",
    "q_a_layernorm": "norm.q_a", "kv_a_layernorm": "norm.kv_a", "norm": "norm.final",
    "q_norm": "norm.q", "k_norm": "norm.k",
}
BANK_PARAMS = {"gate_up_proj": "moe.expert.gate_up", "down_proj": "moe.expert.down",
               "gate_proj": "moe.expert.gate", "up_proj": "moe.expert.up"}
KEPT_ROLES = ("embedding", "head", "router", "norm")

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_EXPERT_IDX = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Site:
    name: str            # stable user-facing name
    kind: str            # e.g. attn.kv_b, moe.expert.down, mlp.gate, embed, head, moe.router, norm.input
    block: int | None    # decoder block index, None for embedding/head/final norm
    shape: tuple[int, ...]  # (N, K) for matrices: N outputs, K inputs; (K,) for norms
    params: int
    role: str            # linear | expert | embedding | head | router | norm
    module: str          # path of the module that owns the weight
    param: str           # parameter name on that module ("weight", "gate_up_proj", ...)
    expert: int | None = None  # index in a 3-D bank
    dtype: str = "float32"

    @property
    def keep_default(self) -> bool:
        return self.role in KEPT_ROLES

    @property
    def n(self) -> int:
        return self.shape[0]

    @property
    def k(self) -> int:
        return self.shape[-1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["keep_default"] = self.keep_default
        return d


def _block(path: str) -> int | None:
    m = _BLOCK.search(path + ".")
    return int(m.group(1)) if m else None


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _linear_kind(path: str, family: str) -> str:
    parts = path.split(".")
    last = parts[-1]
    if last in ATTN and ("attn" in path or "attention" in path or "indexer" in path):
        return ATTN[last]
    if last in MLP:
        if ".shared_expert" in path:  # shared_experts (DeepSeek) / shared_expert (Qwen-MoE)
            return f"moe.shared.{MLP[last]}"
        if ".experts." in path:
            return f"moe.expert.{MLP[last]}"
        return f"mlp.{MLP[last]}"
    if last == "gate" and ".mlp" in path:
        return "moe.router"
    if last in ("lm_head", "output", "embed_out"):
        return "head"
    if family != "generic" and last in ATTN:
        return ATTN[last]
    return "linear"


def sites(model: nn.Module) -> list[Site]:
    """Every changeable weight of ``model``, in module order."""
    family = family_of(model)
    out: list[Site] = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            kind = "head" if mod is head else _linear_kind(path, family)
            role = {"head": "head", "moe.router": "router"}.get(kind, "expert" if kind.startswith("moe.expert") else "linear")
            w = mod.weight
            expert = None
            m = _EXPERT_IDX.search(path + ".")
            if role == "expert" and m:
                expert = int(m.group(1))
            out.append(Site(path, kind, _block(path), tuple(w.shape), w.numel(), role, path, "weight", expert, _dtype(w)))
        elif isinstance(mod, nn.Embedding):
            if mod is embed or path.endswith("embed_tokens"):
                w = mod.weight
                out.append(Site(path, "embed", None, tuple(w.shape), w.numel(), "embedding", path, "weight", None, _dtype(w)))
        elif _is_router(path, mod):
            w = mod.weight
            out.append(Site(path, "moe.router", _block(path), tuple(w.shape), w.numel(), "router", path, "weight", None, _dtype(w)))
        elif _is_norm(mod):
            w = mod.weight
            last = path.split(".")[-1]
            kind = NORMS.get(last, "norm")
            out.append(Site(path, kind, _block(path), tuple(w.shape), w.numel(), "norm", path, "weight", None, _dtype(w)))
        else:
            for pname, p in mod.named_parameters(recurse=False):
                if p.dim() == 3 and pname in BANK_PARAMS:
                    kind = BANK_PARAMS[pname]
                    for e in range(p.shape[0]):
                        out.append(Site(f"{path}.{pname}[{e}]", kind, _block(path), tuple(p.shape[1:]),
                                        p[e].numel(), "expert", path, pname, e, _dtype(p)))
    return out


def _is_router(path: str, mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 2 and path.endswith(".gate")
            and not isinstance(mod, (nn.Linear, nn.Embedding)))


def _is_norm(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    name = type(mod).__name__
    return isinstance(w, nn.Parameter) and w.dim() == 1 and ("Norm" in name or isinstance(mod, nn.LayerNorm))


def by_name(site_list: list[Site]) -> dict[str, Site]:
    return {s.name: s for s in site_list}


def kinds(site_list: list[Site]) -> list[str]:
    seen: list[str] = []
    for s in site_list:
        if s.kind not in seen:
            seen.append(s.kind)
    return seen


def get_weight(model: nn.Module, site: Site) -> torch.Tensor:
    """The site's current dense weight tensor (a view for bank experts)."""
    mod = model.get_submodule(site.module)
    p = getattr(mod, site.param)
    return p[site.expert] if site.role == "expert" and p.dim() == 3 else p
