"""Probe one build of the CUDA kernels on the two large DeepSeek-V3 shapes (for tuning, not a test).

Run by tests/gpu/probe.sh once per variant (each a build with its own CIUIC_NVCC_FLAGS and cache):
checks the build against the reference on random shapes, with every kernel path forced (unless it
is a diagnostic build whose output is meaningless), then times int4 g128 at batch 1, 4, 8 and 16 for
every split-K count of each kernel path (``PROBE_STAGINGS``, default "2 3": the chunked wgemm and the
GEMV; ``PROBE_DTYPES="bf16 fp16"`` times fp16 activations too), beside cuBLAS bf16, torch's int4 kernel and the copy bandwidth of the same run, on weights
rotated beyond L2, and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

from ciuic_lab.kernels.cuda import CUDA
from ciuic_lab.measure.bench_cuda import _Peers, _rel_err, copy_bandwidth, time_calls
from ciuic_lab.quant import QuantSpec, dequantize, quantize
from probe_setup import start

name = sys.argv[1]
diagnostic = "CIUIC_PROBE=" in os.environ.get("CIUIC_NVCC_FLAGS", "")
stagings = [int(s) for s in os.environ.get("PROBE_STAGINGS", "2 3").split()]
batches = [int(s) for s in os.environ.get("PROBE_BATCHES", "1 4 8 16").split()]
dtypes = os.environ.get("PROBE_DTYPES", "bf16").split()  # activations timed: bf16, fp16 (x cast once)
dev, gen = start(7)
out = {"variant": name, "flags": os.environ.get("CIUIC_NVCC_FLAGS", ""), "copy_GBps": copy_bandwidth()}

if not diagnostic:
    worst = 0.0
    for case in range(int(os.environ.get("PROBE_CASES", "60"))):
        r = torch.randint(0, 1 << 30, (10,), generator=gen, device=dev).tolist()
        n, k, m = 1 + r[0] % 700, 1 + r[1] % 1500, 1 + r[2] % 12
        group = (64, 128, 256, "channel")[r[3] % 4]
        scheme = ("asym", "sym")[r[4] % 2]
        dt = (torch.bfloat16, torch.float16)[r[5] % 2]
        spec = QuantSpec(bits=4, scheme=scheme, group=group)
        if not CUDA.supports(spec, "auto", m):
            continue
        w = torch.randn(n, k, device=dev, generator=gen) * (0.5 + r[6] % 5)
        qt = quantize(w, spec)
        p = CUDA.prepare(qt, "auto")
        flat = torch.randn(m * k + 1, device=dev, generator=gen).to(dt)
        x = flat[1:].view(m, k) if r[8] % 4 == 0 else flat[: m * k].view(m, k)  # sometimes 2-byte aligned only
        ref = x.double() @ dequantize(qt, torch.float64).T
        for st in stagings:
            CUDA.splits, CUDA.staging = (0, 1, 2, 3, 5, 16)[r[7] % 6], st
            try:
                y = torch.full((m, n), float("nan"), dtype=dt, device=dev)
                CUDA.linear(x, p, out=y)
            finally:
                CUDA.splits, CUDA.staging = 0, 0
            e = _rel_err(y, ref)
            worst = max(worst, e)
            if not e < (8e-3 if dt == torch.bfloat16 else 2e-3):
                out.setdefault("failures", []).append(dict(n=n, k=k, m=m, group=group, scheme=scheme, dtype=str(dt),
                                                           staging=st, err=e))
    out["worst_rel_err"] = worst

l2 = torch.cuda.get_device_properties(dev).L2_cache_size
rows = []
SPLITS = {2: (1, 2, 3, 4, 6, 8, 12), 3: (0, 1, 2, 3, 4, 6, 8, 9, 12), 1: (1, 2, 3, 4, 6, 8),
          **{st: (0, 1, 2, 3, 4) for st in range(4, 8)}, 8: (0, 2, 3, 4, 5, 6, 8)}
for k, n in ((7168, 18432), (18432, 7168)):
    peers = _Peers(CUDA, k, n, ("int4",), l2, gen)  # the benchmark's weight copies (bf16, tinygemm, ours)
    qt, cps, dense, tg = peers.q["int4"], peers.ours["int4"], peers.dense, peers.tg
    if tg is None:
        raise SystemExit(f"torch's int4 kernel is unavailable: {peers.tg_error}")
    for m in batches:
        x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
        row = {"shape": f"{k}->{n}", "batch": m}
        row["cublas_us"] = time_calls([lambda wi=wi: F.linear(x, wi) for wi in dense], reps=60)["us"]
        row["tinygemm_us"] = time_calls([lambda a=a, b=b: torch.ops.aten._weight_int4pack_mm(x, a, 128, b)
                                         for a, b in tg], reps=60)["us"]
        for st, dt in [(st, dt) for st in stagings for dt in dtypes]:
            xd = x if dt == "bf16" else x.half()
            by = {}
            for s in SPLITS[st]:
                CUDA.splits, CUDA.staging = s, st
                try:
                    by[s] = time_calls([lambda c=c: CUDA.linear(xd, c) for c in cps], reps=60)["us"]
                finally:
                    CUDA.splits, CUDA.staging = 0, 0
            best = min(by, key=by.get)
            row[f"s{st}" + ("" if dt == "bf16" else "_" + dt)] = {"best_splits": best, "best_us": by[best],
                             "pct_copy": 100 * qt.nbytes / by[best] / 1e3 / out["copy_GBps"],
                             "x_cublas": row["cublas_us"] / by[best], "x_tinygemm": row["tinygemm_us"] / by[best],
                             "by_splits": {s: round(v, 1) for s, v in by.items()}}
        rows.append(row)
    del peers, cps, dense, tg
    torch.cuda.empty_cache()
out["rows"] = rows
print("PROBE " + json.dumps(out))
