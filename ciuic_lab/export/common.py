"""What every exporter reads from a model: its applied plan, its quantized weights, its tensors as loaded.

An exporter takes the model *as it computes now* (after :func:`ciuic_lab.apply`): the plan in force and
the very :class:`~ciuic_lab.quant.QTensor` objects the quantized modules hold, so what is written is
what was measured (GPTQ weights and cached weights included), never a re-quantization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ..errors import CiuicError
from ..plan import Plan, keep_plan
from ..quant import QTensor, dequantize
from ..sites import Site, sites
from ..transforms import state_of

@dataclass
class Applied:
    """The model, its tokenizer, and what apply did to it."""

    model: nn.Module
    tokenizer: Any
    plan: Plan
    qweights: dict[str, QTensor]
    folded: dict[str, bool] = field(default_factory=dict)
    name: str | None = None

    @property
    def sites(self) -> dict[str, Site]:
        return self.plan.sites

    @cached_property
    def folds(self) -> dict[str, str]:
        """Site name -> path of the norm folded into it (empty unless the plan folds norms)."""
        if not any(self.folded.values()):
            return {}
        from ..transforms.apply import fold_sources

        return fold_sources(self.model, self.plan)[0]

    def site_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the model computes with at ``name``: dequantized where quantized, else as loaded
        (times the folded norm scale where the plan folds one in). ``dtype`` (say float32) dequantizes
        without the model dtype's rounding."""
        qt = self.qweights.get(name)
        if qt is not None:
            return dequantize(qt, dtype)
        site = self.sites[name]
        w = loaded_tensor(self.model, f"{site.module}.{site.param}")
        if site.role == "expert" and w.dim() == 3:
            w = w[site.expert]
        if self.folded.get(name):
            w = w * loaded_tensor(self.model, f"{self.folds[name]}.weight").to(w.dtype)
        return w.detach() if dtype is None else w.detach().to(dtype)


def unpack_source(obj, tokenizer=None) -> tuple[nn.Module, Any, str | None]:
    """``obj`` may be a model, a :class:`~ciuic_lab.models.Loaded` or anything holding ``.model`` and
    ``.tokenizer`` (a Session)."""
    name = None
    if not isinstance(obj, nn.Module) and hasattr(obj, "model"):
        tokenizer = tokenizer if tokenizer is not None else getattr(obj, "tokenizer", None)
        name = getattr(obj, "name", None)
        if not isinstance(name, str):
            name = getattr(getattr(obj, "loaded", None), "name", None)
        obj = obj.model
    if not isinstance(obj, nn.Module) or not hasattr(obj, "config"):
        raise CiuicError(
            f"cannot export a {type(obj).__name__}; accepted: a model from ciuic_lab.load, the Loaded it "
            "returns, or a Session"
        )
    return obj, tokenizer, name


def applied(obj, tokenizer=None) -> Applied:
    """Read the plan in force and its quantized weights (a model never applied exports as loaded)."""
    model, tokenizer, name = unpack_source(obj, tokenizer)
    st = state_of(model)
    plan = st.plan
    if plan is None:
        plan = keep_plan(sites(model))
    folded = {n: bool(eff[1]) for n, eff in st.effective.items()}
    return Applied(model, tokenizer, plan, dict(st.qweights), folded, name)


# ------------------------------------------------------------------ tensors as loaded
def loaded_module(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` as loaded, looking through the modules apply swapped in or fused."""
    st = state_of(model)
    cur: nn.Module = model
    prefix = ""
    for part in path.split(".") if path else []:
        prefix = f"{prefix}.{part}" if prefix else part
        if prefix in st.modules:
            cur = st.modules[prefix]
        elif prefix in st.struct_modules:
            cur = st.struct_modules[prefix]
        else:
            cur = getattr(cur, part)
    return cur


def loaded_tensor(model: nn.Module, key: str) -> torch.Tensor:
    """A parameter or buffer of the model as loaded, by its state-dict key."""
    st = state_of(model)
    path, _, pname = key.rpartition(".")
    if (path, pname) in st.params:
        return st.params[(path, pname)]
    return getattr(loaded_module(model, path), pname)


def loaded_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every persistent tensor of the model as loaded, by state-dict key (a tied tensor under each key).

    Walks the module tree the way ``state_dict`` does, but through the modules and parameters apply
    keeps aside, so an applied model yields the tensors it was loaded with.
    """
    st = state_of(model)
    out: dict[str, torch.Tensor] = {}

    def visit(mod: nn.Module, path: str) -> None:
        prefix = f"{path}." if path else ""
        for pname, p in mod._parameters.items():
            if p is not None:
                out[prefix + pname] = st.params.get((path, pname), p).detach()
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                out[prefix + bname] = b.detach()
        for cname, child in mod._modules.items():
            cpath = prefix + cname
            if cpath in st.modules:
                child = st.modules[cpath]
            elif cpath in st.struct_modules:
                child = st.struct_modules[cpath]
            if child is not None:
                visit(child, cpath)

    visit(model, "")
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CiuicError(f"unknown dtype {name!r} in the saved files")
    return dt


def error_stats(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """How far ``got`` is from ``ref``: max |diff|, RMS diff, and RMS diff relative to RMS(ref)."""
    ref = ref.detach().to(torch.float64)
    got = got.detach().to(torch.float64)
    d = got - ref
    rms = float(d.pow(2).mean().sqrt()) if d.numel() else 0.0
    base = float(ref.pow(2).mean().sqrt()) if ref.numel() else 0.0
    return {"max_abs": float(d.abs().max()) if d.numel() else 0.0, "rmse": rms,
            "rel_rmse": rms / base if base > 0 else (0.0 if rms == 0 else float("inf"))}
