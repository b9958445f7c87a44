"""The project's own format: an optimized model saved as it computes, restored bit for bit.

A saved model is a directory::

    ciuic_config.json        the marker: format version, dtype, attention implementation, and for each
                             quantized site its spec, shape, dtype and whether a norm is folded into it
    config.json              the base model's configuration (generation_config.json where it has one)
    tokenizer files          as the tokenizer saves them
    model.safetensors        the tensors kept dense, under their state-dict names, and for each quantized
                             site its packed ``<site>.codes``, ``<site>.scales`` and (asymmetric) ``<site>.zeros``
    recipe.json, plan.json   the recipe and the resolved plan (``Plan.to_dict``)

Dense tensors are the model *as loaded*: the weights quantized sites replace are left out (an expert bank
with some experts kept is stored whole, its quantized experts zeroed), so the directory holds the packed
weights and nothing they were made from.

:func:`load_saved` builds the model from its configuration (nothing is downloaded), loads the dense
tensors, puts each quantized site's dequantized weight where the loaded one was (what
:func:`ciuic_lab.revert` returns to), and re-applies the plan through :func:`ciuic_lab.apply` with a
cache pre-filled with the saved :class:`~ciuic_lab.quant.QTensor` objects: the same modules hold the same
codes, so the logits equal the saved model's bit for bit (same machine, same kernels).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CiuicError, ModelLoadError
from ..plan import Plan, from_dict as plan_from_dict
from ..quant import QTensor, QuantSpec, dequantize
from ..sites import sites as list_sites
from ..transforms import apply, state_of
from .common import Applied, applied, dtype_name, dtype_of, loaded_state

MARKER = "ciuic_config.json"
WEIGHTS = "model.safetensors"
FORMAT = "ciuic-lab"
FORMAT_VERSION = 1
QPARTS = ("codes", "scales", "zeros")


def is_saved(path: str | os.PathLike) -> bool:
    """Does ``path`` hold a model written by :func:`save`?"""
    return (Path(path) / MARKER).is_file()


# ------------------------------------------------------------------ save
def save(model, path: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the model as it computes now (plan in force, packed weights) to the directory ``path``.

    ``model``: a model from :func:`ciuic_lab.load` (applied or not), the ``Loaded`` it returns, or a
    Session. ``tokenizer`` defaults to the one ``model`` carries. Returns a summary (files, bytes).
    """
    src = applied(model, tokenizer)
    out = Path(path).expanduser()
    _prepare_dir(out, overwrite)
    tensors, meta = _tensors_and_meta(src)

    from safetensors.torch import save_file

    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "ciuic_format": FORMAT})
    src.model.config.save_pretrained(str(out))
    gen = getattr(src.model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(out))
        except Exception:  # noqa: BLE001 - a generation config that does not validate is not ours to fix
            pass
    if src.tokenizer is not None:
        src.tokenizer.save_pretrained(str(out))
    (out / "recipe.json").write_text(src.plan.recipe.to_json() + "\n")
    (out / "plan.json").write_text(src.plan.to_json() + "\n")
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    files = sorted(p.name for p in out.iterdir())
    return {
        "format": "ciuic",
        "path": str(out),
        "files": files,
        "bytes": sum((out / f).stat().st_size for f in files),
        "weights_bytes": (out / WEIGHTS).stat().st_size,
        "quantized_sites": len(meta["quantized"]),
        "dense_tensors": len(meta["dense"]),
    }


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CiuicError(f"{str(out)!r} is a file; accepted: a new or empty directory (or overwrite=True)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CiuicError(f"{str(out)!r} is not empty; accepted: a new or empty directory, or overwrite=True "
                             "(--overwrite)")
        if not is_saved(out):
            raise CiuicError(f"{str(out)!r} holds other files; overwrite only replaces a directory written by "
                             "ciuic_lab.save")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _tensors_and_meta(src: Applied) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    model = src.model
    state = loaded_state(model)
    quantized = {n: src.qweights[n] for n in src.plan.quantized() if n in src.qweights}
    missing = [n for n in src.plan.quantized() if n not in src.qweights]
    if missing:
        raise CiuicError(f"the plan quantizes {missing[0]} but the model holds no quantized weight for it; "
                         "apply the plan before saving")
    # state-dict keys whose tensor quantized sites replace: whole tensors, or experts of a bank
    replaced: dict[str, list[int] | None] = {}
    for n in quantized:
        s = src.sites[n]
        key = f"{s.module}.{s.param}"
        if s.role == "expert" and s.expert is not None:
            replaced.setdefault(key, [])
            replaced[key].append(s.expert)
        else:
            replaced[key] = None
    tensors: dict[str, torch.Tensor] = {}
    dense: list[str] = []
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        if key in replaced:
            experts = replaced[key]
            if experts is None or len(experts) == t.shape[0]:
                continue
            t = t.clone()
            t[experts] = 0
        ident = (t.data_ptr(), tuple(t.shape), t.dtype, t.stride()) if t.numel() else None
        if ident is not None and ident in seen:  # a tied tensor: stored once
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.contiguous().cpu()
        dense.append(key)
    qmeta = {}
    for n, qt in quantized.items():
        for part, tensor in qt.tensors().items():
            tensors[f"{n}.{part}"] = tensor.contiguous().cpu()
        qmeta[n] = {"spec": qt.spec.to_dict(), "shape": list(qt.shape), "dtype": dtype_name(qt.dtype),
                    "folded": src.folded.get(n, False)}
    clash = [k for k in tensors if k in state and k not in dense]
    if clash:
        raise CiuicError(f"site tensor name {clash[0]!r} collides with a model tensor; cannot save this model")
    first = next((t for t in state.values() if t.is_floating_point()), None)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": src.name,
        "dtype": dtype_name(first.dtype if first is not None else torch.float32),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "plan": {"recipe": src.plan.recipe.name, "quantized_sites": len(quantized),
                 "fusions": dict(src.plan.recipe.fusions), "kv_cache": src.plan.recipe.kv_cache},
        "quantized": qmeta,
        "dense": dense,
        "aliases": aliases,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return tensors, meta


# ------------------------------------------------------------------ load
def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not is_saved(p):
        raise ModelLoadError(f"{str(p)!r} is not a saved Ciuic Lab model: {MARKER} is missing")
    try:
        meta = json.loads((p / MARKER).read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{str(p / MARKER)!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int):
        raise ModelLoadError(f"{str(p / MARKER)!r} is not a Ciuic Lab marker (format {meta.get('format')!r})")
    if meta["version"] > FORMAT_VERSION:
        raise ModelLoadError(f"{str(p)!r} was saved in format version {meta['version']}; this installation "
                             f"reads versions up to {FORMAT_VERSION}: upgrade ciuic-lab")
    for f in ("config.json", WEIGHTS, "plan.json"):
        if not (p / f).is_file():
            raise ModelLoadError(f"{str(p)!r} is an incomplete saved model: {f} is missing")
    return meta


def load_saved(path: str | os.PathLike, dtype=None, device: str = "cpu",
               trust_remote_code: bool = False) -> tuple[Any, Any, Plan]:
    """Rebuild a model written by :func:`save`: returns ``(model, tokenizer, plan)`` with the plan applied.

    ``dtype`` other than the saved one (``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch dtype) casts the
    dense tensors and dequantizes to it: the model then runs, but its logits are no longer the saved ones.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..models import _resolve_dtype

    p = Path(path).expanduser()
    meta = read_meta(p)
    saved_dtype = dtype_of(meta["dtype"])
    dt = _resolve_dtype(dtype) or saved_dtype
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        from transformers.initialization import no_init_weights

        config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        kw = {"attn_implementation": meta["attn_implementation"]} if meta.get("attn_implementation") else {}
        with no_init_weights():  # every tensor is loaded or filled below; a missing one is an error
            model = AutoModelForCausalLM.from_config(config, dtype=dt, trust_remote_code=trust_remote_code, **kw)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot build the model saved at {str(p)!r}: {str(e).splitlines()[0]}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # skipped with the weight initialization above
    model.eval()
    model.requires_grad_(False)
    try:
        tensors = load_file(str(p / WEIGHTS))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot read {str(p / WEIGHTS)!r}: {str(e).splitlines()[0]}") from e
    qweights = _qtensors(tensors, meta, None if dtype is None else dt)
    missing = [k for k in meta["dense"] if k not in tensors]
    if missing:
        raise ModelLoadError(f"{str(p / WEIGHTS)!r} lacks the tensor {missing[0]!r} ({len(missing)} missing)")
    dense = {k: tensors.pop(k) for k in meta["dense"]}
    site_list = list_sites(model)
    plan = plan_from_dict(json.loads((p / "plan.json").read_text()), site_list)
    _fill(model, dense, qweights, plan, meta)
    if device and str(device) != "cpu":
        model.to(device)
        qweights = {n: q.to(device) for n, q in qweights.items()}
    if plan.quantized() or any(plan.recipe.fusions.values()) or plan.recipe.kv_cache != "latent":
        _reapply(model, plan, qweights, meta)
    tokenizer = None
    if any(p.glob("tokenizer*")):
        from ..models import _tokenizer

        tokenizer = _tokenizer(p, trust_remote_code)
    return model, tokenizer, plan


def _qtensors(tensors: dict[str, torch.Tensor], meta: dict, dt: torch.dtype | None) -> dict[str, QTensor]:
    """The saved QTensors, dequantizing to their saved dtype (or ``dt``)."""
    out = {}
    for n, q in meta["quantized"].items():
        try:
            spec = QuantSpec.from_dict(q["spec"])
            codes = tensors.pop(f"{n}.codes")
            scales = tensors.pop(f"{n}.scales")
        except KeyError as e:
            raise ModelLoadError(f"the saved weights lack {e.args[0]!r} for the quantized site {n}") from None
        except CiuicError as e:
            raise ModelLoadError(f"the saved spec of {n} is invalid: {e}") from None
        zeros = tensors.pop(f"{n}.zeros", None)
        if (zeros is None) != (spec.scheme == "sym" or spec.is_fp8):
            raise ModelLoadError(f"the saved zero points of {n} do not match its spec ({spec.label()})")
        out[n] = QTensor(spec, tuple(q["shape"]), codes, scales, zeros, dt or dtype_of(q["dtype"]))
    return out


def _fill(model, dense: dict[str, torch.Tensor], qweights: dict[str, QTensor], plan: Plan, meta: dict) -> None:
    """Load the dense tensors, and put each quantized site's dequantized weight where its loaded one was."""
    current = model.state_dict()
    expected = set(current)
    unknown = sorted(set(dense) - expected)
    if unknown:
        raise ModelLoadError(f"the saved tensor {unknown[0]!r} is not a tensor of this model's configuration")
    sharing: dict[int, int] = {}
    for t in current.values():
        sharing[t.data_ptr()] = sharing.get(t.data_ptr(), 0) + 1
    covered = set(dense)
    folds: dict[str, str] = {}
    if any(q.get("folded") for q in meta["quantized"].values()):
        from ..transforms.apply import fold_sources

        folds = fold_sources(model, plan)[0]
    with torch.no_grad():
        model.load_state_dict(dense, strict=False)
        for n, qt in qweights.items():
            site = plan.sites.get(n)
            if site is None:
                raise ModelLoadError(f"the saved site {n} is not a site of the rebuilt model")
            cfg = plan.configs[n]
            if cfg.spec != qt.spec:
                raise ModelLoadError(f"{n}: plan.json says {cfg.spec.label()} but the saved weight is "
                                     f"{qt.spec.label()}")
            key = f"{site.module}.{site.param}"
            covered.add(key)
            param = getattr(model.get_submodule(site.module), site.param)
            if sharing.get(param.data_ptr(), 0) > 1:
                continue  # tied to a kept tensor (embedding and head): that one is the loaded weight
            w = dequantize(qt, param.dtype)
            if meta["quantized"][n].get("folded") and n in folds:
                w = _unfold(model, folds[n], w)
            if site.role == "expert" and site.expert is not None and param.dim() == 3:
                param[site.expert].copy_(w)
            else:
                param.copy_(w.reshape(param.shape))
    left = sorted(expected - covered - set(meta.get("aliases", {})))
    if left:
        raise ModelLoadError(f"the saved model lacks the tensor {left[0]!r} ({len(left)} missing)")


def _unfold(model, norm: str, w: torch.Tensor) -> torch.Tensor:
    """A folded site's weight divided by its norm's scale: the closest loaded weight there is."""
    g = model.get_submodule(norm).weight.detach().to(w.dtype)
    return torch.where(g != 0, w / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(w))


def _reapply(model, plan: Plan, qweights: dict[str, QTensor], meta: dict) -> None:
    cache = {(n, qt.spec, bool(meta["quantized"][n].get("folded"))): qt for n, qt in qweights.items()}
    probe = _Probe(cache)
    apply(model, plan, cache=probe)
    if probe.misses:
        raise ModelLoadError(
            f"re-applying the saved plan quantized {probe.misses[0]} anew (its saved weight did not fit: "
            "norm folding differs?); the restored model would not be the saved one"
        )
    held = state_of(model).qweights
    for n, qt in qweights.items():
        if held.get(n) is not qt:
            raise ModelLoadError(f"{n}: the restored model does not hold the saved quantized weight")


class _Probe(dict):
    """A read-only cache that records the keys apply asked for and did not find."""

    def __init__(self, items):
        super().__init__(items)
        self.misses: list[str] = []

    def get(self, key, default=None):
        hit = super().get(key, default)
        if hit is None:
            self.misses.append(key[0])
        return hit

    def __setitem__(self, key, value):  # apply stores fresh weights; a miss is already recorded
        pass


# ------------------------------------------------------------------ the hook for ciuic_lab.load
def load_as_loaded(path, dtype=None, device: str = "cpu", trust_remote_code: bool = False, **_ignored):
    """What :func:`ciuic_lab.load` returns for a saved directory: a ``Loaded`` with the plan applied."""
    from ..models import Loaded, family_of

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer, plan = load_saved(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    meta = read_meta(path)
    note = (f"restored from a Ciuic Lab save: plan {plan.recipe.name!r} applied "
            f"({len(plan.quantized())} quantized sites); revert() returns to its dequantized weights")
    return Loaded(model, tokenizer, family_of(model), str(path), "ciuic", False, trust_remote_code,
                  time.perf_counter() - t0, [note] + ([f"saved from {meta['source']}"] if meta.get("source") else []))
