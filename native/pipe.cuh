// pipe.cuh -- int4 weight-only GEMM for batches of 2 to 32 rows, with the codes, their scale and
// zero pairs and x all streamed through a ring of shared-memory stages by cp.async.
//
// Same maths and layouts as wgemm.cuh (cuda_i4x16 codes, scale and zero pairs per row tile and group,
// mma.m16n8k16 with the weights as the A operand, codes made exact integers q - z, each group's fp32
// sum scaled once). What differs is where the bytes in flight wait:
//
//   - wgemm and the GEMV hold the codes they prefetch in registers, so more bytes in flight cost
//     registers, and with them warps; and their unrolled prefetch makes a long loop body. At 9-16
//     rows (two batch tiles, two mma per k16 step) wgemm fits 12 warps a multiprocessor and spends a
//     third of its stalls waiting for instructions (Nsight Compute, native/README.md);
//   - here a block of NW warps (one output row tile each) keeps P stages of KS tiles of K in flight in
//     shared memory: each stage holds the block's codes (512 bytes per tile and warp), the scale and
//     zero pairs of the groups the stage touches, and x's rows for those inputs. Per stage: one wait
//     on the oldest copies, one block barrier (x is shared by all warps; the barrier also frees the
//     buffer the next copies go to), the copies of the stage P - 1 ahead, then the stage's arithmetic
//     from shared memory (16-byte code loads, ldmatrix for x, its rows past m pointing at row m - 1);
//   - split-K over blockIdx.y with wgemm's workspace, counters and deterministic reduction.
#pragma once

#include "wgemm.cuh"

namespace ciuic {

#ifndef CIUIC_PIPE_WARPS
#define CIUIC_PIPE_WARPS 8  // row tiles (one warp each) per block
#endif
#ifndef CIUIC_PIPE_KS
#define CIUIC_PIPE_KS 4  // tiles of K per stage
#endif
#ifndef CIUIC_PIPE_STAGES
#define CIUIC_PIPE_STAGES 4  // stages in the ring
#endif
#ifndef CIUIC_PIPE_MIN_BLOCKS
#define CIUIC_PIPE_MIN_BLOCKS 2  // resident blocks per multiprocessor the registers are cut for
#endif
#ifndef CIUIC_PIPE_STATIC_GROUPS
#define CIUIC_PIPE_STATIC_GROUPS 1  // 0: every group size takes the run-time group loop (for probes)
#endif

// Bytes of one stage: per warp, KS tiles of codes, KS scale-pair words of 8 lanes and KS zero pairs of
// 8 lanes (a stage touches at most KS groups), then x's m rows of KS * 64 inputs (+16 bytes a row, so
// that ldmatrix's 8 row addresses fall in distinct banks).
__host__ __device__ constexpr int pipe_codes_bytes(int nw, int ks) { return nw * ks * 512; }
__host__ __device__ constexpr int pipe_scale_bytes(int nw, int ks) { return nw * ks * 32; }
__host__ __device__ constexpr int pipe_zero_bytes(int nw, int ks) { return nw * ks * 16; }
__host__ __device__ constexpr int pipe_xrow_bytes(int ks) { return ks * 128 + 16; }
__host__ __device__ constexpr int pipe_stage_bytes(int nw, int ks, int m) {
  return pipe_codes_bytes(nw, ks) + pipe_scale_bytes(nw, ks) + pipe_zero_bytes(nw, ks) + m * pipe_xrow_bytes(ks);
}

// y[m, n] = x[m, k] W^T for one launch of m <= 8 * MT rows (int4, any group of 64 * 2^j inputs or one
// per row). Needs x rows 16-byte aligned with k % 8 == 0, scales and zeros 16-byte aligned (the
// launcher checks). p.tps: tiles per split, a multiple of KS.
// GT: 0, or the tiles of a group (p.gshift == log2 GT) when GT divides KS. A stage then starts on a
// group boundary (tps and every stage are whole multiples of KS), so which tiles load a zero pair and
// which scale their group's sums are compile-time constants; tiles past the split are zero-filled, so
// a group cut by the end of K is scaled at its stage's static boundary like any other.
template <bool BF16, int MT, int NW, int KS, int P, int GT>
__global__ void __launch_bounds__(NW * 32, CIUIC_PIPE_MIN_BLOCKS) pipe_i4_kernel(const Params p) {
  using T = typename std::conditional<BF16, __nv_bfloat16, __half>::type;
  constexpr int kThr = NW * 32;
  constexpr int CB = pipe_codes_bytes(NW, KS), SB = pipe_scale_bytes(NW, KS), ZB = pipe_zero_bytes(NW, KS);
  constexpr int XS = pipe_xrow_bytes(KS);
  extern __shared__ __align__(128) unsigned char dsm[];
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2;
  const int m_rows = p.m;
  const int stage_bytes = CB + SB + ZB + m_rows * XS;
  const int ntile = blockIdx.x * NW + warp;
  const bool live = ntile < p.nt;
  const int kt_begin = blockIdx.y * p.tps;
  const int kt_end = min(p.kt, kt_begin + p.tps);
  const int nst = (kt_end - kt_begin + KS - 1) / KS;
  constexpr int G = GT ? GT : 1;  // (the static group, for the divisions below)
  static_assert(KS % G == 0, "a static group must divide the stage");
  const int gshift = p.gshift;  // 31: one group per row (then every group index below is 0)
  const uint32_t gmask = (1u << gshift) - 1u;

  const size_t wt = static_cast<size_t>(live ? ntile : 0);
  const uint4 *cb = p.codes + wt * p.kt * 32 + lane;  // tile kt of this warp's row tile: cb + kt * 32
  const char *sbase = static_cast<const char *>(p.scales) + wt * p.n_groups * 32;
  const char *zbase = p.zeros ? reinterpret_cast<const char *>(p.zeros) + wt * p.n_groups * 16 : nullptr;
  const char *xb = static_cast<const char *>(p.x);
  const int kx_end = min(kt_end * 64, p.k);  // inputs of this split (k % 8 == 0: whole vectors)

  // x: the stage's m rows of KS * 64 inputs are m * KS * 8 vectors of 16 bytes; vector i = tid + v * kThr
  // of them is this thread's v-th, the same (row, column) in every stage: its source offset at the
  // split's first input and its place in the stage, computed once
  constexpr int XPR = KS * 8;                          // vectors per staged row
  constexpr int XV = (8 * MT * XPR + kThr - 1) / kThr;  // vectors per thread at most
  uint32_t xsrc[XV], xdst[XV];
  int xcol[XV];
#pragma unroll
  for (int v = 0; v < XV; ++v) {
    const int i = tid + v * kThr, row = i / XPR, cv = i % XPR;
    xsrc[v] = (static_cast<uint32_t>(row) * p.k + kt_begin * 64 + cv * 8) * 2;
    xdst[v] = row * XS + cv * 16;
    xcol[v] = i < m_rows * XPR ? kt_begin * 64 + cv * 8 : 0x7FFFFFFF;  // (past the rows: never copied)
  }

  // the copies of stage s (tiles [kt0, kt0 + KS) of this split) into buffer s % P; tiles, groups and
  // inputs outside the split are zero-filled. Stages are issued in order, and each moves every
  // source by a fixed step: the sources are carried from one stage to the next (so they stay in
  // registers rather than being computed again from the thread's coordinates at every stage).
  const uint32_t sm0 = smem_u32(dsm);
  const uint32_t cdst = warp * KS * 512 + lane * 16;  // this lane's 16 bytes of its warp's tile
  const uint4 *cnext = cb + kt_begin * 32;            // the next stage's codes
  int knext = kt_begin;                                // its first tile
  // static groups: a stage holds NG whole groups; lanes 2j and 2j + 1 copy group j's scale pairs (32
  // bytes), lane 16 + j its zero pairs (16 bytes)
  constexpr int NG = KS / G;
  const char *pnext = nullptr, *pnull = nullptr;
  uint32_t pdst = 0;
  int gnext = 0, pstep = 0;
  if constexpr (GT != 0) {
    const int gb = kt_begin / G;
    if (lane < 2 * NG) {
      const int j = lane >> 1, h = (lane & 1) * 16;
      pnext = sbase + (gb + j) * 32 + h, pnull = static_cast<const char *>(p.scales);
      pdst = CB + (warp * KS + j) * 32 + h, gnext = gb + j, pstep = NG * 32;
    } else if (zbase && lane >= 16 && lane < 16 + NG) {
      const int j = lane - 16;
      pnext = zbase + (gb + j) * 16, pnull = zbase;
      pdst = CB + SB + (warp * KS + j) * 16, gnext = gb + j, pstep = NG * 16;
    }
  }
  // x: this thread's vectors' sources and the inputs left in the split past them (<= 0: zero-fill)
  const char *xnext[XV];
  int xleft[XV];
#pragma unroll
  for (int v = 0; v < XV; ++v) {
    xnext[v] = xb + xsrc[v];
    xleft[v] = xcol[v] == 0x7FFFFFFF ? 0 : kx_end - xcol[v];
  }
  auto issue = [&](int s) {
    const uint32_t st = sm0 + (s % P) * stage_bytes;
    if (live && knext + KS <= kt_end) {
#pragma unroll
      for (int i = 0; i < KS; ++i) cp_async16(st + cdst + i * 512, cnext + i * 32, 16);
    } else {
#pragma unroll
      for (int i = 0; i < KS; ++i) {
        const bool in = live && knext + i < kt_end;
        cp_async16(st + cdst + i * 512, in ? cnext + i * 32 : p.codes, in ? 16 : 0);
      }
    }
    if constexpr (GT != 0) {
      if (pnext) {
        const bool in = live && gnext < p.n_groups;
        cp_async16(st + pdst, in ? pnext : pnull, in ? 16 : 0);
      }
      pnext += pstep, gnext += NG;
    } else {
      // group j of the stage is group (kt0 >> gshift) + j: its scale pairs from lanes 2j and 2j + 1,
      // its zero pairs from lane 16 + j; every slot a tile of the stage reads is written
      const int g0 = knext >> gshift, ng = ((knext + KS - 1) >> gshift) - g0 + 1;
      if (lane < 2 * ng) {
        const int j = lane >> 1, gi = g0 + j, h = (lane & 1) * 16;
        const bool in = live && gi < p.n_groups;
        cp_async16(st + CB + (warp * KS + j) * 32 + h, in ? sbase + gi * 32 + h : p.scales, in ? 16 : 0);
      } else if (zbase && lane >= 16 && lane < 16 + ng) {
        const int j = lane - 16, gi = g0 + j;
        const bool in = live && gi < p.n_groups;
        cp_async16(st + CB + SB + (warp * KS + j) * 16, in ? zbase + gi * 16 : zbase, in ? 16 : 0);
      }
    }
    cnext += KS * 32, knext += KS;
    const uint32_t xd = st + CB + SB + ZB;
#pragma unroll
    for (int v = 0; v < XV; ++v) {
      if (xcol[v] == 0x7FFFFFFF) continue;
      const bool in = xleft[v] > 0;
      cp_async16(xd + xdst[v], in ? xnext[v] : xb, in ? 16 : 0);
      xnext[v] += KS * 128, xleft[v] -= KS * 64;
    }
  };

#pragma unroll
  for (int s = 0; s < P - 1; ++s) {
    if (s < nst) issue(s);
    cp_async_commit();
  }

  float acc[MT][4], tot[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][e] = tot[mt][e] = 0.0f;
  // ldmatrix rows: matrix j of an x4 is inputs 8j..8j+7 of a 32-input run; row r of batch tile mt is
  // batch row min(8 mt + r, m - 1)
  uint32_t xoff[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) xoff[mt] = min(mt * 8 + (lane & 7), m_rows - 1) * XS + (lane >> 3) * 16;

  for (int s = 0; s < nst; ++s) {
    cp_async_wait<P - 2>();  // this thread's copies of stage s are in
    __syncthreads();         // everyone's are, and stage s - 1's buffer is free
    if (s + P - 1 < nst) issue(s + P - 1);
    cp_async_commit();
    const unsigned char *st = dsm + (s % P) * stage_bytes;
    const int kt0 = kt_begin + s * KS, g0 = GT ? 0 : kt0 >> gshift;
    const uint32_t *ssm = reinterpret_cast<const uint32_t *>(st + CB + warp * KS * 32) + g;
    const uint16_t *zsm = reinterpret_cast<const uint16_t *>(st + CB + SB + warp * KS * 16) + g;
    const uint32_t xbase = smem_u32(st + CB + SB + ZB);
    const unsigned char *csm = st + warp * KS * 512 + lane * 16;
    uint32_t zlo = 0, zhi = 0;
#pragma unroll
    for (int i = 0; i < KS; ++i) {
      const int kt = kt0 + i;  // (past the split: zero codes times zero x)
      const int j = GT ? i / G : (kt >> gshift) - g0;
      if (GT ? i % G == 0 : (i == 0 || (kt & gmask) == 0)) zero_words<CIUIC_FMT_INT4, BF16>(zbase ? zsm[j * 8] : p.zconst, zlo, zhi);
      const uint4 cur = *reinterpret_cast<const uint4 *>(csm + i * 512);
      uint32_t b[MT][2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        ldsm_x4(b[mt][0], xbase + xoff[mt] + i * 128);
        ldsm_x4(b[mt][1], xbase + xoff[mt] + i * 128 + 64);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint32_t word = q == 0 ? cur.x : q == 1 ? cur.y : q == 2 ? cur.z : cur.w;
        uint32_t a[4];
        dequant<CIUIC_FMT_INT4, BF16>(word, 0, zlo, zhi, a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          mma16816<BF16>(acc[mt], a, b[mt][q >> 1][(q & 1) * 2], b[mt][q >> 1][(q & 1) * 2 + 1]);
      }
      // the group (or the split) ends: scale its sums
      if (GT ? (i + 1) % G == 0 : (((kt + 1) & gmask) == 0 || kt + 1 == kt_end)) {
        const uint32_t s2 = ssm[j * 8];
        const float2 f = __half22float2(*reinterpret_cast<const __half2 *>(&s2));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          tot[mt][0] = fmaf(acc[mt][0], f.x, tot[mt][0]);
          tot[mt][1] = fmaf(acc[mt][1], f.x, tot[mt][1]);
          tot[mt][2] = fmaf(acc[mt][2], f.y, tot[mt][2]);
          tot[mt][3] = fmaf(acc[mt][3], f.y, tot[mt][3]);
          acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;
        }
      }
    }
  }
  cp_async_wait<0>();  // (only empty groups are left)

  // ---- epilogue: lane (g, t) holds rows g, g + 8 of its tile for batch rows 8 mt + 2t, + 1
  T *yo = static_cast<T *>(p.y);
  const T *bias = static_cast<const T *>(p.bias);
  const int t4 = lane & 3;
  if (gridDim.y == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = ntile * 16 + g + 8 * (e >> 1), m = mt * 8 + 2 * t4 + (e & 1);
        if (live && row < p.n && m < m_rows) {
          float v = tot[mt][e];
          if (bias) v += to_f<T>(bias[row]);
          yo[static_cast<size_t>(m) * p.n + row] = from_f<T>(v);
        }
      }
    return;
  }

  // split-K: this split's partial sums, then the last block of the row range adds them up in split order
  const int npad = p.nt * 16;
  const size_t sstride = static_cast<size_t>(m_rows) * npad;
  float *part = p.ws + blockIdx.y * sstride;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = ntile * 16 + g + 8 * (e >> 1), m = mt * 8 + 2 * t4 + (e & 1);
      if (live && m < m_rows) part[static_cast<size_t>(m) * npad + row] = tot[mt][e];
    }
  int *counter = p.counters + blockIdx.x;
  if (!last_split_block(counter, tid == 0, s_last)) return;
  constexpr int NR = NW * 16;
  const int r0 = blockIdx.x * NR;
  for (int i = tid; i < m_rows * NR; i += kThr) {
    const int m = i / NR, row = r0 + (i - m * NR);
    if (row >= p.n) continue;
    float v = sum_splits(p.ws + static_cast<size_t>(m) * npad + row, gridDim.y, sstride);
    if (bias) v += to_f<T>(bias[row]);
    yo[static_cast<size_t>(m) * p.n + row] = from_f<T>(v);
  }
  if (tid == 0) *counter = 0;
}

// Launch the pipelined kernel for one launch of m <= 32 rows (int4, plain linear; CIUIC_STAGE_PIPE).
// Splits: as requested, else the most that keep every block in one wave. *launched is false (nothing
// launched) where the kernel does not apply: x rows not 16-byte aligned or k % 8 != 0, scales or zeros
// not 16-byte aligned, or a ring larger than the device's shared memory; the caller then takes wgemm.
cudaError_t launch_pipe_int4(bool bf16, Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched);

}  // namespace ciuic
