"""Where a launch's time goes beyond its bytes: a K sweep of int4 GEMV at N = 18432, batch 1 (a probe).

For K in PROBE_KS (default 3584 7168 14336 21504), times cuBLAS bf16, torch's int4 kernel, ours, and a
pure read of as many bytes as our weight (CuPy, 16-byte loads grid-stride, no arithmetic), each

- isolated: CUDA events around every call, the GPU kept ahead of the host (``time_calls``), and
- chained: back to back in one CUDA graph (``time_chain``),

with an empty kernel as the floor of both. A line ``t = a + bytes / bw`` fitted per kernel and method
(``fit_line``) separates the fixed cost of a launch (``a``: start, ramp-up, tail) from its streaming
rate (``bw``, set against the copy bandwidth of the same run); ``bench kernels`` makes the same fit
without the pure read and the empty kernel. Prints one JSON line "FIXED {...}".

    python tests/gpu/probe_fixed.py
    CIUIC_NVCC_FLAGS=-DCIUIC_PROBE=1 PROBE_KERNELS="ciuic_int4" python tests/gpu/probe_fixed.py  # loads only
"""

from __future__ import annotations

import json
import os

import torch

from ciuic_lab.kernels.cuda import CUDA
from ciuic_lab.measure.bench_cuda import _copies, _Peers, copy_bandwidth, fit_line, time_calls, time_chain

try:
    import cupy as cp
except ImportError:  # the pure-read peer is left out
    cp = None

READ_SRC = r"""
extern "C" __global__ void read_all(const uint4 *p, long long n, unsigned *sink) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  unsigned acc = 0;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 w[4];
#pragma unroll
    for (int d = 0; d < 4; ++d)
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(w[d].x), "=r"(w[d].y), "=r"(w[d].z), "=r"(w[d].w) : "l"(p + i + d * stride));
#pragma unroll
    for (int d = 0; d < 4; ++d) acc ^= w[d].x ^ w[d].y ^ w[d].z ^ w[d].w;
  }
  for (; i < n; i += stride) { uint4 v = p[i]; acc ^= v.x ^ v.y ^ v.z ^ v.w; }
  if (acc == 0x9E3779B9u) sink[0] = acc;
}
"""


def main() -> None:
    dev = torch.device("cuda")
    ks = [int(s) for s in os.environ.get("PROBE_KS", "3584 7168 14336 21504").split()]
    n = int(os.environ.get("PROBE_N", "18432"))
    only = os.environ.get("PROBE_KERNELS", "").split()  # e.g. "ciuic_int4 pure_read"; all by default
    diagnostic = "CIUIC_PROBE=" in os.environ.get("CIUIC_NVCC_FLAGS", "")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    copy = copy_bandwidth()
    gen = torch.Generator(device=dev)
    gen.manual_seed(11)
    read = None
    if cp is not None:
        read = cp.RawKernel(READ_SRC, "read_all", options=("-std=c++17",))
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        sink = cp.zeros(4, dtype=cp.uint32)

    def read_call(buf, nv):
        with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            read((sms * 8,), (256,), (buf, cp.int64(nv), sink))

    out = {"copy_GBps": copy, "n": n, "rows": []}
    empty = [lambda: torch.cuda._sleep(0)]
    out["empty_us"] = {"isolated": time_calls(empty, reps=200)["us"], "chained": time_chain(empty)}
    pts: dict[tuple[str, str], list] = {}
    for k in ks:
        peers = _Peers(CUDA, k, n, ("int4",), l2, gen)
        x = torch.randn(1, k, device=dev, generator=gen).to(torch.bfloat16)
        # a CIUIC_PROBE build computes nothing meaningful: its error is not checked
        fns = {name: (calls, nbytes) for name, (calls, nbytes, _) in
               peers.calls(CUDA, x, ("int4",), check=not diagnostic).items()}
        nbytes_q = fns["ciuic_int4"][1]
        if read is not None:
            nv = nbytes_q // 16  # 16-byte vectors
            bufs = [cp.random.randint(0, 1 << 30, size=nv * 4, dtype=cp.uint32) for _ in range(_copies(nbytes_q, l2))]
            fns["pure_read"] = ([lambda b=b: read_call(b, nv) for b in bufs], nv * 16)
        for name, (calls, nbytes) in fns.items():
            if only and name not in only:
                continue
            iso = time_calls(calls, reps=100)["us"]
            try:
                ch = time_chain(calls)
            except Exception as e:  # graph capture refused
                ch = None
                out.setdefault("errors", []).append(f"{name} {k}: {type(e).__name__}: {e}"[:300])
            row = {"k": k, "kernel": name, "bytes": nbytes, "isolated_us": iso, "chained_us": ch,
                   "isolated_pct": 100 * nbytes / iso / 1e3 / copy,
                   "chained_pct": None if ch is None else 100 * nbytes / ch / 1e3 / copy}
            out["rows"].append(row)
            pts.setdefault((name, "isolated"), []).append((nbytes, iso))
            if ch is not None:
                pts.setdefault((name, "chained"), []).append((nbytes, ch))
            print(f"K {k:>6} {name:>14}: isolated {iso:7.1f} us ({row['isolated_pct']:5.1f}%)  chained "
                  f"{'-' if ch is None else f'{ch:7.1f}'} us", flush=True)
        del peers, fns
        torch.cuda.empty_cache()
    out["fits"] = {}
    for (name, how), p in pts.items():
        if len(p) >= 2:
            a, bw = fit_line(p)
            out["fits"][f"{name}/{how}"] = {"fixed_us": a, "stream_GBps": bw, "stream_pct_copy": 100 * bw / copy}
            print(f"fit {name:>14} {how:>8}: fixed {a:5.2f} us, streaming {bw:6.0f} GB/s = {100 * bw / copy:5.1f}% of copy")
    print("FIXED " + json.dumps(out))


if __name__ == "__main__":
    main()
