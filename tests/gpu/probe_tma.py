"""The int4 GEMV with its codes fed by the bulk copy engine (tests/gpu/tma_gemv.cu) against the kept
GEMV, batch 1 (a probe, not a test; sm_90).

Builds the probe kernel with nvcc for a few consumer-warp counts, checks it against the fp64
reference and against the library's kernel on random shapes (K a multiple of 256, rows split between
blocks or not; outputs poisoned; two runs bit for bit), then times it on the two large DeepSeek-V3
shapes beside the library's own plan, isolated (``time_calls``, weights rotated over copies beyond
L2), for several ring depths. Prints a table and one JSON line "TMA {...}".

    python tests/gpu/probe_tma.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile

import cupy as cp
import numpy as np
import torch

from ciuic_lab.kernels.cuda import CUDA, LIBRARY, build, find_nvcc, native_dir
from ciuic_lab.measure.bench_cuda import _Peers, _rel_err, copy_bandwidth, time_calls
from ciuic_lab.quant import QuantSpec, dequantize, quantize

HERE = os.path.dirname(os.path.abspath(__file__))
# builds: consumer warps, bodies ahead whose scale and zero pairs are in flight, those pairs loaded past L1
BUILDS = [tuple(int(a) for a in v.split(":")) for v in os.environ.get("PROBE_VARIANTS", "16:4:0 16:4:1 20:4:1").split()]
build()
LIBRARY.get()
dev = torch.device("cuda")
props = torch.cuda.get_device_properties(dev)
SMS, L2 = props.multi_processor_count, props.L2_cache_size
SMEM_MAX = cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
tmp = tempfile.mkdtemp()
funcs = {}
for nc, pfb, na in BUILDS:
    out = os.path.join(tmp, f"tma{nc}_{pfb}_{na}.cubin")
    subprocess.run([find_nvcc(), "-O3", "-std=c++17", "-arch=sm_90", "-I", str(native_dir()), f"-DNC={nc}",
                    f"-DPFB={pfb}", f"-DSZ_NA={na}", "-cubin", "-o", out, os.path.join(HERE, "tma_gemv.cu")],
                   check=True)
    funcs[(nc, pfb, na)] = cp.RawModule(path=out).get_function("tma_gemv")


def plan(w, build_, stages: int, per: int | None = None):
    nc = build_[0]
    nt, kt = (w.n + 15) // 16, (w.k + 63) // 64
    total = nt * kt
    per = per or max(kt, math.ceil(total / SMS / 4) * 4)
    nrt = per // kt + 2
    smem = kt * 128 + stages * 4 * nc * 512 + nc * nrt * 16 * 4
    return nt, kt, per, math.ceil(total / per), smem


def launcher(w, x, y, ws, cnt, build_, stages: int, per: int | None = None):
    nc = build_[0]
    nt, kt, per, grid, smem = plan(w, build_, stages, per)
    assert w.k % 256 == 0 and per % 4 == 0 and per >= kt and smem <= SMEM_MAX
    f = funcs[build_]
    f.max_dynamic_shared_size_bytes = smem
    args = tuple(np.uint64(t.data_ptr()) for t in (w.codes, w.scales, w.zeros, x, y, ws, cnt)) + tuple(
        np.int32(v) for v in (w.n, w.k, nt, kt, w.n_groups, per, stages))

    def call():
        with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            f((grid,), ((nc + 1) * 32,), args, shared_mem=smem)
    return call


def buffers(w):
    nt = (w.n + 15) // 16
    return (torch.zeros(nt * 2 * 16, dtype=torch.float32, device=dev),
            torch.zeros(nt, dtype=torch.int32, device=dev))


gen = torch.Generator(device=dev)
gen.manual_seed(int(os.environ.get("CIUIC_SEED", "5")))
res = {"copy_GBps": copy_bandwidth(), "checks": [], "rows": []}
spec = QuantSpec(bits=4, scheme="asym", group=128)
worst = 0.0
for case in range(int(os.environ.get("PROBE_CASES", "8"))):
    r = torch.randint(0, 1 << 30, (4,), generator=gen, device=dev).tolist()
    n, k = 1 + r[0] % 3000, 256 * (1 + r[1] % 24)
    qt = quantize(torch.randn(n, k, device=dev, generator=gen), spec)
    w = CUDA.prepare(qt, "auto")
    x = torch.randn(1, k, device=dev, generator=gen).to(torch.bfloat16)
    ref = x.double() @ dequantize(qt, torch.float64).T
    kept = CUDA.linear(x, w)
    kt = k // 64
    for b in BUILDS:
        if plan(w, b, 3)[4] > SMEM_MAX:
            continue
        for per in (None, kt + 4 * (1 + r[2] % 5)):  # the default split, and one that splits rows
            ws, cnt = buffers(w)
            ys = []
            for _ in range(2):
                y = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device=dev)
                launcher(w, x, y, ws, cnt, b, 3, per)()
                ys.append(y)
            torch.cuda.synchronize()
            e, ek = _rel_err(ys[0], ref), _rel_err(ys[0], kept.double())
            worst = max(worst, e)
            ok = e < 1e-2 and torch.equal(ys[0], ys[1]) and int(cnt.abs().sum()) == 0
            res["checks"].append(dict(n=n, k=k, nc=b[0], pfb=b[1], na=b[2], per=per, err=e, vs_kept=ek, ok=ok))
            if not ok:
                print(f"FAIL n={n} k={k} build={b} per={per} err={e:.3g} vs kept {ek:.3g} "
                      f"same={torch.equal(ys[0], ys[1])} counters={int(cnt.abs().sum())}", flush=True)
res["worst_rel_err"] = worst
print(f"checks: {sum(c['ok'] for c in res['checks'])} of {len(res['checks'])} ok, worst {worst:.2e}", flush=True)

for k, n in ((7168, 18432), (18432, 7168)):
    peers = _Peers(CUDA, k, n, ("int4",), L2, gen)
    cps, nbytes = peers.ours["int4"], peers.q["int4"].nbytes
    x = torch.randn(1, k, device=dev, generator=gen).to(torch.bfloat16)
    kept = [lambda c=c: CUDA.linear(x, c) for c in cps]
    row = {"shape": f"{k}->{n}", "bytes": nbytes, "kept0": time_calls(kept, reps=200)["us"]}
    y = torch.empty(1, n, dtype=torch.bfloat16, device=dev)
    for b in BUILDS:
        for stages in [int(v) for v in os.environ.get("PROBE_STAGES", "2 3 4").split()]:
            if plan(cps[0], b, stages)[4] > SMEM_MAX:
                continue
            bufs = [buffers(c) for c in cps]
            calls = [launcher(c, x, y, *bf, b, stages) for c, bf in zip(cps, bufs)]
            row[f"nc{b[0]}_pf{b[1]}_na{b[2]}_st{stages}"] = time_calls(calls, reps=200)["us"]
    row["kept1"] = time_calls(kept, reps=200)["us"]
    res["rows"].append(row)
    print(row["shape"], " ".join(f"{key} {v:.2f} ({100 * nbytes / v / 1e3 / res['copy_GBps']:.1f}%)"
                                  for key, v in row.items() if key not in ("shape", "bytes")), flush=True)
    del peers, cps
    torch.cuda.empty_cache()
print("TMA " + json.dumps(res))
