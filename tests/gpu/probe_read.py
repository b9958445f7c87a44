"""How fast can the int4 tiles of a 7168->18432 weight be read, by access pattern? (a probe, not a test)

Pure read kernels (CuPy, no arithmetic but an XOR that keeps the loads) over the cuda_i4x16 layout
of one weight (1152 row tiles x 112 K tiles of 512 bytes), rotated over copies beyond L2, beside the
device-to-device copy bandwidth of the same run:

- warp: each warp streams its own row tile along a K range (split over grid.y), DEPTH tiles ahead;
  blocks of 4 warps (the GEMV's shape);
- inter<U>: a block of 4 warps takes one row tile and a K range; warp j reads the units of U tiles
  j, j + 4, ... so that the block's loads in flight are adjacent in memory;
- linear: every thread reads 16-byte vectors grid-stride over the whole array (the ideal).

    python tests/gpu/probe_read.py      # prints one line per pattern and a JSON line "READ {...}"
"""

from __future__ import annotations

import json
import statistics

import cupy as cp

SRC = r"""
__device__ __forceinline__ uint4 ld(const uint4 *p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
extern "C" __global__ void spin(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
}
extern "C" __global__ void warp_stream(const uint4 *p, int nt, int kt, int tps, unsigned *sink) {
  extern __shared__ unsigned char pad[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rt = blockIdx.x * 4 + warp;
  if (rt >= nt) return;
  const int k0 = blockIdx.y * tps, k1 = min(kt, k0 + tps), n = k1 - k0;
  const uint4 *b = p + ((size_t)rt * kt + k0) * 32 + lane;
  unsigned acc = 0;
  uint4 w[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) w[d] = d < n ? ld(b + d * 32) : make_uint4(0, 0, 0, 0);
  for (int i = 0; i < n; i += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      acc ^= w[d].x ^ w[d].y ^ w[d].z ^ w[d].w;
      if (i + d + DEPTH < n) w[d] = ld(b + (i + d + DEPTH) * 32);
    }
  }
  if (acc == 0x9E3779B9u) sink[0] = acc + pad[0];
}
extern "C" __global__ void inter(const uint4 *p, int nt, int kt, int tps, int unit, unsigned *sink) {
  extern __shared__ unsigned char pad[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rt = blockIdx.x;
  const int k0 = blockIdx.y * tps, k1 = min(kt, k0 + tps);
  const uint4 *b = p + (size_t)rt * kt * 32 + lane;
  unsigned acc = 0;
  // the warp's tiles: k0 + unit * (warp + 4 j) + u, u < unit
  const int step = 4 * unit;
  uint4 w[DEPTH];
  int kk[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) {
    const int j = d / unit, u = d % unit;
    kk[d] = k0 + unit * warp + j * step + u;
    w[d] = kk[d] < k1 ? ld(b + kk[d] * 32) : make_uint4(0, 0, 0, 0);
  }
  const int adv = (DEPTH / unit) * step;
  for (int base = 0; base < tps; base += adv) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      if (kk[d] < k1) acc ^= w[d].x ^ w[d].y ^ w[d].z ^ w[d].w;
      kk[d] += adv;
      if (kk[d] < k1) w[d] = ld(b + kk[d] * 32);
    }
  }
  if (acc == 0x9E3779B9u) sink[0] = acc + pad[0];
}
extern "C" __global__ void linear(const uint4 *p, long long n, unsigned *sink) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  unsigned acc = 0;
  for (; i + (DEPTH - 1) * stride < n; i += DEPTH * stride) {
    uint4 w[DEPTH];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) w[d] = ld(p + i + d * stride);
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) acc ^= w[d].x ^ w[d].y ^ w[d].z ^ w[d].w;
  }
  for (; i < n; i += stride) { uint4 v = ld(p + i); acc ^= v.x ^ v.y ^ v.z ^ v.w; }
  if (acc == 0x9E3779B9u) sink[0] = acc;
}
"""

NT, KT = 1152, 112
SMS = cp.cuda.Device().attributes["MultiProcessorCount"]
mods = {d: cp.RawModule(code=SRC, options=("-std=c++17", f"-DDEPTH={d}")) for d in (1, 2, 4, 8)}
bufs = [cp.random.randint(0, 1 << 30, size=NT * KT * 128, dtype=cp.uint32) for _ in range(4)]
nbytes = bufs[0].nbytes
sink = cp.zeros(4, dtype=cp.uint32)


def timed(launch, reps=40) -> float:
    for i in range(5):
        launch(bufs[i % len(bufs)])
    cp.cuda.Device().synchronize()
    ev = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(reps)]
    mods[1].get_function("spin")((1,), (1,), (cp.int64(int(2e9 * 0.02)),))
    for i, (a, b) in enumerate(ev):
        a.record()
        launch(bufs[i % len(bufs)])
        b.record()
    cp.cuda.Device().synchronize()
    return statistics.median(cp.cuda.get_elapsed_time(a, b) * 1e3 for a, b in ev)


big = cp.empty(1 << 30, dtype=cp.uint8)
big2 = cp.empty_like(big)
copy_us = timed(lambda _: big2.__setitem__(slice(None), big), reps=10)
copy_gbs = 2 * big.nbytes / copy_us / 1e3
del big, big2
res = {"copy_GBps": copy_gbs, "bytes": nbytes, "rows": []}


def report(name, us):
    pct = 100 * nbytes / us / 1e3 / copy_gbs
    res["rows"].append({"pattern": name, "us": round(us, 2), "pct_copy": round(pct, 1)})
    print(f"{name:>28} {us:7.2f} us {pct:5.1f}% of copy", flush=True)


for d in (1, 2, 4, 8):
    f = mods[d].get_function("linear")
    for blocks_per_sm in (4, 8, 16):
        report(f"linear d{d} {blocks_per_sm}x256/SM",
               timed(lambda b: f((SMS * blocks_per_sm,), (256,), (b, cp.int64(b.size // 4), sink))))
for d in (1, 2, 4, 8):
    f = mods[d].get_function("warp_stream")
    for splits in (2, 3, 4, 6):
        for smem in (0, 26 * 1024):
            tps = (KT + splits - 1) // splits
            report(f"warp d{d} s{splits} smem{smem // 1024}",
                   timed(lambda b: f((NT // 4, splits), (128,), (b, NT, KT, tps, sink), shared_mem=smem)))
for d in (2, 4, 8):
    f = mods[d].get_function("inter")
    for unit in (1, 2):
        if d % unit:
            continue
        for splits in (1, 2, 4):
            for smem in (0, 26 * 1024):
                tps = (KT + splits - 1) // splits
                report(f"inter{unit} d{d} s{splits} smem{smem // 1024}",
                       timed(lambda b: f((NT, splits), (128,), (b, NT, KT, tps, unit, sink), shared_mem=smem)))
print("READ " + json.dumps(res))
