"""How fast can the int4 tiles of a 7168->18432 weight be read, by access pattern? (a probe, not a test)

Pure read kernels (CuPy, no arithmetic but an XOR that keeps the loads) over the cuda_i4x16 layout
of one weight (1152 row tiles x 112 K tiles of 512 bytes), rotated over copies beyond L2, beside the
device-to-device copy bandwidth of the same run:

- warp: each warp streams its own row tile along a K range (split over grid.y), DEPTH tiles ahead;
  blocks of 4 warps (the GEMV's shape);
- inter<U>: a block of 4 warps takes one row tile and a K range; warp j reads the units of U tiles
  j, j + 4, ... so that the block's loads in flight are adjacent in memory;
- linear: every thread reads 16-byte vectors grid-stride over the whole array (the ideal);
- dyn (argument "dyn", then work levels): the warp pattern against persistent warps that take
  (row tile, chunk) items by an atomic ticket and leave partial sums for the row's last item to add,
  with WORK rounds of synthetic integer work per tile (0: loads only);
- guided (argument "guided", then work levels): the same persistent warps, items big first and small
  last, each ticket claimed an item ahead; partials kept (the bound) or added by fire-and-forget atomics.
- bulk (argument "bulk"; sm_90): one persistent block a multiprocessor streams its contiguous share of
  the weight through a ring of shared-memory stages, one warp issuing a `cp.async.bulk` of a whole
  stage (8-32 KB) completing on the stage's mbarrier, the other warps reading each stage (or only
  waiting for it) and releasing it: the copy engine's rate, beside the grid-stride register read.

    python tests/gpu/probe_read.py      # prints one line per pattern and a JSON line "READ {...}"
    python tests/gpu/probe_read.py dyn 0 16  # static against dynamic (ticketed) scheduling, per work level
    python tests/gpu/probe_read.py guided 0 12  # static against guided scheduling (big items, then small)
    python tests/gpu/probe_read.py bulk      # the bulk copy engine's ring against the register read

The fixed cost of a launch against its streaming rate: tests/gpu/probe_fixed.py.
"""

from __future__ import annotations

import json
import statistics
import sys

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
// synthetic work on one tile's words: WORK rounds of 4 independent integer chains (0: none)
__device__ __forceinline__ void burn(const uint4 v, unsigned (&a)[4]) {
#pragma unroll
  for (int r = 0; r < WORK; ++r) {
    a[0] = (a[0] * 0x9E3779B1u) ^ v.x;
    a[1] = (a[1] * 0x85EBCA6Bu) ^ v.y;
    a[2] = (a[2] >> 3) + (v.z ^ r);
    a[3] = __funnelshift_l(a[3], v.w, 5) + a[0];
  }
  a[0] ^= v.x ^ v.y ^ v.z ^ v.w;
}
extern "C" __global__ void warp_stream(const uint4 *p, int nt, int kt, int tps, unsigned *sink) {
  extern __shared__ unsigned char pad[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rt = blockIdx.x * 4 + warp;
  if (rt >= nt) return;
  const int k0 = blockIdx.y * tps, k1 = min(kt, k0 + tps), n = k1 - k0;
  const uint4 *b = p + ((size_t)rt * kt + k0) * 32 + lane;
  unsigned a[4] = {0, 0, 0, 0};
  uint4 w[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) w[d] = d < n ? ld(b + d * 32) : make_uint4(0, 0, 0, 0);
  for (int i = 0; i < n; i += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const uint4 v = w[d];
      if (i + d + DEPTH < n) w[d] = ld(b + (i + d + DEPTH) * 32);
      burn(v, a);
    }
  }
  if ((a[0] ^ a[1] ^ a[2] ^ a[3]) == 0x9E3779B9u) sink[0] = 1 + pad[0];
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
// dynamic: persistent warps take items (row tile, chunk of `chunk` tiles) by ticket; the next item's
// first tiles are loaded while the current one ends; each item leaves a partial (128 bytes), and the
// last item of a row tile (counter) reads the row's partials back, as a split-K reduction would.
// Tickets are base-relative: a launch takes exactly items + warps tickets.
extern "C" __global__ void dyn_work(const uint4 *p, int nt, int kt, int chunk, unsigned *ctr, long long base,
                                    float *part, int *rowctr, unsigned *sink) {
  extern __shared__ unsigned char pad[];
  const int lane = threadIdx.x & 31;
  const int nch = (kt + chunk - 1) / chunk;
  const long long total = (long long)nt * nch;
  auto ticket = [&]() -> long long {
    unsigned t = 0;
    if (lane == 0) t = atomicAdd(ctr, 1u);
    return (long long)__shfl_sync(0xFFFFFFFFu, t, 0) - base;
  };
  long long cur = ticket();
  if (cur >= total) return;
  long long nxt = ticket();
  int rt = (int)(cur / nch), k0 = (int)(cur % nch) * chunk, n = min(kt, k0 + chunk) - k0;
  const uint4 *b = p + ((size_t)rt * kt + k0) * 32 + lane;
  unsigned a[4] = {0, 0, 0, 0};
  uint4 w[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) w[d] = d < n ? ld(b + d * 32) : make_uint4(0, 0, 0, 0);
  while (true) {
    const bool more = nxt < total;
    const int nrt = more ? (int)(nxt / nch) : 0, nk0 = more ? (int)(nxt % nch) * chunk : 0;
    const int nn = more ? min(kt, nk0 + chunk) - nk0 : 0;
    const uint4 *nb = p + ((size_t)nrt * kt + nk0) * 32 + lane;
    for (int i = 0; i < n; i += DEPTH) {
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) {
        const uint4 v = w[d];
        const int j = i + d + DEPTH;
        if (j < n) w[d] = ld(b + j * 32);
        else if (j - n < nn) w[d] = ld(nb + (j - n) * 32);
        burn(v, a);
      }
    }
    part[cur * 32 + lane] = (float)(a[0] ^ a[1]);
    __threadfence();
    int last = 0;
    if (lane == 0) last = atomicAdd(rowctr + rt, 1) == nch - 1;
    if (__shfl_sync(0xFFFFFFFFu, last, 0)) {
      __threadfence();
      float s = 0.0f;
      for (int q = 0; q < nch; ++q) s += __ldcg(part + ((long long)rt * nch + q) * 32 + lane);
      if (lane == 0) rowctr[rt] = 0;
      if (s == 1.2345f) sink[1] = 1;
    }
    if (!more) break;
    cur = nxt;
    rt = nrt;
    b = nb;
    n = nn;
    nxt = ticket();
  }
  if ((a[0] ^ a[1] ^ a[2] ^ a[3]) == 0x9E3779B9u) sink[0] = 1 + pad[0];
}
// guided: persistent warps take items by ticket, big items first and small ones last (NT x hn items
// of hc tiles cover K tiles [0, hn hc), then NT x tn items of c tiles the rest), each ticket claimed one
// item ahead (its atomic is in flight while the item before streams); the first item of each warp
// by its index. PART 0: no
// partial leaves the warp (the bound of what balancing can give); 1: each item adds its 32 partials to
// the output with fire-and-forget atomics (red.global.add.f32, no fence). ctr: this launch's counter.
extern "C" __global__ void guided(const uint4 *p, int nt, int kt, int hn, int hc, int c, unsigned *ctr,
                                  float *out, unsigned *sink) {
  extern __shared__ unsigned char pad[];
  const int lane = threadIdx.x & 31;
  const int h = hn * hc, tn = (kt - h + c - 1) / c;
  const long long nhead = (long long)nt * hn, total = nhead + (long long)nt * tn;
  auto claim = [&]() -> unsigned {
    unsigned t = 0;
    if (lane == 0) t = atomicAdd(ctr, 1u);
    return t;
  };
  auto bcast = [&](unsigned t) -> long long { return (long long)__shfl_sync(0xFFFFFFFFu, t, 0); };
  auto item = [&](long long t, int &rt, int &k0, int &n) {
    if (t < nhead) {
      rt = (int)(t % nt);
      k0 = (int)(t / nt) * hc;
      n = hc;
    } else {
      t -= nhead;
      rt = (int)(t % nt);
      k0 = h + (int)(t / nt) * c;
      n = min(kt, k0 + c) - k0;
    }
  };
  // the first item by warp index, the later ones by ticket (item W + ticket): no warp waits on the
  // counter before its first loads; each ticket is claimed when the item before it starts and read
  // only in that item's last body (item sizes are multiples of DEPTH)
  const long long nw = (long long)gridDim.x * (blockDim.x >> 5);
  long long cur = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (cur >= total) return;
  unsigned tk = claim();
  int rt, k0, n;
  item(cur, rt, k0, n);
  const uint4 *b = p + ((size_t)rt * kt + k0) * 32 + lane;
  unsigned a[4] = {0, 0, 0, 0};
  uint4 w[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) w[d] = ld(b + d * 32);
  while (true) {
    for (int i = 0; i + DEPTH < n; i += DEPTH) {
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) {
        const uint4 v = w[d];
        w[d] = ld(b + (i + d + DEPTH) * 32);
        burn(v, a);
      }
    }
    const long long nxt = nw + bcast(tk);
    const bool more = nxt < total;
    int nrt = 0, nk0 = 0, nn = 0;
    if (more) {
      item(nxt, nrt, nk0, nn);
      tk = claim();
    }
    const uint4 *nb = p + ((size_t)nrt * kt + nk0) * 32 + lane;
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const uint4 v = w[d];
      if (more) w[d] = ld(nb + d * 32);
      burn(v, a);
    }
#if PART == 1
    atomicAdd(out + rt * 32 + lane, (float)(a[0] ^ a[1]));
    a[0] = a[1] = 0;
#endif
    if (!more) break;
    rt = nrt;
    b = nb;
    n = nn;
  }
  if ((a[0] ^ a[1] ^ a[2] ^ a[3]) == 0x9E3779B9u) sink[0] = 1 + pad[0];
}
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned sm32(const void *q) { return (unsigned)__cvta_generic_to_shared(q); }
__device__ __forceinline__ void mb_wait(unsigned long long *b, int ph) {
  unsigned ok = 0;
  while (!ok)
    asm volatile("{ .reg .pred P; mbarrier.try_wait.parity.shared::cta.b64 P, [%1], %2; selp.u32 %0, 1, 0, P; }"
                 : "=r"(ok) : "r"(sm32(b)), "r"(ph) : "memory");
}
// One block a multiprocessor: warp nwc (the last) issues a bulk copy of `chunk` bytes per stage of a
// ring of STAGES; warps 0..nwc-1 wait for each stage, read it (READ) and release it.
extern "C" __global__ void bulk_ring(const unsigned char *p, long long nch, int chunk, unsigned *sink) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) unsigned long long full[STAGES], empty[STAGES];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwc = (blockDim.x >> 5) - 1;
  const long long per = (nch + gridDim.x - 1) / gridDim.x;
  const long long c0 = blockIdx.x * per, c1 = min(nch, c0 + per);
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(sm32(&full[s])) : "memory");
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(sm32(&empty[s])), "r"(nwc) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == nwc) {
    if (lane == 0) {
      for (long long c = c0; c < c1; ++c) {
        const int i = (int)(c - c0), s = i % STAGES, ph = (i / STAGES) & 1;
        if (i >= STAGES) mb_wait(&empty[s], ph ^ 1);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(sm32(&full[s])), "r"(chunk) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(sm32(ring + (size_t)s * chunk)), "l"(p + c * chunk), "r"(chunk), "r"(sm32(&full[s])) : "memory");
      }
    }
    return;
  }
  unsigned acc = 0;
  for (long long c = c0; c < c1; ++c) {
    const int i = (int)(c - c0), s = i % STAGES, ph = (i / STAGES) & 1;
    mb_wait(&full[s], ph);
#if READ
    const uint4 *q = reinterpret_cast<const uint4 *>(ring + (size_t)s * chunk);
    for (int j = warp * 32 + lane; j < chunk / 16; j += nwc * 32) {
      const uint4 v = q[j];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
#endif
    __syncwarp();
    if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(sm32(&empty[s])) : "memory");
  }
  if (acc == 0x9E3779B9u) sink[0] = acc;
}
#endif
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
mods = {d: cp.RawModule(code=SRC, options=("-std=c++17", f"-DDEPTH={d}", "-DWORK=0", "-DPART=0", "-DSTAGES=1", "-DREAD=0"))
        for d in (1, 2, 4, 8)}
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


if sys.argv[1:2] == ["bulk"]:
    # the copy engine: (chunk KB, stages, consumer warps, read), one block a multiprocessor, against the
    # grid-stride register read of the same bytes, in the same run
    lin = mods[4].get_function("linear")
    for rnd in range(2):
        report(f"linear d4 8x256/SM ({rnd})", timed(lambda b: lin((SMS * 8,), (256,), (b, cp.int64(b.size // 4), sink))))
    cap = cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"] - 1024
    for kb, stages, nwc, read in ((16, 12, 8, 1), (16, 12, 8, 0), (32, 6, 8, 1), (8, 24, 8, 1), (16, 12, 4, 1),
                                  (16, 6, 8, 1), (8, 12, 8, 1), (32, 3, 8, 1)):
        chunk = kb * 1024
        if stages * chunk > cap or nbytes % chunk:
            continue
        mod = cp.RawModule(code=SRC, options=("-std=c++17", "-arch=sm_90", "-DDEPTH=1", "-DWORK=0", "-DPART=0",
                                              f"-DSTAGES={stages}", f"-DREAD={read}"))
        f = mod.get_function("bulk_ring")
        f.max_dynamic_shared_size_bytes = stages * chunk
        report(f"bulk {kb}KB x{stages} w{nwc} read{read}",
               timed(lambda b, f=f, chunk=chunk, stages=stages, nwc=nwc:
                     f((SMS,), ((nwc + 1) * 32,), (b, cp.int64(nbytes // chunk), cp.int32(chunk), sink),
                       shared_mem=stages * chunk)))
    print("READ " + json.dumps(res))
    sys.exit(0)

if sys.argv[1:2] == ["guided"]:
    # static against guided dynamic scheduling (big items first, small last), loads only or with
    # synthetic work; 28 resident warps per multiprocessor in both (blocks of 4 warps, 7 by shared memory)
    pad = (cp.cuda.Device().attributes["MaxSharedMemoryPerMultiprocessor"] // 7) - 1024
    warps = SMS * 7 * 4
    out = cp.zeros(NT * 32, dtype=cp.float32)
    plans = [(0, 0, 8), (0, 0, 16), (0, 0, 28), (3, 32, 4), (3, 32, 8), (2, 48, 4)]
    for work in [int(w) for w in sys.argv[2:]] or [0]:
        mods_g = {part: cp.RawModule(code=SRC, options=("-std=c++17", "-DDEPTH=4", f"-DWORK={work}", f"-DPART={part}"))
                  for part in (0, 1)}
        fs = mods_g[0].get_function("warp_stream")
        fs.max_dynamic_shared_size_bytes = pad
        for rep in range(2):
            for splits in (3, 4):
                tps = (KT + splits - 1) // splits
                report(f"static work{work} s{splits}",
                       timed(lambda b: fs((NT // 4, splits), (128,), (b, NT, KT, tps, sink), shared_mem=pad)))
            for part in (0, 1):
                fg = mods_g[part].get_function("guided")
                fg.max_dynamic_shared_size_bytes = pad
                for hn, hc, c in plans:
                    ctrs = cp.zeros(64, dtype=cp.uint32)  # a counter per launch (timed() makes 45)
                    launches = [0]

                    def launch(b):
                        i = launches[0]
                        launches[0] += 1
                        fg((SMS * 7,), (128,), (b, NT, KT, hn, hc, c, ctrs[i:], out, sink), shared_mem=pad)
                    report(f"guided work{work} part{part} head {hn}x{hc} tail c{c}", timed(launch))
    print("READ " + json.dumps(res))
    raise SystemExit(0)

if sys.argv[1:2] == ["dyn"]:
    # static against dynamic scheduling of the same tiles, loads only and with synthetic work per tile;
    # both at 28 resident warps per multiprocessor (blocks of 4 warps, 7 a multiprocessor by shared memory)
    pad = (cp.cuda.Device().attributes["MaxSharedMemoryPerMultiprocessor"] // 7) - 1024
    ctr = cp.zeros(1, dtype=cp.uint32)
    rowctr = cp.zeros(NT, dtype=cp.int32)
    part = cp.zeros(NT * KT * 32, dtype=cp.float32)
    launches = [0]
    for work in [int(w) for w in sys.argv[2:]] or [0, 16]:
        mod = cp.RawModule(code=SRC, options=("-std=c++17", "-DDEPTH=4", f"-DWORK={work}", "-DPART=0"))
        fs, fd = mod.get_function("warp_stream"), mod.get_function("dyn_work")
        fs.max_dynamic_shared_size_bytes = pad
        fd.max_dynamic_shared_size_bytes = pad
        for splits in (3, 4):
            tps = (KT + splits - 1) // splits
            report(f"static work{work} s{splits}",
                   timed(lambda b: fs((NT // 4, splits), (128,), (b, NT, KT, tps, sink), shared_mem=pad)))
        warps = SMS * 7 * 4
        for chunk in (4, 8, 16):
            items = NT * ((KT + chunk - 1) // chunk)

            def launch(b):
                base = launches[0] * (items + warps)
                launches[0] += 1
                fd((SMS * 7,), (128,), (b, NT, KT, chunk, ctr, cp.int64(base), part, rowctr, sink), shared_mem=pad)
            ctr.fill(0)
            launches[0] = 0
            report(f"dynamic work{work} chunk{chunk}", timed(launch))
    print("READ " + json.dumps(res))
    raise SystemExit(0)

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
