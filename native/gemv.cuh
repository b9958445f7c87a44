// gemv.cuh -- weight-only GEMV for batches of 1 to 8 rows, on tensor cores, built for occupancy.
//
// The same maths and the same tiled layouts as wgemm.cuh (cuda_i4x16 / cuda_i8x16 codes with scale
// and zero pairs per row tile and group, cuda_f8x16 codes with one scale per 128 x 128 block;
// mma.m16n8k16 with the weights as the A operand, codes dequantized exactly as wgemm's, each group's
// fp32 sum scaled once), in a leaner shape:
//
//   - one row tile and one K range per warp, one batch tile (m <= 8), a register budget of 72 per
//     thread so that 27-28 warps are resident per multiprocessor where wgemm holds 12: latency is
//     hidden by warps more than by unrolled code. Blocks of R x S warps: R row tiles, each read by
//     S warps over consecutive K slices whose sums meet in shared memory at the end (R = 4, S = 1:
//     K split across blocks only; S > 1 needs no workspace, no second pass and no counter, and
//     R > 1 stages x once for R row tiles);
//   - groups of 128 or 256 inputs: the main loop runs bodies of DEPTH tiles whose group boundaries
//     are compile-time constants (no per-tile group test, scale and zero pairs loaded one body
//     ahead); other groups go tile by tile;
//   - the block's rows of x for its whole K range (all S slices) are staged once, row-major, with
//     cp.async before the main loop (each slice's warps stage their slice and meet on a barrier of
//     their own; one block barrier where that does not apply); the B fragments come from shared memory with
//     ldmatrix, the rows past m pointing at row m - 1 (their output columns are never stored);
//   - codes stream with 16-byte loads one body ahead of use per lane (a body: CIUIC_GEMV_DEPTH tiles
//     of int4, half as many of the 1-byte formats, whose tiles are twice the bytes: 64 bytes a lane
//     either way); scale and zero pairs one group ahead; no barrier and no shared-memory traffic for
//     codes;
//   - split-K over blockIdx.y with the same workspace, counters and deterministic reduction as
//     wgemm (the last block of a row range adds the partial sums in split order).
#pragma once

#include "wgemm.cuh"

namespace ciuic {

__device__ __forceinline__ int fresh_tid() {
  int v;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(v));
  return v;
}
__device__ __forceinline__ int fresh_ctaid_y() {
  int v;
  asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(v));
  return v;
}
__device__ __forceinline__ int fresh_ctaid_z() {
  int v;
  asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(v));
  return v;
}
__device__ __forceinline__ int fresh_ctaid_x() {
  int v;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(v));
  return v;
}

#ifndef CIUIC_GEMV_TIMELINE
#define CIUIC_GEMV_TIMELINE 0  // probe: lane 0 of each warp stamps %globaltimer at 4 points into p.bias
#endif
// Probe builds (CIUIC_GEMV_TIMELINE, tests/gpu/probe_timeline.py): stamp j of this warp into p.bias,
// 8 words a warp (entry, loop start, loop end, before the stores, then the multiprocessor); no bias is
// added. Otherwise nothing.
__device__ __forceinline__ void stamp(const void *buf, int j) {
#if CIUIC_GEMV_TIMELINE
  if ((threadIdx.x & 31) == 0) {
    unsigned long long t;
    unsigned sm;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    const unsigned w = ((blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * (blockDim.x >> 5) +
                       (threadIdx.x >> 5);
    unsigned *o = static_cast<unsigned *>(const_cast<void *>(buf)) + w * 8;
    o[j] = static_cast<unsigned>(t);
    if (j == 0) o[4] = sm;
  }
#else
  (void)buf;
  (void)j;
#endif
}

constexpr int kGemvWarps = 4;  // warps of a block of the row-tile shape (R = 4, S = 1)
constexpr int kGemvThreads = kGemvWarps * 32;

#ifndef CIUIC_GEMV_DEPTH
#define CIUIC_GEMV_DEPTH 4  // int4 tiles of codes in flight per lane (and tiles per unrolled body)
#endif

// Tiles per body: CIUIC_GEMV_DEPTH int4 tiles' worth of bytes (64 a lane), whatever the format.
__host__ __device__ constexpr int gemv_depth(int fmt) {
  return CIUIC_GEMV_DEPTH / tile_vectors(fmt) > 0 ? CIUIC_GEMV_DEPTH / tile_vectors(fmt) : 1;
}
#ifndef CIUIC_GEMV_SM_WARPS
#define CIUIC_GEMV_SM_WARPS 28  // resident warps per multiprocessor the registers are cut for (72 each)
#endif

// Shared memory of a block (its staged x): kGemvBudget by default (the launcher adds splits to stay
// under it; 7 blocks of it fit a multiprocessor), never more than kGemvMaxBytes.
constexpr int kGemvBudget = 24 * 1024;
constexpr int kGemvMaxBytes = 96 * 1024;

// Weight row tiles of a block of R output row tiles: gate_up reads two per output tile (the gate tile
// and its up tile), the other modes one.
__host__ __device__ constexpr int gemv_rows(int r, int mode) { return mode == GATEUP ? 2 * r : r; }

// One tile's codes in a lane's registers (VPT 16-byte vectors)
template <int V>
struct GemvCodes {
  uint4 v[V];
};

// One slot of the MoE down step: its expert's tiled arrays (NULL codes: an id out of range) and
// routing weight; 32 bytes, kept in shared memory.
struct GemvSlot {
  const uint4 *codes;
  const uint32_t *scales;
  const uint16_t *zeros;
  float rw;
  int pad;
};

// GT: tiles per scale group when the group is 2 or 4 tiles (the main loop then runs bodies of DEPTH
// tiles whose group boundaries are known at compile time); 0: any group (64 inputs, 512 and more, one
// per row), tile by tile with run-time group boundaries (plain linears only).
// R x S: R output row tiles per block, each read by S warps that share its K range (warp w reads weight
// row tile w / S -- for gate_up, R gate tiles then their R up tiles -- over the (w % S)-th of the block's
// S consecutive K slices of p.tps tiles); the S partial sums of a tile meet in shared memory, in slice
// order. blockIdx.y splits K across blocks on top (workspace and counters).
// MODE: PLAIN (x [m, k], m <= 8); GATEUP (blockIdx.z: one (token, slot) pair, its expert's gate and up
// tiles, silu(gate) * up in the epilogue); DOWN (blockIdx.z: one token; K runs over its slots, each
// padded to p.ktp tiles, every group's scale times the slot's routing weight, so the sum over the
// slots is the sum over K).
// FMT: CIUIC_FMT_INT4, _INT8 or _FP8. fp8's groups are its 128 x 128 blocks: 2 tiles along K, one fp32
// scale for 8 row tiles, no zero points.
template <int FMT, bool BF16, int GT, int R, int S, int MODE>
__global__ void __launch_bounds__(32 * gemv_rows(R, MODE) * S,
                                  CIUIC_GEMV_SM_WARPS / (gemv_rows(R, MODE) * S) > 0
                                      ? CIUIC_GEMV_SM_WARPS / (gemv_rows(R, MODE) * S)
                                      : 1)
    gemv_kernel(const Params p) {
  constexpr int RW = gemv_rows(R, MODE);
  constexpr int kThr = 32 * RW * S;
  using T = typename std::conditional<BF16, __nv_bfloat16, __half>::type;
  constexpr int D = gemv_depth(FMT);
  constexpr int VPT = tile_vectors(FMT);
  constexpr bool F8 = FMT == CIUIC_FMT_FP8;
  static_assert(GT == 0 || D % (GT > 0 ? GT : 1) == 0, "a body holds whole groups");
  static_assert(MODE == PLAIN || GT > 0, "the MoE steps take groups of 2 or 4 tiles");
  constexpr int NG = GT > 0 ? D / GT : 1;  // groups per body
  extern __shared__ __align__(128) unsigned char dsm[];
  __shared__ int s_last;

  stamp(p.bias, 0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2;
  const int split = blockIdx.y;
  const int slice = S > 1 ? warp % S : 0;
  const int m_rows = MODE == PLAIN ? p.m : 1;
  const int kf = MODE == DOWN ? p.kflat : p.kt;  // tiles along K (down: over all the slots)
  // the block's K range (tiles) starts at split * S * p.tps; this warp's, a multiple of D (the
  // launcher's plan), slice * p.tps further
  const int kt_begin = (split * S + slice) * p.tps;
  const int kt_end = min(kf, kt_begin + p.tps);
  const int nkt = S > 1 ? max(0, kt_end - kt_begin) : kt_end - kt_begin;  // S > 1: a slice may be empty
  int ntile;
  bool live;
  if constexpr (MODE == GATEUP) {
    const int half = p.nt >> 1, wr = warp / S;
    const int a = blockIdx.x * R + wr % R;
    ntile = a + (wr >= R ? half : 0);
    live = a < half;
  } else {
    ntile = blockIdx.x * R + warp / S;
    live = R == 1 || ntile < p.nt;  // R == 1: one block per row tile
  }
  const int rs = p.wstride;  // bytes per staged x row (a multiple of 128, plus 16)

  // gate_up: the pair's expert and x row (down: per slot, from the slot table). The plain weight's
  // pointers are read from p where they are used (reading them here costs the plain kernel registers).
  // the block's K range of x to stage: its first tile and its length in inputs
  auto x_range = [&](int &blk_begin, int &span) {
    blk_begin = S > 1 ? fresh_ctaid_y() * S * p.tps : kt_begin;
    span = S > 1 ? max(0, min(kf, blk_begin + S * p.tps) - blk_begin) * 64 : nkt * 64;
  };
  Operand ex = {};  // gate_up: the pair's expert (wgemm's lookup; NULL codes: an id out of range)
  GemvSlot *tab = reinterpret_cast<GemvSlot *>(dsm + p.tab_off);
  if constexpr (MODE == GATEUP) {
    ex = operand<GATEUP, 2>(p, blockIdx.z, 0);
    live = live && ex.codes != nullptr;
  } else if constexpr (MODE == DOWN) {
    // x first: its copies are in flight while the slot table is read (which the first codes wait for)
    {
      int blk_begin, span;
      x_range(blk_begin, span);
      const char *xb = static_cast<const char *>(p.x);
      // one row over the slots' padded ranges: slot j's tiles from row z * top_k + j of h
      const int z = fresh_ctaid_z();
      for (int i = tid; i < (span >> 3); i += kThr) {
        const int f = blk_begin + (i >> 3), j = f / p.ktp;
        const int kk = (f - j * p.ktp) * 64 + (i & 7) * 8;
        const size_t src = (static_cast<size_t>(z * p.top_k + j) * p.k + kk) * 2;
        if (p.xvec) {
          const bool in = kk < p.k;
          cp_async16(smem_u32(dsm + i * 16), in ? xb + src : xb, in ? 16 : 0);
        } else {
#pragma unroll
          for (int c = 0; c < 8; ++c)
            reinterpret_cast<uint16_t *>(dsm + i * 16)[c] =
                kk + c < p.k ? reinterpret_cast<const uint16_t *>(xb + src)[c] : static_cast<uint16_t>(0);
        }
      }
      cp_async_commit();
    }
    const int z = blockIdx.z;
    for (int j = tid; j < p.top_k; j += kThr) {
      const Operand o = operand<DOWN, 2>(p, z, j);
      tab[j] = GemvSlot{o.codes, static_cast<const uint32_t *>(o.scales), o.zeros, o.rw, 0};
    }
    __syncthreads();
  }

  // down: (slot, tile within the slot) of the body the codes are loaded for next (c*) and of the one
  // whose scale pairs are loaded next (s*)
  int cj = 0, ckk = 0, sj = 0, skk = 0;
  auto advance = [&](int &j, int &kk) {
    kk += D;
    if (kk >= p.ktp) {
      kk = 0;
      ++j;
    }
  };
  if constexpr (MODE == DOWN) {
    cj = kt_begin / p.ktp;
    ckk = kt_begin - cj * p.ktp;
    sj = cj;
    skk = ckk;
  }
  const size_t wrow = static_cast<size_t>(live ? ntile : 0) * p.kt;  // the row tile's first tile
  // down: where the codes of the body at warp tile i (tiles [i, i + D)) are, and how many of its tiles
  // are inside the slot (0: none to load); the body after it next
  auto locate_body = [&](int i, const uint4 *&np, int &nv) {
    nv = 0;
    np = nullptr;
    if (live && i < nkt) {  // (past the warp's range cj may be past the table)
      const uint4 *base = tab[cj].codes;
      np = base + (wrow + ckk) * (32 * VPT) + lane;
      nv = base ? min(D, p.kt - ckk) : 0;
    }
    advance(cj, ckk);
  };

  // codes: the first D tiles in flight before x is staged (tile i's vector v of this lane at
  // cp + (i * VPT + v) * 32)
  const uint4 *cp = (MODE == GATEUP ? ex.codes : p.codes) + (wrow + kt_begin) * (32 * VPT) + lane;
  uint4 w[D * VPT];
  if constexpr (MODE == DOWN) {
    const uint4 *np;
    int nv;
    locate_body(0, np, nv);
#pragma unroll
    for (int d = 0; d < D * VPT; ++d) w[d] = d / VPT < nv ? ld_stream(np + d * 32) : make_uint4(0, 0, 0, 0);
  } else {
#pragma unroll
    for (int d = 0; d < D * VPT; ++d)
      w[d] = (live && d / VPT < nkt) ? ld_stream(cp + d * 32) : make_uint4(0, 0, 0, 0);
  }

  // this lane's scale (and zero) pair of group gi at sb[gi * GS] (zb[gi * GS]): the int formats, the
  // pair of rows g, g + 8 of its row tile, 8 pairs a group; fp8, the scale of its block (of 8 row
  // tiles), one a group, and no zero points
  constexpr int GS = F8 ? 1 : 8;
  const size_t gb = F8 ? static_cast<size_t>((live ? ntile : 0) >> 3) * p.kb
                       : static_cast<size_t>(live ? ntile : 0) * p.n_groups * 8 + g;
  const uint32_t *sb = static_cast<const uint32_t *>(MODE == GATEUP ? ex.scales : p.scales) + gb;
  const uint16_t *zb = F8 ? nullptr
                          : MODE == GATEUP ? (ex.zeros ? ex.zeros + gb : nullptr) : (p.zeros ? p.zeros + gb : nullptr);
  static_assert(NG <= 2, "zero pairs of a body are packed in one word");
  // scale pairs of the groups of the body starting at tile i0, and their zero pairs packed in one
  // word (group j in bits 16j..16j+15); down: of the body at (sj, skk), whose routing weight goes to rw
  auto load_groups = [&](int i0, uint32_t (&sg)[NG], uint32_t &zg, float &rw) {
    zg = 0;
    const uint32_t *sp = sb;
    const uint16_t *zp = zb;
    int g0 = (kt_begin + i0) / (GT > 0 ? GT : 1);
    bool have = live;
    if constexpr (MODE == DOWN) {
      have = false;
      if (live && i0 < nkt) {  // (past the warp's range sj may be past the table)
        const GemvSlot &sl = tab[sj];
        have = sl.scales != nullptr;
        sp = sl.scales + gb;
        zp = sl.zeros ? sl.zeros + gb : nullptr;
        rw = sl.rw;
      }
      g0 = skk / GT;
      advance(sj, skk);
    }
#pragma unroll
    for (int j = 0; j < NG; ++j) {
      const int gi = g0 + j;
      const bool ok = have && gi < p.n_groups;
      sg[j] = ok ? __ldg(sp + gi * GS) : 0u;
      zg |= ((ok && zp) ? static_cast<uint32_t>(__ldg(zp + gi * GS)) : p.zconst) << (16 * j);
    }
  };
  uint32_t sc[NG], sn[NG], zc = 0, zn = 0;
  float rwc = 1.0f, rwn = 1.0f;
  if constexpr (GT > 0) {
    load_groups(0, sc, zc, rwc);
    load_groups(D, sn, zn, rwn);
  }

  // x rows [m][blk_begin * 64, blk_end * 64), row-major, zeros past k (down: one row over the slots'
  // padded ranges, slot j's tiles from row z * top_k + j of h)
  {
    int blk_begin, span;
    x_range(blk_begin, span);
    // x, or gate_up's token row of it (taken where used: taken here it costs the plain kernel)
    auto x0 = [&] { return static_cast<const char *>(MODE == GATEUP ? ex.xrow : p.x); };
    if constexpr (MODE == DOWN) {
      cp_async_wait<0>();  // (issued before the slot table was read)
    } else if (MODE == PLAIN && S > 1 && p.xvec) {
      // each slice's R warps stage its part of x and wait on a barrier of their own (named barrier
      // 1 + slice; one warp: none), not on the whole block's: a warp starts as soon as its slice is in
      const int s0 = blk_begin + slice * p.tps;
      const int vpr = max(0, min(kf, s0 + p.tps) - s0) * 8;
      const int ts = (warp / S) * 32 + lane;
      const char *xb = x0();
      for (int i = ts; i < m_rows * vpr; i += 32 * R) {
        const int row = i / vpr, cv = i - row * vpr;
        const int kk = s0 * 64 + cv * 8;
        const bool in = kk < p.k;
        const char *src = in ? xb + (static_cast<size_t>(row) * p.k + kk) * 2 : xb;
        cp_async16(smem_u32(dsm + row * rs + slice * p.tps * 128 + cv * 16), src, in ? 16 : 0);
      }
      cp_async_commit();
      cp_async_wait<0>();
      if constexpr (R == 1)
        __syncwarp();  // a slice of one warp (a named barrier here cost the 1 x 3 shape 1.4 us on an H100)
      else
        asm volatile("bar.sync %0, %1;" ::"r"(1 + slice), "r"(32 * R) : "memory");
    } else if (p.xvec) {
      const int vpr = span >> 3;
      const char *xb = x0();
      for (int i = tid; i < m_rows * vpr; i += kThr) {
        const int row = i / vpr, cv = i - row * vpr;
        const int kk = blk_begin * 64 + cv * 8;
        const bool in = kk < p.k;
        const char *src = in ? xb + (static_cast<size_t>(row) * p.k + kk) * 2 : xb;
        cp_async16(smem_u32(dsm + row * rs + cv * 16), src, in ? 16 : 0);
      }
      cp_async_commit();
      cp_async_wait<0>();
    } else {
      const uint16_t *xh = reinterpret_cast<const uint16_t *>(x0());
      for (int i = tid; i < m_rows * span; i += kThr) {
        const int row = i / span, kk = i - row * span;
        const int kg = blk_begin * 64 + kk;
        const uint16_t v = kg < p.k ? xh[static_cast<size_t>(row) * p.k + kg] : static_cast<uint16_t>(0);
        *reinterpret_cast<uint16_t *>(dsm + row * rs + kk * 2) = v;
      }
    }
  }
  if (!(MODE == PLAIN && S > 1 && p.xvec)) __syncthreads();  // (the per-slice barriers above otherwise)

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, tot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if CIUIC_PROBE == 1
  uint32_t sink = 0;
#endif
  // ldmatrix rows: matrix j of an x4 is inputs 8j..8j+7 of a 32-input run; row r is batch row
  // min(r, m - 1)
  const uint32_t xaddr = smem_u32(dsm) + min(lane & 7, m_rows - 1) * rs + (lane >> 3) * 16 + slice * p.tps * 128;

  // end of a group: its sums times its scale pair (fp8: its block's scale; down: and the slot's routing
  // weight) into the totals
  auto scale_into = [&](uint32_t s2) {
    float2 f;
    if constexpr (F8)
      f.x = f.y = __uint_as_float(s2);
    else
      f = __half22float2(*reinterpret_cast<const __half2 *>(&s2));
    if constexpr (MODE == DOWN) {
      f.x *= rwc;
      f.y *= rwc;
    }
    tot[0] = fmaf(acc[0], f.x, tot[0]);
    tot[1] = fmaf(acc[1], f.x, tot[1]);
    tot[2] = fmaf(acc[2], f.y, tot[2]);
    tot[3] = fmaf(acc[3], f.y, tot[3]);
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
  };
  // one tile: x fragments from shared memory, 4 k16 steps of dequant + mma (the words of a k16 step
  // as wgemm reads them: int4, one word; the 1-byte formats, two)
  auto tile = [&](const GemvCodes<VPT> cur, int i, uint32_t zlo, uint32_t zhi) {
    uint32_t b[2][4];
    ldsm_x4(b[0], xaddr + i * 128);
    ldsm_x4(b[1], xaddr + i * 128 + 64);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint32_t w0, w1;
      step_words<VPT>(cur.v[0], cur.v[VPT - 1], q, w0, w1);
      uint32_t a[4];
      dequant<FMT, BF16>(w0, w1, zlo, zhi, a);
      mma16816<BF16>(acc, a, b[q >> 1][(q & 1) * 2], b[q >> 1][(q & 1) * 2 + 1]);
    }
  };

  stamp(p.bias, 1);
  int i0 = 0;  // first tile of the run-time path
  if constexpr (GT > 0) {
    // bodies of D tiles, each starting on a group boundary; scale and zero pairs one body ahead
    const int nfull = live ? nkt / D * D : 0;
    for (int i = 0; i < nfull; i += D) {
      uint32_t zlo = 0, zhi = 0;
      if constexpr (MODE == DOWN) {
        // the next body's codes may come from another slot: located once, loaded tile by tile as here
        // each tile's codes leave their registers
        const uint4 *np;
        int nv;
        locate_body(i + D, np, nv);
#pragma unroll
        for (int d = 0; d < D; ++d) {
          GemvCodes<VPT> cur;
#pragma unroll
          for (int v = 0; v < VPT; ++v) {
            cur.v[v] = w[d * VPT + v];
            if (d < nv) w[d * VPT + v] = ld_stream(np + (d * VPT + v) * 32);
          }
          if (d % GT == 0) zero_words<FMT, BF16>(zc >> (16 * (d / GT)), zlo, zhi);
          tile(cur, i + d, zlo, zhi);
          if ((d + 1) % GT == 0) scale_into(sc[d / GT]);
        }
      } else {
#pragma unroll
        for (int d = 0; d < D; ++d) {
          GemvCodes<VPT> cur;
#pragma unroll
          for (int v = 0; v < VPT; ++v) {
#if CIUIC_PROBE == 2
            const uint32_t h = (lane * 0x9E3779B9u) ^ static_cast<uint32_t>(((i + d) * VPT + v) * 0x85EBCA6Bu);
            cur.v[v] = make_uint4(h, h >> 3, h ^ 0x5A5A5A5Au, h + 0x01010101u);
#else
            cur.v[v] = w[d * VPT + v];
            if (i + d + D < nkt) w[d * VPT + v] = ld_stream(cp + ((d + D) * VPT + v) * 32);
#endif
          }
#if CIUIC_PROBE == 1
          sink ^= cur.v[0].x ^ cur.v[0].y ^ cur.v[VPT - 1].z ^ cur.v[VPT - 1].w;
          continue;
#endif
          if (d % GT == 0) zero_words<FMT, BF16>(zc >> (16 * (d / GT)), zlo, zhi);
          tile(cur, i + d, zlo, zhi);
          if ((d + 1) % GT == 0) scale_into(sc[d / GT]);
        }
        cp += D * VPT * 32;
      }
#pragma unroll
      for (int j = 0; j < NG; ++j) sc[j] = sn[j];
      zc = zn;
      rwc = rwn;
      if (i + 2 * D < nkt) load_groups(i + 2 * D, sn, zn, rwn);
    }
    i0 = nfull;
    cp -= nfull * VPT * 32;
  }

  // run-time path: tiles [i0, nkt) one at a time (every tile for GT == 0, the last split's tail for
  // GT > 0, which starts on a group boundary; never for down, whose ranges are whole bodies); scale and
  // zero pairs one group ahead
  if (MODE != DOWN && live && i0 < nkt) {
    const uint32_t gshift = static_cast<uint32_t>(p.gshift), gmask = (1u << gshift) - 1u;
    int gnext = ((kt_begin + i0) >> gshift) + 1;
    uint32_t s_cur, s_nxt = 0, z_nxt = p.zconst, zlo, zhi;
    {
      const int g0 = (kt_begin + i0) >> gshift;
      s_cur = __ldg(sb + g0 * GS);
      const uint32_t z0 = zb ? static_cast<uint32_t>(__ldg(zb + g0 * GS)) : p.zconst;
      if (gnext < p.n_groups) {
        s_nxt = __ldg(sb + gnext * GS);
        if (zb) z_nxt = __ldg(zb + gnext * GS);
      }
      zero_words<FMT, BF16>(z0, zlo, zhi);
    }
    for (int base = i0; base < nkt; base += D) {
#pragma unroll
      for (int d = 0; d < D; ++d) {
        const int i = base + d;
        if (i >= nkt) break;
        const int kt = kt_begin + i;
        GemvCodes<VPT> cur;
#pragma unroll
        for (int v = 0; v < VPT; ++v) {
#if CIUIC_PROBE == 2
          const uint32_t h = (lane * 0x9E3779B9u) ^ static_cast<uint32_t>((i * VPT + v) * 0x85EBCA6Bu);
          cur.v[v] = make_uint4(h, h >> 3, h ^ 0x5A5A5A5Au, h + 0x01010101u);
#else
          cur.v[v] = w[d * VPT + v];
          if (i + D < nkt) w[d * VPT + v] = ld_stream(cp + ((i + D) * VPT + v) * 32);
#endif
        }
#if CIUIC_PROBE == 1
        sink ^= cur.v[0].x ^ cur.v[0].y ^ cur.v[VPT - 1].z ^ cur.v[VPT - 1].w;
        continue;
#endif
        if (i > i0 && (kt & gmask) == 0) {  // a new group: its pairs were loaded one group ahead
          s_cur = s_nxt;
          zero_words<FMT, BF16>(z_nxt, zlo, zhi);
          ++gnext;
          if (gnext < p.n_groups) {
            s_nxt = __ldg(sb + gnext * GS);
            if (zb) z_nxt = __ldg(zb + gnext * GS);
          }
        }
        tile(cur, i, zlo, zhi);
        if (((kt + 1) & gmask) == 0 || i + 1 == nkt) scale_into(s_cur);
      }
    }
  }

#if CIUIC_PROBE == 1
  if (sink == 0x9E3779B9u) tot[0] += 1.0f;
#endif
  stamp(p.bias, 2);
  // the thread's coordinates read afresh: nothing of them stays in a register through the main loop
  const int e_tid = fresh_tid(), e_lane = e_tid & 31, e_warp = e_tid >> 5;
  const int e_g = e_lane >> 2, e_t4 = e_lane & 3;
  const int e_slice = S > 1 ? e_warp % S : 0;
  const int e_wr = e_warp / S;
  const int e_z = MODE == PLAIN ? 0 : fresh_ctaid_z();
  const int e_nz = MODE == PLAIN ? 1 : static_cast<int>(gridDim.z);
  // output row tile: gate_up, the gate tile (the up tile is e_tile + nt / 2)
  const int e_tile = fresh_ctaid_x() * R + (MODE == GATEUP ? e_wr % R : e_wr);
  const bool e_live = MODE == GATEUP ? e_tile < (p.nt >> 1) : e_tile < p.nt;
  // the S slices of a row tile: their sums meet in shared memory (x is no longer read), added in
  // slice order by the tile's first warp, which alone goes on; gate_up: the gate tile's first warp
  // adds its up tile's slices too
  float up[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if constexpr (S > 1 || MODE == GATEUP) {
    float4 *red = reinterpret_cast<float4 *>(dsm);
    __syncthreads();
    red[e_warp * 32 + e_lane] = make_float4(tot[0], tot[1], tot[2], tot[3]);
    __syncthreads();
    if (e_slice == 0) {
#pragma unroll
      for (int j = 1; j < S; ++j) {
        const float4 v = red[(e_warp + j) * 32 + e_lane];
        tot[0] += v.x;
        tot[1] += v.y;
        tot[2] += v.z;
        tot[3] += v.w;
      }
      if constexpr (MODE == GATEUP) {
        if (e_wr < R) {
#pragma unroll
          for (int j = 0; j < S; ++j) {
            const float4 v = red[(e_warp + R * S + j) * 32 + e_lane];
            up[0] += v.x;
            up[1] += v.y;
            up[2] += v.z;
            up[3] += v.w;
          }
        }
      }
    }
  }
  const bool lead = e_slice == 0 && (MODE != GATEUP || e_wr < R);
  // ---- epilogue: lane (g, t) holds rows g, g + 8 of its tile for batch rows 2t, 2t + 1
  T *yo = static_cast<T *>(p.y);
  const T *bias = CIUIC_GEMV_TIMELINE ? nullptr : static_cast<const T *>(p.bias);
  stamp(p.bias, 3);
  const int inter = p.n >> 1;  // gate_up: rows of h
  if (gridDim.y == 1) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = e_tile * 16 + e_g + 8 * (e >> 1);
      const int m = 2 * e_t4 + (e & 1);
      if constexpr (MODE == GATEUP) {
        if (lead && e_live && m == 0) yo[static_cast<size_t>(e_z) * inter + row] = from_f<T>(silu(tot[e]) * up[e]);
      } else {
        if (lead && e_live && row < p.n && m < m_rows) {
          float v = tot[e];
          if (bias) v += to_f<T>(bias[row]);
          yo[static_cast<size_t>(e_z + m) * p.n + row] = from_f<T>(v);
        }
      }
    }
    return;
  }

  // split-K: this split's partial sums, then the last block of the row range adds them up
  const int npad = p.nt * 16;
  const size_t zstride = static_cast<size_t>(m_rows) * npad;
  float *part = p.ws + (static_cast<size_t>(blockIdx.y) * e_nz + e_z) * zstride;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int row = e_tile * 16 + e_g + 8 * (e >> 1);
    const int m = 2 * e_t4 + (e & 1);
    if (lead && e_live && m < m_rows) {
      part[static_cast<size_t>(m) * npad + row] = tot[e];
      if constexpr (MODE == GATEUP) part[row + inter] = up[e];
    }
  }
  int *counter = p.counters + static_cast<size_t>(e_z) * gridDim.x + blockIdx.x;
  if (!last_split_block(counter, e_tid == 0, s_last)) return;
  constexpr int NR = R * 16;
  const int r0 = blockIdx.x * NR;
  const size_t sstride = static_cast<size_t>(e_nz) * zstride;
  const float *base = p.ws + static_cast<size_t>(e_z) * zstride;
  for (int i = e_tid; i < m_rows * NR; i += kThr) {
    const int m = i / NR, row = r0 + (i - m * NR);
    if constexpr (MODE == GATEUP) {
      if (row >= inter) continue;
      const float gs = sum_splits(base + row, gridDim.y, sstride);
      const float us = sum_splits(base + row + inter, gridDim.y, sstride);
      yo[static_cast<size_t>(e_z) * inter + row] = from_f<T>(silu(gs) * us);
    } else {
      if (row >= p.n) continue;
      float v = sum_splits(base + static_cast<size_t>(m) * npad + row, gridDim.y, sstride);
      if (bias) v += to_f<T>(bias[row]);
      yo[static_cast<size_t>(e_z + m) * p.n + row] = from_f<T>(v);
    }
  }
  if (e_tid == 0) *counter = 0;
}

// Blocks of R output row tiles, each read by S warps, K split across blocks on top
// (CIUIC_STAGE_GEMV_<R>X<S>): the launcher of every mode. gz: blocks along z (the MoE steps' pairs or
// tokens; 1 for a plain linear). Splits across blocks: as requested, else the most that keep every
// block in one wave, raised until x fits kGemvMaxBytes. *launched is false (nothing launched) when x
// cannot fit because there is no workspace to split K with; the caller then takes wgemm.
template <int FMT, bool BF16, int GT, int R, int S, int MODE>
cudaError_t launch_gemv_slices(Params p, const SplitRequest &rq, int gz, cudaStream_t stream, bool *launched) {
  constexpr int D = gemv_depth(FMT), RW = gemv_rows(R, MODE), threads = 32 * RW * S;
  *launched = false;
  auto kernel = gemv_kernel<FMT, BF16, GT, R, S, MODE>;
  // resident blocks per multiprocessor as the registers allow, once per instantiation
  static const int occ_regs = resident_blocks(kernel, threads, kGemvMaxBytes, 0, 1);
  const int sms = sm_count(), smem_sm = sm_shared_bytes();
  const int rows = MODE == PLAIN ? p.m : 1;
  const int gx = ((MODE == GATEUP ? p.nt / 2 : p.nt) + R - 1) / R;
  const int64_t blocks_xz = static_cast<int64_t>(gx) * gz;
  // tiles along K: the down step runs over its slots, each padded to whole bodies
  int kf = p.kt;
  if constexpr (MODE == DOWN) {
    p.ktp = (p.kt + D - 1) / D * D;
    p.kflat = p.top_k * p.ktp;
    kf = p.kflat;
  }
  const int table = MODE == DOWN ? p.top_k * static_cast<int>(sizeof(GemvSlot)) : 0;
  // with y blocks along K: tiles per warp (a multiple of D), shared memory per block, blocks per SM
  auto tps_of = [&](int y) { return ((kf + y * S - 1) / (y * S) + D - 1) / D * D; };
  auto smem_of = [&](int y) {
    const int x = rows * (S * tps_of(y) * 128 + 16) + table;
    return x > RW * S * 32 * 16 ? x : RW * S * 32 * 16;
  };
  auto occ_of = [&](int y) {
    const int by_smem = smem_sm / (smem_of(y) + 1024);
    return by_smem < occ_regs ? by_smem : occ_regs;
  };
  // at most one split per D * S tiles; the partial sums must fit the workspace
  int ymax = kf / (D * S);
  if (ymax < 1) ymax = 1;
  const int by_ws = workspace_splits(rq, static_cast<int>(blocks_xz));
  if (ymax > by_ws) ymax = by_ws;
  int y = rq.requested > 0 ? rq.requested : 1;
  if (rq.requested <= 0)  // the most blocks along K that keep every block in one wave
    while (y < ymax && blocks_xz * (y + 1) <= static_cast<int64_t>(occ_of(y + 1)) * sms) ++y;
  while (smem_of(y) > kGemvMaxBytes && y < ymax) ++y;  // x must fit
  if (y > ymax) y = ymax;
  if (smem_of(y) > kGemvMaxBytes) return cudaSuccess;  // not launched: the caller takes wgemm
  p.tps = tps_of(y);
  y = (kf + S * p.tps - 1) / (S * p.tps);  // blocks along K that have tiles
  p.wstride = S * p.tps * 128 + 16;
  p.tab_off = rows * p.wstride;
  dim3 grid(gx, y, gz);
  kernel<<<grid, threads, smem_of(y), stream>>>(p);
  *launched = true;
  return cudaGetLastError();
}

// Blocks of 4 row tiles, each warp its own tile over the block's K range (CIUIC_STAGE_GEMV).
template <int FMT, bool BF16, int GT>
cudaError_t launch_gemv_rows(Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  constexpr int D = gemv_depth(FMT);
  *launched = false;
  auto kernel = gemv_kernel<FMT, BF16, GT, kGemvWarps, 1, PLAIN>;
  // resident blocks per multiprocessor at the default budget, once per instantiation
  static const int occ = resident_blocks(kernel, kGemvThreads, kGemvMaxBytes, kGemvBudget, 4);
  // tiles per split (a multiple of D) whose staged x fits `bytes`
  const int rows = p.m;
  auto fit = [&](int bytes) { return ((bytes - 16 * rows) / (rows * 128)) / D * D; };
  SplitRequest r = rq;
  r.mt = 1;
  const int cap = fit(kGemvMaxBytes);
  if (r.requested == 0) {
    const int budget = fit(kGemvBudget);
    r.min_splits = (p.kt + budget - 1) / budget;
  } else if (cap * r.requested < p.kt) {
    r.requested = (p.kt + cap - 1) / cap;
  }
  int tps = 0;
  const int s = plan_splits(r, p.kt, D, occ, &tps);
  if (tps > cap) return cudaSuccess;  // too few splits (no workspace) for x to fit: not launched
  p.tps = tps;
  p.wstride = tps * 128 + 16;
  const int smem = rows * p.wstride;
  dim3 grid((p.nt + kGemvWarps - 1) / kGemvWarps, s, 1);
  kernel<<<grid, kGemvThreads, smem, stream>>>(p);
  *launched = true;
  return cudaGetLastError();
}

template <int FMT, bool BF16, int GT>
cudaError_t launch_gemv_shape(Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  switch (rq.staging) {
    case CIUIC_STAGE_GEMV_1X3: return launch_gemv_slices<FMT, BF16, GT, 1, 3, PLAIN>(p, rq, 1, stream, launched);
    case CIUIC_STAGE_GEMV_1X7: return launch_gemv_slices<FMT, BF16, GT, 1, 7, PLAIN>(p, rq, 1, stream, launched);
    case CIUIC_STAGE_GEMV_3X3: return launch_gemv_slices<FMT, BF16, GT, 3, 3, PLAIN>(p, rq, 1, stream, launched);
    case CIUIC_STAGE_GEMV_2X7: return launch_gemv_slices<FMT, BF16, GT, 2, 7, PLAIN>(p, rq, 1, stream, launched);
    default: return launch_gemv_rows<FMT, BF16, GT>(p, rq, stream, launched);
  }
}

// Groups of 2 or 4 tiles (128, 256 inputs) take the compile-time group loop when a body holds them
// (fp8's 128 x 128 blocks always do); other groups the run-time one.
template <int FMT, bool BF16>
cudaError_t launch_gemv_groups(Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  constexpr int D = gemv_depth(FMT);
  if constexpr (FMT == CIUIC_FMT_FP8 && D % 2 == 0) {
    return launch_gemv_shape<FMT, BF16, 2>(p, rq, stream, launched);
  } else {
    if constexpr (D % 2 == 0)
      if (p.gshift == 1) return launch_gemv_shape<FMT, BF16, 2>(p, rq, stream, launched);
    if constexpr (D % 4 == 0)
      if (p.gshift == 2) return launch_gemv_shape<FMT, BF16, 4>(p, rq, stream, launched);
    return launch_gemv_shape<FMT, BF16, 0>(p, rq, stream, launched);
  }
}

// Launch the GEMV for one launch of m <= 8 rows (plain linear; one source file per format), in the
// block shape rq.staging names: CIUIC_STAGE_GEMV, 4 row tiles of one K range per block (splits: as
// requested, raised until the staged x fits kGemvMaxBytes, else the most that fit one wave of resident
// blocks, raised until x fits kGemvBudget); CIUIC_STAGE_GEMV_<R>X<S>, launch_gemv_slices. *launched
// is false (and nothing is launched) when x cannot fit because there is no workspace to split K
// with; the caller then takes wgemm.
cudaError_t launch_gemv_int4(bool bf16, Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched);
cudaError_t launch_gemv_int8(bool bf16, Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched);
cudaError_t launch_gemv_fp8(bool bf16, Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched);

template <int FMT, bool BF16, int GT, int MODE>
cudaError_t launch_moe_shape(Params p, const SplitRequest &rq, int gz, cudaStream_t stream, bool *launched) {
  switch (rq.staging) {
    case CIUIC_STAGE_GEMV_1X3: return launch_gemv_slices<FMT, BF16, GT, 1, 3, MODE>(p, rq, gz, stream, launched);
    case CIUIC_STAGE_GEMV_1X7: return launch_gemv_slices<FMT, BF16, GT, 1, 7, MODE>(p, rq, gz, stream, launched);
    default: *launched = false; return cudaSuccess;
  }
}

// groups of 2 or 4 tiles that a body holds (fp8's blocks: 2); other groups: not launched (wgemm)
template <int FMT, bool BF16, int MODE>
cudaError_t launch_moe_groups(Params p, const SplitRequest &rq, int gz, cudaStream_t stream, bool *launched) {
  constexpr int D = gemv_depth(FMT);
  if constexpr (D % 2 == 0)
    if (p.gshift == 1) return launch_moe_shape<FMT, BF16, 2, MODE>(p, rq, gz, stream, launched);
  if constexpr (D % 4 == 0 && FMT != CIUIC_FMT_FP8)
    if (p.gshift == 2) return launch_moe_shape<FMT, BF16, 4, MODE>(p, rq, gz, stream, launched);
  *launched = false;
  return cudaSuccess;
}

template <int FMT>
cudaError_t launch_moe_fmt(bool bf16, int mode, Params p, const SplitRequest &rq, int gz, cudaStream_t stream,
                           bool *launched) {
  if (mode == GATEUP)
    return bf16 ? launch_moe_groups<FMT, true, GATEUP>(p, rq, gz, stream, launched)
                : launch_moe_groups<FMT, false, GATEUP>(p, rq, gz, stream, launched);
  return bf16 ? launch_moe_groups<FMT, true, DOWN>(p, rq, gz, stream, launched)
              : launch_moe_groups<FMT, false, DOWN>(p, rq, gz, stream, launched);
}

// The same for one of the grouped MoE steps (mode GATEUP or DOWN; p as the step's entry point fills it,
// gz its blocks along z: (token, slot) pairs for gate_up, tokens for down), in the block shapes
// CIUIC_STAGE_GEMV_1X3 and CIUIC_STAGE_GEMV_1X7 (for gate_up an output row tile is a gate tile and
// its up tile: 2 x S warps), for groups a body holds (int4: 128 or 256 inputs; int8: 128; fp8: its
// blocks). Anything else: *launched is false.
cudaError_t launch_gemv_moe_int4(bool bf16, int mode, Params p, const SplitRequest &rq, int gz, cudaStream_t stream,
                                 bool *launched);
cudaError_t launch_gemv_moe_int8(bool bf16, int mode, Params p, const SplitRequest &rq, int gz, cudaStream_t stream,
                                 bool *launched);
cudaError_t launch_gemv_moe_fp8(bool bf16, int mode, Params p, const SplitRequest &rq, int gz, cudaStream_t stream,
                                bool *launched);

}  // namespace ciuic
