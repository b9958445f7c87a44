"""``ciuic-lab sensitivity`` and ``ciuic-lab autoplan``."""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

from ..errors import CiuicError
from ..models import load
from ..quant import QuantSpec
from ..sites import sites as list_sites
from .allocate import allocate, kernel_latency, refine, uniform, verify
from .sensitivity import label, parse_formats, sensitivity

# GPTQ on output-clipped group grids beats round-to-nearest at every width on held-out text; several
# widths and group sizes give the allocator fine steps, int5 / int6 a place for the few sites that
# carry most of the error (docs/benchmarks.md, Search). Below 3.5 bits per weight, int2 joins and
# groups of 256 with it (int3 g256 is 3.09 bpw: the budget then pushes fewer sites down to int2, whose
# errors compound beyond the sum of single-site KLs the allocator predicts from); at 4 bpw int2 makes
# plans worse.
DEFAULT_FORMATS = ("int3-g128-output-gptq,int3-g64-output-gptq,int4-g128-output-gptq,int4-g64-output-gptq,"
                   "int5-g128-output-gptq,int6-g128-output-gptq,int8-channel-sym")
LOW_BPW_FORMATS = ("int2-g256-output-gptq,int2-g128-output-gptq,int2-g64-output-gptq,int3-g256-output-gptq,"
                   "int3-g128-output-gptq,int3-g64-output-gptq,int4-g256-output-gptq,int4-g128-output-gptq,"
                   "int5-g128-output-gptq")
LOW_BPW_BELOW = 3.5
# a latency budget: the whole range, from int2 to int8
LATENCY_FORMATS = LOW_BPW_FORMATS + ",int6-g128-output-gptq,int8-channel-sym"


def add_parsers(sub, common) -> None:
    p = sub.add_parser("sensitivity", help="KL of quantizing each site (or block, kind, expert) alone")
    common(p)
    p.add_argument("--bits", default="2,3,4,8", help="bits (2,3,4,8) or format labels (int4-g128,int3-g64-mse,...)")
    p.add_argument("--group", default="128", help="group size for bit-only formats (or channel)")
    p.add_argument("--clip", default="minmax", choices=["minmax", "mse", "output"])
    p.add_argument("--unit", default="site", choices=["site", "block", "kind", "expert"])
    p.add_argument("--evalset", default="quick")
    p.set_defaults(func=run_sensitivity)

    p = sub.add_parser("autoplan", help="choose a format per site under a budget, then verify by measuring")
    common(p)
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--target-bpw", type=float, help="bits per weight over the quantizable sites")
    b.add_argument("--max-bytes", type=int, help="bytes of the quantizable sites")
    b.add_argument("--max-latency-ms", type=float, help="decode ms per token on this machine's kernels")
    p.add_argument("--formats", default=None,
                   help=f"candidate formats (default: {DEFAULT_FORMATS}; below {LOW_BPW_BELOW} bpw: "
                        f"{LOW_BPW_FORMATS})")
    p.add_argument("--unit", default="site", choices=["site", "block", "kind", "expert"])
    p.add_argument("--evalset", default="search",
                   help="evaluation set for the scan and the refinement (search: held-out tokens the verification does not score)")
    p.add_argument("--verify-evalset", default="standard", help="evaluation set for the verification")
    p.add_argument("--refine", type=int, default=1,
                   help="rounds of refinement on measured KL after the solver (0: the solver's plan as it is)")
    p.add_argument("--compare", default="", help="uniform formats to verify beside the auto plan (labels)")
    p.add_argument("--out", default=None, help="write the chosen recipe to this JSON file")
    p.set_defaults(func=run_autoplan)


def _progress(label_: str):
    last = [0.0]

    def cb(i: int, n: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 2 or i == n:
            print(f"\r{label_}: {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)
            last[0] = now
    return cb


def _load(args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(args.model, dtype=args.dtype)


def run_sensitivity(args) -> dict[str, Any]:
    group: int | str = int(args.group) if args.group.isdigit() else args.group
    formats = parse_formats(args.bits, group=group, clip=args.clip)
    loaded = _load(args)
    site_list = list_sites(loaded.model)
    table = sensitivity(loaded.model, loaded.tokenizer, site_list, formats, args.unit, args.evalset,
                        progress=None if args.json else _progress("sensitivity"))
    out = table.to_dict()
    out["model"] = loaded.name
    if not args.json:
        labels = [label(f) for f in formats]
        print(f"{'unit':<48} " + " ".join(f"{x:>16}" for x in labels))
        for r in out["rows"]:
            print(f"{r['unit']:<48} " + " ".join(f"{r['kl'].get(x, float('nan')):>16.5f}" for x in labels))
        print(f"{out['evaluations']} evaluations in {out['seconds']:.1f} s")
    return out


def default_formats(site_list, target_bpw: float | None, max_bytes: int | None) -> str:
    """The default candidates for a budget: int2 (and int3 g256) only when the budget is tight enough."""
    bpw = target_bpw
    if max_bytes is not None:
        params = sum(s.params for s in site_list if not s.keep_default) or 1
        bpw = 8.0 * max_bytes / params
    if bpw is None:
        return LATENCY_FORMATS
    return LOW_BPW_FORMATS if bpw < LOW_BPW_BELOW else DEFAULT_FORMATS


def run_autoplan(args) -> dict[str, Any]:
    if args.refine < 0:
        raise CiuicError(f"--refine {args.refine}: accepted: 0 (none) or a number of rounds")
    if args.formats is not None:
        parse_formats(args.formats)  # a bad label is refused before the model loads
    loaded = _load(args)
    model, tok = loaded.model, loaded.tokenizer
    site_list = list_sites(model)
    formats = parse_formats(args.formats or default_formats(site_list, args.target_bpw, args.max_bytes))
    t0 = time.perf_counter()
    qcache: dict = {}  # quantized (and GPTQ-calibrated) weights, shared by the scan and the refinement
    table = sensitivity(model, tok, site_list, formats, args.unit, args.evalset,
                        progress=None if args.json else _progress("sensitivity"), cache=qcache)
    lat = base_ms = None
    if args.max_latency_ms is not None:
        from ..measure import snapshot

        lat = kernel_latency(site_list, formats)
        base_ms = snapshot(model, tok, "quick", timing=True).decode_ms
    plan, info = allocate(site_list, table, target_bpw=args.target_bpw, max_bytes=args.max_bytes,
                          max_latency_ms=args.max_latency_ms, latency=lat, base_latency_ms=base_ms)
    refined = None
    if args.refine and args.max_latency_ms is None:
        plan, refined = refine(model, tok, site_list, table, info, es=args.evalset, cache=qcache, rounds=args.refine,
                               progress=None if args.json else _progress("refine"))
        info["formats"] = refined["formats"]
        refined = {k: v for k, v in refined.items() if k != "choice"}
    info = {k: v for k, v in info.items() if k not in ("kl", "cost", "choice")}
    qcache.clear()
    plans = {"auto": plan}
    for lab in [x for x in args.compare.split(",") if x]:
        spec: QuantSpec = parse_formats(lab)[0]
        plans[label(spec)] = uniform(site_list, spec)
    measured = verify(model, tok, plans, es=args.verify_evalset, timing=args.max_latency_ms is not None,
                      progress=None if args.json else _progress("verify"))
    if args.out:
        plan.recipe.save(args.out)
    out = {"model": loaded.name, "budget": {"target_bpw": args.target_bpw, "max_bytes": args.max_bytes,
                                            "max_latency_ms": args.max_latency_ms},
           "formats": [label(f) for f in formats], "solver": info, "refined": refined, "measured": measured,
           "recipe": plan.recipe.to_dict(),
           "sensitivity_seconds": table.seconds, "seconds": time.perf_counter() - t0}
    if measured["auto"]["bits_per_weight"] is None:
        raise CiuicError("the chosen plan quantizes nothing")
    if not args.json:
        print(f"auto plan: predicted KL {info['predicted_kl']:.4f}, formats {info['formats']}")
        if refined:
            print(f"  refined on measured KL ({refined['evalset']}): {refined['measured_kl_before']:.4f} -> "
                  f"{refined['measured_kl_after']:.4f} in {refined['evaluations']} evaluations")
        for name, m in measured.items():
            print(f"  {name:<22} bpw {m['bits_per_weight']:.3f}  KL {m['kl']:.4f}  top-1 {m['top1_agreement']:.3f}  "
                  f"ppl {m['perplexity']:.3f}")
        if args.out:
            print(f"recipe written to {args.out}")
    return out
