"""How much of one isolated int4 GEMV launch is its prologue (a probe, not a test).

Run once per build (``tests/gpu/probe.sh`` with ``PROBE_SCRIPT=tests/gpu/probe_prologue.py``). For the
two large DeepSeek-V3 shapes at batch 1, in the GEMV block shape the measurements chose for each
(3 x 3 for 7168->18432, 2 x 7 for 18432->7168), after checking the build on random shapes:

- ``iso``: the benchmark's isolated timing (``time_calls``: events around every call over weight
  copies that miss the L2, the GPU kept ahead of the host);
- ``hot_x``: the same, with x read by a small copy kernel before each start event, so that x is in L2
  when the launch starts (as it is in a decode step, where the kernel before wrote it) while the
  weights still come from device memory;
- ``touch``: the same small copy before each start event, of a buffer that is not x (the control);
- ``chained``: back to back in one CUDA graph (``time_chain``).

The first build also times empty grids between two events (the floor of any launch). Prints one JSON
line "PROLOGUE {...}".
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

from ciuic_lab.kernels.cuda import CUDA, STAGE_GEMV_RS
from ciuic_lab.measure.bench_cuda import _Peers, _rel_err, copy_bandwidth, time_calls, time_chain
from ciuic_lab.quant import QuantSpec, dequantize, quantize
from probe_setup import start

name = sys.argv[1] if len(sys.argv) > 1 else "base"
dev, gen = start(7)
out = {"variant": name, "flags": os.environ.get("CIUIC_NVCC_FLAGS", ""), "copy_GBps": copy_bandwidth()}
SHAPES = {(7168, 18432): STAGE_GEMV_RS[(3, 3)], (18432, 7168): STAGE_GEMV_RS[(2, 7)]}

# correctness of the build: random odd shapes through both block shapes, outputs poisoned
worst, fails = 0.0, []
for case in range(int(os.environ.get("PROBE_CASES", "24"))):
    r = torch.randint(0, 1 << 30, (6,), generator=gen, device=dev).tolist()
    n, k, m = 1 + r[0] % 900, 64 + r[1] % 3000, 1 + r[2] % 4
    spec = QuantSpec(bits=4, scheme=("asym", "sym")[r[3] % 2], group=(128, 256)[r[4] % 2])
    dt = (torch.bfloat16, torch.float16)[r[5] % 2]
    qt = quantize(torch.randn(n, k, device=dev, generator=gen), spec)
    p = CUDA.prepare(qt, "auto")
    x = torch.randn(m, k, device=dev, generator=gen).to(dt)
    ref = x.double() @ dequantize(qt, torch.float64).T
    for st in SHAPES.values():
        CUDA.staging = st
        try:
            y = torch.full((m, n), float("nan"), dtype=dt, device=dev)
            CUDA.linear(x, p, out=y)
        finally:
            CUDA.staging = 0
        e = _rel_err(y, ref)
        worst = max(worst, e)
        if not e < 8e-3:
            fails.append(dict(n=n, k=k, m=m, staging=st, err=e))
out.update(worst_rel_err=worst, failures=fails)


def timed_with_touch(fns, src: torch.Tensor, reps: int = 200) -> float:
    """Median event time of each call, a copy of ``src`` (into a scratch buffer) queued before each
    start event: the copy runs outside the timed region, and what it read is in L2 when the call starts."""
    dst = torch.empty_like(src)
    for f in fns[:4]:
        f()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda._sleep(int(2.0e9 * 0.05))
    for i, (a, b) in enumerate(ev):
        dst.copy_(src)
        a.record()
        fns[i % len(fns)]()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3


l2 = torch.cuda.get_device_properties(dev).L2_cache_size
rows = []
for (k, n), st in SHAPES.items():
    peers = _Peers(CUDA, k, n, ("int4",), l2, gen)
    cps, nbytes = peers.ours["int4"], peers.q["int4"].nbytes
    x = torch.randn(1, k, device=dev, generator=gen).to(torch.bfloat16)
    other = torch.randn(1, k, device=dev, generator=gen).to(torch.bfloat16)
    CUDA.staging = st
    try:
        fns = [lambda c=c: CUDA.linear(x, c) for c in cps]
        row = {"shape": f"{k}->{n}", "staging": st, "bytes": nbytes}
        for rnd in range(2):  # two rounds: the spread between them is the noise
            row[f"iso{rnd}"] = time_calls(fns, reps=200)["us"]
            row[f"hot_x{rnd}"] = timed_with_touch(fns, x)
            row[f"touch{rnd}"] = timed_with_touch(fns, other)
        row["chained"] = time_chain(fns)
    finally:
        CUDA.staging = 0
    for key in list(row):
        if key[:3] in ("iso", "hot", "tou", "cha"):
            row[key + "_pct"] = 100 * nbytes / row[key] / 1e3 / out["copy_GBps"]
    rows.append(row)
    del peers, cps
    torch.cuda.empty_cache()
out["rows"] = rows

if os.environ.get("PROBE_EMPTY", "1") == "1":
    try:
        import cupy as cp

        k_empty = cp.RawKernel(r'extern "C" __global__ void empty(int *p) { extern __shared__ int s[]; '
                               r'if (p && threadIdx.x == 9999) p[0] = s[0]; }', "empty")
        k_empty.max_dynamic_shared_size_bytes = 48 * 1024

        def launcher(grid, block, smem):
            def f():
                with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                    k_empty((grid,), (block,), (0,), shared_mem=smem)
            return f

        out["empty_us"] = {f"{g}x{b}/{s}": time_calls([launcher(g, b, s)], reps=200)["us"]
                           for g, b, s in ((1, 32, 0), (384, 288, 0), (384, 288, 15 * 1024), (1152, 128, 0))}
        out["empty_us"]["torch_sleep0"] = time_calls([lambda: torch.cuda._sleep(0)], reps=200)["us"]
    except Exception as e:  # CuPy missing: the floor is left out
        out["empty_error"] = f"{type(e).__name__}: {e}"[:200]
print("PROLOGUE " + json.dumps(out))
