"""Probe one build of the CUDA kernels on the two large DeepSeek-V3 shapes (for tuning, not a test).

Run by tests/gpu/probe.sh once per variant (each a build with its own CIUIC_NVCC_FLAGS and cache):
checks the build against the reference on random shapes (unless it is a diagnostic build whose
output is meaningless), then times int4 g128 at batch 1, 4 and 16 for every split-K count, on
weights rotated beyond L2, and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from ciuic_lab.kernels.cuda import CUDA, LIBRARY, build
from ciuic_lab.measure.bench_cuda import _copies, _rel_err, copy_bandwidth, time_calls
from ciuic_lab.quant import QuantSpec, dequantize, quantize

name = sys.argv[1]
diagnostic = "CIUIC_PROBE=" in os.environ.get("CIUIC_NVCC_FLAGS", "")
build()
LIBRARY.get()
dev = torch.device("cuda")
gen = torch.Generator(device=dev)
gen.manual_seed(int(os.environ.get("CIUIC_SEED", "7")))
out = {"variant": name, "flags": os.environ.get("CIUIC_NVCC_FLAGS", ""), "copy_GBps": copy_bandwidth()}

if not diagnostic:
    worst = 0.0
    for case in range(40):
        r = torch.randint(0, 1 << 30, (8,), generator=gen, device=dev).tolist()
        n, k, m = 1 + r[0] % 700, 1 + r[1] % 1500, 1 + r[2] % 33
        group = (64, 128, 256, "channel")[r[3] % 4]
        scheme = ("asym", "sym")[r[4] % 2]
        dt = (torch.bfloat16, torch.float16)[r[5] % 2]
        spec = QuantSpec(bits=4, scheme=scheme, group=group)
        if not CUDA.supports(spec, "auto", m):
            continue
        w = torch.randn(n, k, device=dev, generator=gen) * (0.5 + r[6] % 5)
        qt = quantize(w, spec)
        x = torch.randn(m, k, device=dev, generator=gen).to(dt)
        ref = x.double() @ dequantize(qt, torch.float64).T
        y = torch.full((m, n), float("nan"), dtype=dt, device=dev)
        CUDA.linear(x, CUDA.prepare(qt, "auto"), out=y)
        e = _rel_err(y, ref)
        worst = max(worst, e)
        if not e < (8e-3 if dt == torch.bfloat16 else 2e-3):
            out.setdefault("failures", []).append(dict(n=n, k=k, m=m, group=group, scheme=scheme, dtype=str(dt), err=e))
    out["worst_rel_err"] = worst

l2 = torch.cuda.get_device_properties(dev).L2_cache_size
rows = []
for k, n in ((7168, 18432), (18432, 7168)):
    w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
    qt = quantize(w, QuantSpec(bits=4, scheme="asym", group=128))
    p0 = CUDA.prepare(qt, "auto")
    cps = [p0] + [p0.clone() for _ in range(_copies(p0.nbytes, l2) - 1)]
    for m in (1, 4, 16):
        x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
        by = {}
        for s in (1, 2, 3, 4, 6, 8, 12):
            CUDA.splits, CUDA.staging = s, 2
            try:
                by[s] = time_calls([lambda c=c: CUDA.linear(x, c) for c in cps], reps=60)["us"]
            finally:
                CUDA.splits, CUDA.staging = 0, 0
        best = min(by, key=by.get)
        rows.append({"shape": f"{k}->{n}", "batch": m, "best_splits": best, "best_us": by[best],
                     "pct_copy": 100 * qt.nbytes / by[best] / 1e3 / out["copy_GBps"],
                     "by_splits": {s: round(v, 1) for s, v in by.items()}})
out["rows"] = rows
print("PROBE " + json.dumps(out))
