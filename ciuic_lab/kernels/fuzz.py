"""Kernel fuzzing: every available backend against the torch reference on random shapes and formats.

    python -m ciuic_lab.kernels.fuzz --cases 500 --json          # every backend this machine has
    python -m ciuic_lab.kernels.fuzz --backend cuda --cases 500

Each case draws a format (bits, scheme, group or fp8 block), a layout the backend reads, a weight
``[N, K]`` with odd and unaligned sizes (some columns wider, as real weights have), a batch of 1-33
activations in a dtype the backend takes, and sometimes a bias. The backend's output is compared with
``x @ dequantize(W).T`` computed in float64 from the same (rounded) activations; the bound is relative
(Frobenius) and depends only on the output dtype: the kernels differ from the reference in summation
order and in the final rounding, never in the codes. Cases a backend does not support are drawn again,
so the counts are of cases actually run. The seed is in the report and in every failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import KernelError
from ..quant import QuantSpec, dequantize, quantize
from . import REGISTRY

# relative Frobenius error bounds by output dtype (fp32 accumulation everywhere). fp32: the CPU GEMV
# folds the zero point out of the sum (s * sum q*x - z*s * sum x), and with a tensor-wide int2 group
# the two terms nearly cancel: up to 1.4e-5 seen (2 of ~900 fp32 cases; a plain fp32 product of the
# same operands: 5e-8), so the bound is 5e-5, still 160x under bf16's and 200x under a 1% error.
TOL = {torch.float32: 5e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}
GROUPS = (32, 64, 128, 256, "channel", "tensor")
BITS = (2, 3, 4, 5, 6, 8)


@dataclass
class FuzzReport:
    backend: str
    seed: int
    cases: int = 0
    failures: list[str] = field(default_factory=list)
    worst: float = 0.0
    by_format: dict[str, int] = field(default_factory=dict)
    by_layout: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "seed": self.seed, "cases": self.cases, "failed": len(self.failures),
                "failures": self.failures[:20], "worst_rel_err": self.worst, "by_format": self.by_format,
                "by_layout": self.by_layout, "seconds": round(self.seconds, 2)}


def _draw_spec(rng: np.random.Generator, groups=GROUPS) -> QuantSpec:
    if rng.random() < 0.12:
        return QuantSpec(bits=8, format="fp8_e4m3", scheme="sym", group=128)
    bits = int(rng.choice(BITS))
    scheme = ("asym", "sym")[int(rng.integers(2))]
    group = groups[int(rng.integers(len(groups)))]
    return QuantSpec(bits=bits, scheme=scheme, group=group)


def _draw_case(backend, rng: np.random.Generator, device: str, groups=GROUPS):
    """A (spec, layout, n, k, m, dtype, bias) the backend supports; drawn again until it does."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if device == "cpu" else (torch.bfloat16, torch.float16)
    for _ in range(1000):
        spec = _draw_spec(rng, groups)
        layout = backend.layouts[int(rng.integers(len(backend.layouts)))]
        m = int(rng.integers(1, 34))
        if not backend.supports(spec, layout, m):
            continue
        g = spec.group if isinstance(spec.group, int) else 64
        n = int(rng.integers(1, 96)) * 2 + 1 if rng.random() < 0.7 else int(rng.integers(1, 300))
        k = int(rng.integers(1, 6)) * g + int(rng.integers(0, g))
        k = max(k, 1) if device == "cpu" else max(k, 8)
        if device != "cpu":
            k += (-k) % 8  # the CUDA kernels take rows of whole 16-byte vectors of activations
        dtype = dtypes[int(rng.integers(len(dtypes)))]
        bias = rng.random() < 0.3
        return spec, layout, n, k, m, dtype, bias
    raise KernelError(f"backend {backend.name!r} supports none of the drawn formats and layouts")


def fuzz_backend(name: str, cases: int = 500, seed: int | None = None, groups=None) -> FuzzReport:
    """Run ``cases`` random cases of backend ``name`` against the reference; collect failures, never raise.

    ``groups``: the group sizes to draw from (default: all of ``GROUPS``). Each group size is its own
    compiled kernel for the Numba backend, so fewer of them is a faster first run on a cold cache."""
    groups = tuple(groups) if groups else GROUPS
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise KernelError(f"fuzz groups {bad} are not drawn; accepted: {', '.join(map(str, GROUPS))}")
    backend = REGISTRY.get(name)
    ok, why = backend.available()
    if not ok:
        raise KernelError(f"backend {name!r} is not available here: {why}")
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    rng = np.random.default_rng(seed)
    device = "cuda" if backend.device == "cuda" else "cpu"
    rep = FuzzReport(name, seed)
    t0 = time.perf_counter()
    for i in range(cases):
        spec, layout, n, k, m, dtype, has_bias = _draw_case(backend, rng, device, groups)
        what = f"case {i}: {spec.label()} layout={layout} N={n} K={k} M={m} {str(dtype)[6:]} bias={has_bias}"
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        w = torch.randn(n, k, generator=gen) * 0.05
        w[:, : max(1, k // 17)] *= 4.0
        x = torch.randn(m, k, generator=gen).to(dtype)
        bias = (torch.randn(n, generator=gen) * 0.1).to(dtype) if has_bias else None
        try:
            qt = quantize(w, spec)
            ref = x.double() @ dequantize(qt, torch.float64).T
            if bias is not None:
                ref = ref + bias.double()
            if device != "cpu":
                qt = qt.to(device)
                x, bias = x.to(device), None if bias is None else bias.to(device)
            y = backend.linear(x, backend.prepare(qt, layout), bias)
            y = y.double().cpu()
            err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
            if not torch.isfinite(y).all() or tuple(y.shape) != (m, n) or not err <= TOL[dtype]:
                rep.failures.append(f"{what}: rel err {err:.3g} > {TOL[dtype]:g} or bad shape {tuple(y.shape)}")
            rep.worst = max(rep.worst, err if np.isfinite(err) else float("inf"))
        except Exception as e:  # a crash is a failure of the case, reported with the case
            rep.failures.append(f"{what}: {type(e).__name__}: {e}")
        rep.cases += 1
        fmt = spec.label().split(" ")[0]
        rep.by_format[fmt] = rep.by_format.get(fmt, 0) + 1
        rep.by_layout[layout] = rep.by_layout.get(layout, 0) + 1
    rep.seconds = time.perf_counter() - t0
    return rep


def available_backends() -> list[str]:
    """Every available backend but the reference itself (the oracle is not fuzzed against itself)."""
    return [n for n, b in REGISTRY.backends.items() if n != "torch" and b.available()[0]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ciuic_lab.kernels.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", action="append", help="backend name (repeatable); default: every available one")
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--groups", help="comma-separated group sizes to draw from (default: all: "
                    + ",".join(map(str, GROUPS)) + ")")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    names = a.backend or available_backends()
    groups = None
    if a.groups:
        groups = [int(g) if g.strip().isdigit() else g.strip() for g in a.groups.split(",") if g.strip()]
    reports = [fuzz_backend(n, a.cases, a.seed, groups) for n in names]
    if a.json:
        print(json.dumps([r.as_dict() for r in reports], indent=1))
    else:
        for r in reports:
            print(f"{r.backend}: {r.cases} cases, {len(r.failures)} failed, worst rel err {r.worst:.2e}, "
                  f"{r.seconds:.1f} s (seed {r.seed})")
            for f in r.failures[:10]:
                print("  ", f)
    return 1 if any(r.failures for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
