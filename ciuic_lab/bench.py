"""``ciuic-lab bench ...``: every performance figure of the project comes from one of these.

- ``bench kernels --device cpu|cuda``: quantized GEMV/GEMM against torch peers in the same run;
- ``bench decode --device cpu|cuda``: end-to-end decode tokens/s, quantized plan vs fp32/bf16;
- ``bench prefill [--dtype bf16]``: one prompt's forward on the CPU, quantized plan vs the model as loaded;
- ``bench fusions``: each fusion's effect on decode/prefill time (and its proof: same tokens), KV-cache bytes;
- ``bench session``: how fast the workbench reacts to a toggle (drives a Session like the panel does);
- ``bench soak``: memory over many random toggles.
"""

from __future__ import annotations

from typing import Any

from .errors import CiuicError

TARGETS = ("kernels", "decode", "prefill", "fusions", "session", "soak")


def add_parser(sub, common) -> None:
    p = sub.add_parser("bench", help="benchmarks: kernels, decode, prefill, fusions, session, soak")
    p.add_argument("target", choices=TARGETS, help="what to benchmark")
    common(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    p.add_argument("--recipe", default=None,
                   help="plan to time, a preset or JSON: decode and prefill default int4-g128 with every "
                        "fusion (int4-g128-fused); fusions default keep")
    p.add_argument("--toggles", type=int, default=None, help="soak: number of random toggles")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run)


def run(args) -> dict[str, Any]:
    target = args.target
    if getattr(args, "threads", None):
        import torch

        if args.threads < 1:
            raise CiuicError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if target == "kernels":
        if args.device == "cpu":
            from .measure.bench_cpu import bench_kernels_cpu

            out = bench_kernels_cpu(quick=args.quick)
        elif args.device.startswith("cuda"):
            from .measure.bench_cuda import bench_kernels_cuda

            out = bench_kernels_cuda(quick=args.quick)
        else:
            raise CiuicError(f"device {args.device!r} is not supported; accepted: cpu, cuda")
    elif target == "decode":
        if args.device.startswith("cuda"):
            from .measure.bench_cuda import bench_decode_cuda

            out = bench_decode_cuda(quick=args.quick, recipe=args.recipe)
        else:
            from .measure.bench_decode import bench_decode

            out = bench_decode(model=args.model, quick=args.quick, recipe=args.recipe)
    elif target == "prefill":
        if args.device != "cpu":
            raise CiuicError(f"bench prefill runs on the CPU; got --device {args.device!r} (accepted: cpu)")
        from .measure.bench_decode import bench_prefill

        out = bench_prefill(model=args.model, quick=args.quick, recipe=args.recipe, dtype=args.dtype)
    elif target == "fusions":
        out = _bench_fusions(args)
    elif target == "session":
        from .session_bench import bench_session

        out = bench_session(model=args.model, quick=args.quick)
    else:
        from .session_bench import bench_soak

        out = bench_soak(model=args.model, toggles=args.toggles, quick=args.quick)
    if not args.json:
        _print_table(out)
    return out


def _print_table(out: dict[str, Any]) -> None:
    rows = out.get("rows")
    for k, v in out.items():
        if k != "rows" and not isinstance(v, (list, dict)):
            print(f"{k}: {v}")
    if rows:
        keys = list(rows[0].keys())
        print("  ".join(keys))
        for r in rows:
            print("  ".join(f"{r.get(k):.3g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys))


def _bench_fusions(args) -> dict[str, Any]:
    import warnings

    from transformers import DeepseekV3Config

    from .measure.fusion_bench import bench_fusions
    from .models import load
    from .transforms.fusions import kv_cache_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load(args.model, dtype=args.dtype or "fp32")
    out = bench_fusions(loaded.model, loaded.tokenizer, args.recipe or "keep", rounds=2 if args.quick else 7,
                        new_tokens=8 if args.quick else 32)
    out["model"] = loaded.name
    out["deepseek_v3_kv_cache"] = kv_cache_report(DeepseekV3Config(), 2)
    return out
