"""``ciuic-lab export``: take an optimized model elsewhere.

    ciuic-lab export --model tiny-deepseek --recipe mixed --format ciuic --out saved/
    ciuic-lab export --model saved/ --format gguf --out model.gguf          # a saved model, as it is
    ciuic-lab export --model tiny-deepseek --recipe mixed --format llama.cpp --out types.txt

``--format``: ``ciuic`` (own format, restored bit for bit by ``ciuic_lab.load``), ``gguf`` (llama.cpp),
``compressed-tensors`` (vLLM / transformers), or a plan for another tool's quantizer: ``llama.cpp``
(``--tensor-type-file``), ``torchao`` (``FqnToConfig``), ``gptqmodel`` (``dynamic``). Without ``--recipe``
the model is exported as it loads (a saved model with its own plan).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from ..errors import CiuicError

WEIGHT_FORMATS = ("ciuic", "gguf", "compressed-tensors")
PLAN_FORMATS = ("llama.cpp", "torchao", "gptqmodel")
FORMATS = WEIGHT_FORMATS + PLAN_FORMATS
MAX_LINES = 12


def add_parser(sub, common) -> None:
    p = sub.add_parser("export", help="write the optimized model (ciuic, gguf, compressed-tensors) or its plan "
                                      "for another tool (llama.cpp, torchao, gptqmodel)")
    common(p)
    p.add_argument("--recipe", default=None, help="a preset or a JSON file; default: the model as it loads")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, help="output directory (ciuic, compressed-tensors) or file")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.add_argument("--kv-b", default="fused", choices=("fused", "split"),
                   help="gguf: attn_kv_b whole (exact) or split into attn_k_b / attn_v_b")
    p.add_argument("--prefer", default="size", choices=("size", "exact"),
                   help="gguf: the type of our own width, or a wider one where only that is exact")
    p.add_argument("--asym", default="widen", choices=("widen", "naive-quantized", "pack-quantized"),
                   help="compressed-tensors: asymmetric sites as symmetric one bit wider (exact, loads in "
                        "transformers and vLLM), int8 codes with zero points, or packed codes and zero points")
    p.set_defaults(func=run)


def run(args) -> dict[str, Any]:
    from ..models import describe, load
    from ..recipe import load as load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else None  # fail fast, before loading the model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load(args.model, dtype=getattr(args, "dtype", None),
                      trust_remote_code=getattr(args, "trust_remote_code", False))
    if recipe is not None:
        from ..plan import resolve
        from ..sites import sites
        from ..transforms import apply

        apply(loaded.model, resolve(recipe, sites(loaded.model)))
    out = export(loaded, args.format, args.out, overwrite=args.overwrite, kv_b=args.kv_b, prefer=args.prefer,
                 asym=args.asym)
    out["model"] = describe(loaded)
    if not args.json:
        _print(out)
    return out


def export(model, fmt: str, out: str, *, overwrite: bool = False, **options) -> dict[str, Any]:
    """Write ``model`` (applied or not) in ``fmt`` to ``out``; returns the export's report as a dict."""
    if fmt == "ciuic":
        from .ciuic import save

        return save(model, out, overwrite=overwrite)
    if fmt == "gguf":
        from .gguf_export import export_gguf

        return export_gguf(model, out, kv_b=options.get("kv_b", "fused"), prefer=options.get("prefer", "size"),
                           overwrite=overwrite).to_dict()
    if fmt == "compressed-tensors":
        from .compressed import export_compressed

        return export_compressed(model, out, asym=options.get("asym", "widen"), overwrite=overwrite).to_dict()
    if fmt in PLAN_FORMATS:
        from .plans import compile_plan

        return compile_plan(model, fmt, out, overwrite=overwrite).to_dict()
    raise CiuicError(f"unknown export format {fmt!r}; accepted: {', '.join(FORMATS)}")


def _print(out: dict[str, Any]) -> None:
    where = out.get("path") or out.get("out")
    print(f"{out.get('format')}: wrote {where}" + (f" ({out['bytes'] / 1e6:.2f} MB)" if out.get("bytes") else ""))
    if "tensor_types" in out:
        print("tensor types: " + ", ".join(f"{t} x{n}" for t, n in out["tensor_types"].items()))
        print(f"sites written exactly: {out['exact_sites']} of {out['sites']}")
    if "config_groups" in out:
        for name, g in out["config_groups"].items():
            w = g["weights"]
            print(f"{name}: {len(g['targets'])} targets, int{w['num_bits']} {w['strategy']} "
                  f"{'sym' if w['symmetric'] else 'asym'} ({g['format']})")
    if "entries" in out:
        print(f"entries: {out['entries']}")
    conv = out.get("converted", [])
    if len(conv) > MAX_LINES:  # one line per reason
        by_reason: dict[str, list[dict]] = {}
        for c in conv:
            by_reason.setdefault(re.sub(r"\d+ of \d+ blocks", "some blocks", str(c.get("reason"))), []).append(c)
        for reason, cs in by_reason.items():
            errs = [c["rel_rmse"] for c in cs if "rel_rmse" in c]
            worst = f"; worst rel. RMS error {max(errs):.2e}" if errs else ""
            print(f"  converted {len(cs)} sites: {reason}{worst}")
    else:
        for c in conv:
            err = f", rel. RMS error {c['rel_rmse']:.2e}, max |err| {c['max_abs']:.2e}" if "rel_rmse" in c else ""
            print(f"  converted {c['site']}: {c['spec']} -> {c.get('type') or c.get('written_as')}"
                  f" ({c.get('reason')}{err})")
    for c in out.get("left_out", []):
        print(f"  left out {c['site']} ({c['spec']}): {c['reason']}")
    for n in out.get("notes", []):
        print(f"note: {n}")
