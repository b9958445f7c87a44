// tma_gemv.cu -- a probe (tests/gpu/probe_tma.py), not part of the library: the int4 GEMV (batch 1,
// bf16, groups of 128 inputs with zero points, K a multiple of 256) with its codes fed through the
// bulk copy engine instead of registers.
//
// One persistent block a multiprocessor owns a contiguous run of the weight's tiles (the cuda_i4x16
// layout: [NT][KT] tiles of 512 bytes, K fastest), `per` tiles (a multiple of 4, at least KT). Its last
// warp issues one cp.async.bulk per stage of CH = 4 NC tiles into a ring of `stages` stages in shared
// memory, completing on the stage's mbarrier; consumer warp w takes tiles 4w..4w+3 of every stage (two
// groups of one row tile), copies its codes to registers, releases the stage and computes them as the
// library's GEMV does (same dequant, same mma). A consumer's sums per row tile go to its own slots in
// shared memory when its row tile changes; at the end the slots are added in consumer order. A row
// tile split between two blocks is finished by the second of them to arrive (partials in `ws`, an
// arrival counter per row tile, added in block order and the counter reset): deterministic.
#include "wgemm.cuh"

#ifndef NC
#define NC 8  // consumer warps
#endif
#ifndef PFB
#define PFB 4  // bodies ahead whose scale and zero pairs are in flight
#endif
#ifndef SZ_NA
#define SZ_NA 0  // scale and zero pairs loaded past L1
#endif
#define MAXST 16

using namespace ciuic;

__device__ __forceinline__ void mb_init(unsigned long long *b, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mb_wait(unsigned long long *b, int ph) {
  unsigned ok = 0;
  while (!ok)
    asm volatile("{ .reg .pred P; mbarrier.try_wait.parity.shared::cta.b64 P, [%1], %2; selp.u32 %0, 1, 0, P; }"
                 : "=r"(ok)
                 : "r"(smem_u32(b)), "r"(ph)
                 : "memory");
}
__device__ __forceinline__ void mb_arrive(unsigned long long *b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
}

extern "C" __global__ void __launch_bounds__((NC + 1) * 32, 1)
    tma_gemv(const uint4 *codes, const uint32_t *scales, const uint16_t *zeros, const __nv_bfloat16 *x,
             __nv_bfloat16 *y, float *ws, int *counters, int n, int k, int nt, int kt, int n_groups, int per,
             int stages) {
#if __CUDA_ARCH__ >= 900
  constexpr int CH = 4 * NC;  // tiles a stage
  extern __shared__ __align__(128) unsigned char dsm[];
  __shared__ __align__(8) unsigned long long full[MAXST], empty[MAXST];
  __shared__ int s_last[2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const long long total = static_cast<long long>(nt) * kt;
  const long long t0 = static_cast<long long>(blockIdx.x) * per;
  const long long t1 = min(total, t0 + per);
  if (t0 >= t1) return;
  const int nch = static_cast<int>((t1 - t0 + CH - 1) / CH);
  const int rt_first = static_cast<int>(t0 / kt), rt_last = static_cast<int>((t1 - 1) / kt);
  const int nrt = rt_last - rt_first + 1;
  unsigned char *xs = dsm;                                   // x: kt * 64 inputs
  unsigned char *ring = dsm + static_cast<size_t>(kt) * 128;  // stages * CH tiles
  float *slots = reinterpret_cast<float *>(ring + static_cast<size_t>(stages) * CH * 512);  // [NC][nrt][16]

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mb_init(&full[s], 1);
      mb_init(&empty[s], NC);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == NC) {  // the producer
    if (lane == 0) {
      for (int c = 0; c < nch; ++c) {
        const int s = c % stages, ph = (c / stages) & 1;
        if (c >= stages) mb_wait(&empty[s], ph ^ 1);
        const long long tc = t0 + static_cast<long long>(c) * CH;
        const unsigned bytes = static_cast<unsigned>(min(static_cast<long long>(CH), t1 - tc)) * 512u;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(&full[s])), "r"(bytes)
                     : "memory");
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                smem_u32(ring + static_cast<size_t>(s) * CH * 512)),
            "l"(codes + tc * 32), "r"(bytes), "r"(smem_u32(&full[s]))
            : "memory");
      }
    }
    return;
  }

  // consumers: x (zeros past k), their slots zeroed
  for (int i = threadIdx.x; i < kt * 8; i += NC * 32) {
    const bool in = i * 8 < k;
    cp_async16(smem_u32(xs + i * 16), in ? reinterpret_cast<const char *>(x) + i * 16 : reinterpret_cast<const char *>(x),
               in ? 16 : 0);
  }
  cp_async_commit();
  for (int i = lane; i < nrt * 16; i += 32) slots[(warp * nrt) * 16 + i] = 0.0f;
  cp_async_wait<0>();
  asm volatile("bar.sync 1, %0;" ::"r"(NC * 32) : "memory");

  const uint32_t xaddr = smem_u32(xs) + (lane >> 3) * 16;
  float tot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int rt_cur = -1;
  auto flush = [&]() {
    if (rt_cur >= 0 && t4 == 0) {
      float *sl = slots + (warp * nrt + (rt_cur - rt_first)) * 16;
      sl[g] += tot[0];
      sl[g + 8] += tot[2];
    }
    tot[0] = tot[1] = tot[2] = tot[3] = 0.0f;
  };
  // this warp's body of chunk c: tiles t0 + c * CH + 4 w .. + 3; its scale and zero pairs PFB bodies ahead
  auto body_tile = [&](int c) { return t0 + static_cast<long long>(c) * CH + 4 * warp; };
  auto load_sz = [&](int c, uint32_t (&v)[4]) {
    const long long tb = body_tile(c);
    v[0] = v[1] = v[2] = v[3] = 0;
    if (c < nch && tb < t1) {
      const int rt = static_cast<int>(tb / kt), grp = static_cast<int>(tb - static_cast<long long>(rt) * kt) >> 1;
      const size_t gb = (static_cast<size_t>(rt) * n_groups + grp) * 8 + g;
#if SZ_NA
      // past L1 (the ring takes most of the multiprocessor's shared memory and so of its L1)
      asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v[0]) : "l"(scales + gb));
      asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v[1]) : "l"(scales + gb + 8));
      unsigned short z0, z1;
      asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(z0) : "l"(zeros + gb));
      asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(z1) : "l"(zeros + gb + 8));
      v[2] = z0;
      v[3] = z1;
#else
      v[0] = __ldg(scales + gb);
      v[1] = __ldg(scales + gb + 8);
      v[2] = __ldg(zeros + gb);
      v[3] = __ldg(zeros + gb + 8);
#endif
    }
  };
  uint32_t sz[PFB][4];
#pragma unroll
  for (int j = 0; j < PFB; ++j) load_sz(j, sz[j]);
  for (int c = 0; c < nch; ++c) {
    const int s = c % stages, ph = (c / stages) & 1;
    const long long tb = body_tile(c);
    uint32_t cur[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) cur[e] = sz[0][e];
#pragma unroll
    for (int j = 0; j + 1 < PFB; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) sz[j][e] = sz[j + 1][e];
    load_sz(c + PFB, sz[PFB - 1]);
    mb_wait(&full[s], ph);
    uint4 w[4];
    const bool have = tb < t1;
    if (have) {
      const uint4 *q = reinterpret_cast<const uint4 *>(ring + static_cast<size_t>(s) * CH * 512) + warp * 128 + lane;
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = q[i * 32];
    }
    __syncwarp();
    if (lane == 0) mb_arrive(&empty[s]);
    if (have) {
      const int rt = static_cast<int>(tb / kt), ktb = static_cast<int>(tb - static_cast<long long>(rt) * kt);
      if (rt != rt_cur) {
        flush();
        rt_cur = rt;
      }
      float ac[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
      uint32_t zl[2], zh[2];
      zero_words<CIUIC_FMT_INT4, true>(cur[2], zl[0], zh[0]);
      zero_words<CIUIC_FMT_INT4, true>(cur[3], zl[1], zh[1]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int gi = 0; gi < 2; ++gi) {  // the two groups' chains side by side
          const int i = 2 * gi + j;
          uint32_t b[2][4];
          ldsm_x4(b[0], xaddr + (ktb + i) * 128);
          ldsm_x4(b[1], xaddr + (ktb + i) * 128 + 64);
#pragma unroll
          for (int qq = 0; qq < 4; ++qq) {
            const uint32_t word = qq == 0 ? w[i].x : qq == 1 ? w[i].y : qq == 2 ? w[i].z : w[i].w;
            uint32_t a[4];
            dequant<CIUIC_FMT_INT4, true>(word, 0, zl[gi], zh[gi], a);
            mma16816<true>(ac[gi], a, b[qq >> 1][(qq & 1) * 2], b[qq >> 1][(qq & 1) * 2 + 1]);
          }
        }
      }
#pragma unroll
      for (int gi = 0; gi < 2; ++gi) {
        const uint32_t s2 = cur[gi];
        const float2 f = __half22float2(*reinterpret_cast<const __half2 *>(&s2));
        tot[0] = fmaf(ac[gi][0], f.x, tot[0]);
        tot[1] = fmaf(ac[gi][1], f.x, tot[1]);
        tot[2] = fmaf(ac[gi][2], f.y, tot[2]);
        tot[3] = fmaf(ac[gi][3], f.y, tot[3]);
      }
    }
  }
  flush();
  asm volatile("bar.sync 1, %0;" ::"r"(NC * 32) : "memory");

  // the block's row tiles: whole ones stored, a split one finished by the second block to arrive
  const bool first_split = t0 % kt != 0, last_split = t1 % kt != 0 && t1 < total;
  for (int i = threadIdx.x; i < nrt * 16; i += NC * 32) {
    const int r = i >> 4, row = i & 15, rt = rt_first + r;
    float v = 0.0f;
    for (int ww = 0; ww < NC; ++ww) v += slots[(ww * nrt + r) * 16 + row];
    const bool split = (r == 0 && first_split) || (r == nrt - 1 && last_split);
    if (!split) {
      if (rt * 16 + row < n) y[rt * 16 + row] = __float2bfloat16_rn(v);
    } else {
      const int side = (r == 0 && first_split) ? 1 : 0;  // 0: the row tile's first part, 1: its second
      ws[(static_cast<size_t>(rt) * 2 + side) * 16 + row] = v;
    }
  }
  __threadfence();
  asm volatile("bar.sync 1, %0;" ::"r"(NC * 32) : "memory");
  if (threadIdx.x < 2) {
    const int which = threadIdx.x;  // 0: the first row tile, 1: the last
    const bool split = which == 0 ? first_split : last_split;
    const int rt = which == 0 ? rt_first : rt_last;
    s_last[which] = 0;
    if (split && !(which == 1 && nrt == 1 && first_split)) s_last[which] = atomicAdd(counters + rt, 1) == 1;
  }
  asm volatile("bar.sync 1, %0;" ::"r"(NC * 32) : "memory");
  for (int which = 0; which < 2; ++which) {
    if (!s_last[which]) continue;
    __threadfence();
    const int rt = which == 0 ? rt_first : rt_last;
    if (threadIdx.x < 16) {
      const int row = threadIdx.x;
      const float v = ws[(static_cast<size_t>(rt) * 2) * 16 + row] + ws[(static_cast<size_t>(rt) * 2 + 1) * 16 + row];
      if (rt * 16 + row < n) y[rt * 16 + row] = __float2bfloat16_rn(v);
    }
    if (threadIdx.x == 0) counters[rt] = 0;
  }
#endif
}
