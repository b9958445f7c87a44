"""``ciuic-lab``: the command line over load -> plan -> apply -> measure.

Every subcommand takes ``--json`` and then prints exactly one JSON object on stdout. A bad recipe, an
unknown model or a missing file exits with status 2 and one line on stderr naming what was wrong and
what is accepted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable

from .errors import CiuicError

EXIT_USER = 2


def default_model() -> str:
    from .models import embedded_names

    return "tiny-deepseek" if "tiny-deepseek" in embedded_names() else "tiny-deepseek-random"


# ------------------------------------------------------------------ output helpers
def _clean(o: Any) -> Any:
    if isinstance(o, float):
        return None if math.isnan(o) or math.isinf(o) else o
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(_clean(obj), indent=2, default=str) + "\n")


def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e6:.2f} MB"


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def format_report(rep: dict[str, Any], title: str) -> str:
    """The comparison as a readable table with the texts side by side."""
    lines = [title, "=" * len(title)]
    rows = [("metric", "before", "after")]
    p, lat, tps = rep["perplexity"], rep["latency_ms"], rep["tokens_per_s"]
    wb = rep.get("weight_bytes", {})
    qs = rep.get("quantized_sites", {})
    rows += [
        ("perplexity (held-out)", _f(p["before"]), _f(p["after"]) + f"  ({100 * p['change']:+.2f}%)"),
        ("KL(base || cand), mean", "0", _f(rep["kl"], ".5f")),
        ("top-1 agreement", "1.000", _f(rep["top1_agreement"])),
        ("weight bytes (all sites)", _mb(wb.get("before")), _mb(wb.get("after"))),
        ("bits per weight (quantized sites)", _f(qs.get("bits_per_weight_loaded"), ".4g"), _f(qs.get("bits_per_weight"), ".2f")),
        (f"prefill {lat['prefill']['tokens']} tokens (ms)", _f(lat["prefill"]["before"], ".1f"), _f(lat["prefill"]["after"], ".1f")),
        ("decode per token (ms)", _f(lat["decode"]["before"], ".2f"), _f(lat["decode"]["after"], ".2f")),
        ("decode tokens/s", _f(tps["before"], ".1f"), _f(tps["after"], ".1f")),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for i, r in enumerate(rows):
        lines.append(f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]}")
        if i == 0:
            lines.append("-" * (w0 + w1 + 24))
    if qs.get("ratio_vs_bf16") is not None:
        lines.append(f"quantized sites: {qs['count']}, {_mb(qs['after'])} vs {_mb(qs['bf16'])} in bf16 "
                     f"({qs['ratio_vs_bf16']:.3f}x)")
    text = rep["text"]
    for i, prompt in enumerate(text["prompts"]):
        lines.append("")
        div = rep["first_divergence"][i]
        same = "identical" if div is None else f"first differs at token {div}"
        lines.append(f"--- prompt {i + 1}: {prompt!r}  ({same})")
        lines.append(f"  before | {_one_line(prompt + text['before'][i])}")
        lines.append(f"  after  | {_one_line(prompt + text['after'][i])}")
    return "\n".join(lines)


def _one_line(s: str, width: int = 110) -> str:
    s = s.replace("\n", "\u23ce ")
    return s if len(s) <= width else s[: width - 1] + "\u2026"


# ------------------------------------------------------------------ commands
def cmd_info(args) -> dict[str, Any]:
    from .kernels import REGISTRY
    from .kernels.compat import report

    info = report()
    info["backends"] = REGISTRY.status()
    if not args.json:
        _print_info(info)
    return info


def _print_info(info: dict[str, Any]) -> None:
    for key, val in info.items():
        if isinstance(val, dict):
            print(f"{key}:")
            for k, v in val.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {val}")


def _load(args):
    from .models import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load(args.model, dtype=getattr(args, "dtype", None), device=getattr(args, "device", "cpu"),
                      trust_remote_code=getattr(args, "trust_remote_code", False))
    return loaded


def cmd_layers(args) -> dict[str, Any]:
    from .models import describe
    from .sites import sites

    loaded = _load(args)
    site_list = sites(loaded.model)
    out = {"model": describe(loaded), "sites": [s.to_dict() for s in site_list]}
    if not args.json:
        print(f"{loaded.name}: {loaded.family}, {len(site_list)} sites")
        print(f"{'name':<52} {'kind':<20} {'block':>5} {'shape':>14} {'params':>10}  default")
        for s in site_list:
            shape = "x".join(map(str, s.shape))
            print(f"{s.name:<52} {s.kind:<20} {'' if s.block is None else s.block:>5} {shape:>14} {s.params:>10}  "
                  f"{'keep' if s.keep_default else 'quantizable'}")
    return out


def _check_device(device: str) -> None:
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CiuicError(f"device {device!r} is not supported; accepted: cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CiuicError(f"device {device!r} asked for, but this machine has no CUDA GPU; accepted here: cpu")


def cmd_apply(args, title: str | None = None) -> dict[str, Any]:
    from .models import describe
    from .optimize import evaluate_plan
    from .recipe import load as load_recipe

    _check_device(args.device)
    recipe = load_recipe(args.recipe)  # fail fast, before loading the model
    loaded = _load(args)
    t0 = time.perf_counter()
    plan, rep = evaluate_plan(loaded.model, loaded.tokenizer, recipe, args.evalset, timing=not args.no_timing)
    rep["model"] = describe(loaded)
    rep["recipe"] = recipe.to_dict()
    rep["device"] = args.device
    rep["seconds"] = time.perf_counter() - t0
    from .transforms import backends_in_use, describe as describe_applied

    applied = describe_applied(loaded.model)
    rep["fusions"] = applied["fusions"]
    rep["layouts"] = applied["layouts"]
    rep["kv_cache"] = applied["kv_cache"]
    rep["kv_cache_bytes"] = applied.get("kv_cache_bytes")
    used = backends_in_use(loaded.model)
    rep["backends"] = {b: sum(1 for v in used.values() if v == b) for b in sorted(set(used.values()))}
    if not args.json:
        print(format_report(rep, title or f"{loaded.name}: {recipe.name} vs as loaded ({args.device})"))
        if loaded.random_weights:
            print("\nnote: random weights: the texts are noise on both sides; the metrics still show the error.")
    return rep


def cmd_demo(args) -> dict[str, Any]:
    args.recipe = "mixed"
    return cmd_apply(args, title=f"Ciuic Lab demo: {args.model} with the 'mixed' plan (attention int8, "
                                 f"MLPs and experts int4 g128) vs as loaded")


def cmd_bench(args) -> dict[str, Any]:
    from . import bench

    return bench.run(args)


# ------------------------------------------------------------------ parser
def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    if model:
        p.add_argument("--model", default=None, help="embedded name (tiny-deepseek, tiny-deepseek-random), "
                                                     "local directory, or hub id")
        p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the checkpoint's; fp32 for "
                                                     "embedded models)")
        p.add_argument("--trust-remote-code", action="store_true", help="run the model's own Python code (off by default)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ciuic-lab", description="Per-layer quantization workbench for DeepSeek and "
                                                               "Hugging Face causal LMs.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="this machine: CPU features, GPU, nvcc, kernel backends")
    _common(p, model=False)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("layers", help="the sites (changeable weights) of a model")
    _common(p)
    p.set_defaults(func=cmd_layers)

    for name, func, hlp in (("apply", cmd_apply, "apply a recipe and compare with the model as loaded"),
                            ("demo", cmd_demo, "the main demo: the embedded model with the 'mixed' plan")):
        p = sub.add_parser(name, help=hlp)
        _common(p)
        if name == "apply":
            p.add_argument("--recipe", required=True, help="a preset (int8, int4, int4-g128, mixed, fp8, ...) or a JSON file")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--evalset", default="standard", help="standard, quick or tiny")
        p.add_argument("--no-timing", action="store_true", help="skip latency measurements")
        p.set_defaults(func=func)

    from . import bench
    from .search.cli import add_parsers as add_search

    from .export import cli as export_cli

    bench.add_parser(sub, _common)
    add_search(sub, _common)
    export_cli.add_parser(sub, _common)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model", "x") is None:
        args.model = default_model()
    func: Callable = args.func
    try:
        out = func(args)
    except CiuicError as e:
        print(f"ciuic-lab: error: {e}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("ciuic-lab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CIUIC_DEBUG"):
            raise
        print(f"ciuic-lab: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(set CIUIC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    if args.json:
        emit_json(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
