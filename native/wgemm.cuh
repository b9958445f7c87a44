// wgemm.cuh -- weight-only quantized GEMV / small-batch GEMM on tensor cores (sm_80+).
//
// y[m, n] = sum_k x[m, k] * W[n, k], W stored quantized in the tiled layouts of README.md.
//
// One kernel template covers every case:
//   - FMT: int4 / int8 with group scales and zero points, fp8 e4m3 with 128x128 block scales;
//   - activations bf16 or fp16 (x, y, bias share the dtype);
//   - MT = ceil(m / 8) batch tiles of 8 rows (m <= 32 per launch);
//   - MODE: a plain linear, or one of the two grouped MoE steps (gate_up with silu(gate) * up fused,
//     down with the routing weights and the sum over the selected experts fused).
//
// Work split. A block of 4 warps owns 4 * RT row tiles of 16 output rows and one K range (split-K
// over blockIdx.y). Each warp streams its tiles' codes along K with 16-byte loads straight into
// registers (one chunk ahead). x is the B operand of mma.m16n8k16 (weights are the A operand: 16
// rows x 16 inputs per instruction), from shared memory: either staged chunk by chunk with cp.async
// (double-buffered, read back with ldmatrix), or staged once for the block's whole K range in
// fragment order (no barrier in the main loop). Codes are turned
// into exact small integers (q - z) in bf16/fp16 registers with a few bit operations (no lookup, no
// float conversion for int4), multiplied on the tensor cores in fp32, and each group's fp32 sum is
// scaled once by its scale: one FMA per group instead of one multiply per weight.
//
// Split-K partial sums go to an fp32 workspace; the last block of a row range to finish (an atomic
// counter per range) adds them in split order (deterministic), applies the epilogue and resets its
// counter to zero for the next launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "ciuic_kernels.h"

namespace ciuic {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

enum Mode : int { PLAIN = 0, GATEUP = 1, DOWN = 2 };

struct Params {
  const void *x;   // PLAIN: [m, k]; GATEUP: [tokens, k]; DOWN: h [tokens * top_k, k]
  int m;           // rows of x in this launch (PLAIN); 1 for MoE
  int n, k;        // the weight is [n, k] (GATEUP: n = 2 * inter)
  int nt, kt;      // tiles: ceil(n / 16), ceil(k / 64)
  int n_groups;    // scale groups per row (int formats)
  int gshift;      // a group is (1 << gshift) tiles; 31: one group per row
  int kb;          // fp8: block scales per row of blocks, ceil(k / 128)
  const uint4 *codes;
  const void *scales;
  const uint16_t *zeros;  // NULL: zconst
  uint32_t zconst;        // zero-point pair for sym weights
  const void *bias;
  void *y;         // PLAIN: [m, n]; GATEUP: h [tokens * top_k, n / 2]; DOWN: [tokens, n]
  float *ws;       // split-K partial sums
  int *counters;   // split-K arrival counters, one per (blockIdx.z, blockIdx.x)
  int tps;         // tiles of K per split
  int xvec;        // x rows are 16-byte aligned and k % 8 == 0: stage with 16-byte loads
  int whole;       // x staged once for the block's whole K range (batch <= 8), else chunk by chunk
  int wstride;     // bytes per staged x row in whole mode
  // MoE
  const int64_t *ids;
  const float *route_w;
  int top_k;
  int n_experts;
  const unsigned long long *tab_codes;
  const unsigned long long *tab_scales;
  const unsigned long long *tab_zeros;
  // MoE down step on the GEMV: K runs over the slots, each padded to ktp tiles (kflat = top_k * ktp);
  // the slots' expert pointers and routing weights sit in shared memory at byte tab_off
  int ktp, kflat, tab_off;
};

// 16-byte vectors a lane loads per tile: int4 tiles are 512 bytes, int8 and fp8 tiles 1024.
__host__ __device__ constexpr int tile_vectors(int fmt) { return fmt == CIUIC_FMT_INT4 ? 1 : 2; }

// Tiles per chunk (the unit of the register prefetch and of x staging): 8 16-byte loads per lane.
__host__ __device__ constexpr int chunk_tiles(int fmt, int rt) { return 8 / (rt * tile_vectors(fmt)); }

// The code words lane (g, t) feeds k16 step q of a tile whose first and last 16-byte vectors are lo
// and hi (VPT = tile_vectors(fmt)): int4, word q of its one vector (w1 = 0); the 1-byte formats, words
// (x, y) or (z, w) of vector q / 2.
template <int VPT>
__device__ __forceinline__ void step_words(const uint4 &lo, const uint4 &hi, int q, uint32_t &w0, uint32_t &w1) {
  if constexpr (VPT == 1) {
    w0 = q == 0 ? lo.x : q == 1 ? lo.y : q == 2 ? lo.z : lo.w;
    w1 = 0;
  } else {
    const uint4 u = (q >> 1) ? hi : lo;
    w0 = (q & 1) ? u.z : u.x;
    w1 = (q & 1) ? u.w : u.y;
  }
}

// Row tiles per warp of the plain kernel for a batch of mt tiles of 8 rows. A warp's row tiles share
// its x fragments; fewer of them leave more warps to share the work. Measured on an H100 (int4 g128,
// tests/gpu/probe.sh): batch 1 is fastest with 1 (2: +12%, 4: +20%); batch 9-16 also with 1 (14%
// faster than 2 on 7168->18432). CIUIC_I4_RT1 / CIUIC_I4_RT2 override the int4 choice for one and two
// batch tiles (for tuning).
#ifndef CIUIC_I4_F16FMA
#define CIUIC_I4_F16FMA 1  // int4 with fp16 activations: one shift per code word (dequant)
#endif
#ifndef CIUIC_I4_RT1
#define CIUIC_I4_RT1 1
#endif
#ifndef CIUIC_I4_RT2
#define CIUIC_I4_RT2 1
#endif
__host__ __device__ constexpr int plain_rt(int fmt, int mt) {
  return fmt == CIUIC_FMT_INT4 && mt <= 2 ? (mt == 1 ? CIUIC_I4_RT1 : CIUIC_I4_RT2) : (mt == 1 ? 1 : 2);
}

// ------------------------------------------------------------------------------------------ PTX
__device__ __forceinline__ uint4 ld_stream(const uint4 *p) {
  uint4 v;
  // volatile: never hoisted out of the branch that guards it (a NULL expert, a tile past the range)
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Bytes of x picked by `sel` (prmt's default mode): selector nibble i names d's byte i; a nibble with
// bit 3 set gives the sign of the byte it names, replicated over all 8 bits (0x00 or 0xFF).
__device__ __forceinline__ uint32_t prmt_sx(uint32_t x, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(d) : "r"(x), "r"(sel));
  return d;
}

// (a & b) | c in one instruction (the compiler splits it when b and c are both immediates)
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// --------------------------------------------------------------------- 16-bit pair arithmetic
template <bool BF16>
__device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
  if constexpr (BF16) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162 *>(&a), *reinterpret_cast<__nv_bfloat162 *>(&b));
    return *reinterpret_cast<uint32_t *>(&r);
  } else {
    uint32_t r;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
  }
}

__device__ __forceinline__ uint32_t fma2_f16(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

template <bool BF16>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  if constexpr (BF16) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162 *>(&a), *reinterpret_cast<__nv_bfloat162 *>(&b));
    return *reinterpret_cast<uint32_t *>(&r);
  } else {
    uint32_t r;
    asm("mul.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
  }
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&r);
}

// --------------------------------------------------------------------------------- dequant
// Zero-point words for the two rows a lane holds (g and g + 8), from the stored byte pair.
// int4 and int8/fp16: the pair (M + z, M + z) where M is the magic the codes are placed on
// (bf16 128.0 = 0x4300, fp16 1024.0 = 0x6400), so that (M + q) - (M + z) = q - z exactly.
// int8/bf16: fp32 8388608 + z (codes go through fp32: 8 bits do not fit bf16's mantissa).
template <int FMT, bool BF16>
__device__ __forceinline__ void zero_words(uint32_t zr, uint32_t &zlo, uint32_t &zhi) {
  if constexpr (FMT == CIUIC_FMT_FP8) {
    zlo = zhi = 0;
  } else if constexpr (FMT == CIUIC_FMT_INT8 && BF16) {
    zlo = 0x4B000000u | (zr & 0xFFu);
    zhi = 0x4B000000u | ((zr >> 8) & 0xFFu);
  } else {
    const uint32_t mag = BF16 ? 0x43434343u : 0x64646464u;
    zlo = __byte_perm(zr, mag, 0x4040);
    if constexpr (FMT == CIUIC_FMT_INT4 && !BF16 && CIUIC_I4_F16FMA) {
      // int4/fp16: zhi = -(64 + z) for the codes that sit 4 bits up (see dequant)
      const uint32_t t = (zr >> 4) & 0x0FF0u;
      zhi = (t | (t << 16)) | 0xD400D400u;
    } else {
      zhi = __byte_perm(zr, mag, 0x4141);
    }
  }
}

// The A fragment (4 registers of 2 x 16 bits) of one k16 step from the step's code word(s).
// Register i holds row g + 8 * (i & 1), inputs 2t + 8 * (i >> 1) + {0, 1} (the mma's A layout).
template <int FMT, bool BF16>
__device__ __forceinline__ void dequant(uint32_t w0, uint32_t w1, uint32_t zlo, uint32_t zhi, uint32_t (&a)[4]) {
  if constexpr (FMT == CIUIC_FMT_INT4 && !BF16 && CIUIC_I4_F16FMA) {
    // fp16: a nibble 4 bits up the half lands inside the mantissa of 1024.0 as 1024 + 16 q, which
    // one fma by 1/16 with -(64 + z) makes q - z exactly: one shift a word instead of three
    const uint32_t mag = 0x64006400u, lo = 0x000F000Fu, hi = 0x00F000F0u, w8 = w0 >> 8;
    a[0] = sub2<false>(and_or(w0, lo, mag), zlo);
    a[1] = fma2_f16(and_or(w0, hi, mag), 0x2C002C00u, zhi);
    a[2] = sub2<false>(and_or(w8, lo, mag), zlo);
    a[3] = fma2_f16(and_or(w8, hi, mag), 0x2C002C00u, zhi);
  } else if constexpr (FMT == CIUIC_FMT_INT4) {
    // nibble p of w0 is register (p & 3), half (p >> 2)
    const uint32_t mag = BF16 ? 0x43004300u : 0x64006400u, mask = 0x000F000Fu;
    a[0] = sub2<BF16>(and_or(w0, mask, mag), zlo);
    a[1] = sub2<BF16>(and_or(w0 >> 4, mask, mag), zhi);
    a[2] = sub2<BF16>(and_or(w0 >> 8, mask, mag), zlo);
    a[3] = sub2<BF16>(and_or(w0 >> 12, mask, mag), zhi);
  } else if constexpr (FMT == CIUIC_FMT_INT8) {
    // w0 = bytes of registers 0 and 1 (lo, hi, lo, hi); w1 = registers 2 and 3
    if constexpr (BF16) {
      const float fl = __uint_as_float(zlo), fh = __uint_as_float(zhi);
      a[0] = pack_bf16(__uint_as_float(__byte_perm(w0, 0x4B000000u, 0x7440)) - fl,
                       __uint_as_float(__byte_perm(w0, 0x4B000000u, 0x7441)) - fl);
      a[1] = pack_bf16(__uint_as_float(__byte_perm(w0, 0x4B000000u, 0x7442)) - fh,
                       __uint_as_float(__byte_perm(w0, 0x4B000000u, 0x7443)) - fh);
      a[2] = pack_bf16(__uint_as_float(__byte_perm(w1, 0x4B000000u, 0x7440)) - fl,
                       __uint_as_float(__byte_perm(w1, 0x4B000000u, 0x7441)) - fl);
      a[3] = pack_bf16(__uint_as_float(__byte_perm(w1, 0x4B000000u, 0x7442)) - fh,
                       __uint_as_float(__byte_perm(w1, 0x4B000000u, 0x7443)) - fh);
    } else {
      a[0] = sub2<false>(__byte_perm(w0, 0x64646464u, 0x4140), zlo);
      a[1] = sub2<false>(__byte_perm(w0, 0x64646464u, 0x4342), zhi);
      a[2] = sub2<false>(__byte_perm(w1, 0x64646464u, 0x4140), zlo);
      a[3] = sub2<false>(__byte_perm(w1, 0x64646464u, 0x4342), zhi);
    }
  } else {
    // fp8 e4m3: w0 = bytes (r0.lo, r1.lo, r0.hi, r1.hi), w1 likewise for registers 2 and 3.
    // An e4m3 byte s.eeee.mmm becomes the 16-bit pattern s.0000eeee.mmm0000 (bf16) or
    // s.0eeee.mmm0000000 (fp16): the same number times 2^-120 (bf16) or 2^-8 (fp16), subnormals
    // included; one multiply by 2^120 / 2^8 restores it exactly. One prmt puts each of a register's
    // two bytes in the low byte of its half and the byte's sign, replicated, in the high byte
    // (0xSSbb); one shift and one mask keep the sign from the high byte and the 7 bits below it.
    // Selectors: register 0 takes bytes 0 and 2 of its word, register 1 bytes 1 and 3.
    constexpr uint32_t r0 = 0xA280u, r1 = 0xB391u;
    if constexpr (BF16) {
      const uint32_t two120 = 0x7B807B80u, m = 0x87F087F0u;
      a[0] = mul2<true>((prmt_sx(w0, r0) << 4) & m, two120);
      a[1] = mul2<true>((prmt_sx(w0, r1) << 4) & m, two120);
      a[2] = mul2<true>((prmt_sx(w1, r0) << 4) & m, two120);
      a[3] = mul2<true>((prmt_sx(w1, r1) << 4) & m, two120);
    } else {
      const uint32_t two8 = 0x5C005C00u, m = 0xBF80BF80u;
      a[0] = mul2<false>((prmt_sx(w0, r0) << 7) & m, two8);
      a[1] = mul2<false>((prmt_sx(w0, r1) << 7) & m, two8);
      a[2] = mul2<false>((prmt_sx(w1, r0) << 7) & m, two8);
      a[3] = mul2<false>((prmt_sx(w1, r1) << 7) & m, two8);
    }
  }
}

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float silu(float v) { return v / (1.0f + __expf(-v)); }

// Split-K arrival, once a block has written its partial sums: the leader thread counts the block in at
// its row range's counter. True in every thread of the block that arrives last (every other split's
// partials are then visible to it), false in the others. `flag`: a __shared__ int of the kernel.
__device__ __forceinline__ bool last_split_block(int *counter, bool leader, int &flag) {
  __threadfence();
  __syncthreads();
  if (leader) flag = (atomicAdd(counter, 1) == static_cast<int>(gridDim.y) - 1);
  __syncthreads();
  if (!flag) return false;
  __threadfence();
  return true;
}

// Sum of one output's split-K partials in split order (deterministic), four loads in flight at once.
__device__ __forceinline__ float sum_splits(const float *src, int n, size_t stride) {
  float v = 0.0f;
  int s = 0;
  for (; s + 4 <= n; s += 4) {
    const float a = __ldcg(src + s * stride), b = __ldcg(src + (s + 1) * stride);
    const float c = __ldcg(src + (s + 2) * stride), d = __ldcg(src + (s + 3) * stride);
    v += a;
    v += b;
    v += c;
    v += d;
  }
  for (; s < n; ++s) v += __ldcg(src + s * stride);
  return v;
}

// One expert's (or the plain weight's) pointers, its x row(s) and routing weight.
struct Operand {
  const uint4 *codes;
  const void *scales;
  const uint16_t *zeros;
  const void *xrow;
  float rw;
};

template <int MODE, int ACT_BYTES>
__device__ __forceinline__ Operand operand(const Params &p, int z, int j) {
  Operand o;
  const char *xb = static_cast<const char *>(p.x);
  if constexpr (MODE == PLAIN) {
    o.codes = p.codes;
    o.scales = p.scales;
    o.zeros = p.zeros;
    o.xrow = xb;
    o.rw = 1.0f;
  } else {
    const int idx = (MODE == GATEUP) ? z : z * p.top_k + j;
    const int64_t e = __ldg(p.ids + idx);
    const bool ok = e >= 0 && e < p.n_experts;
    o.codes = ok ? reinterpret_cast<const uint4 *>(__ldg(p.tab_codes + e)) : nullptr;
    o.scales = ok ? reinterpret_cast<const void *>(__ldg(p.tab_scales + e)) : nullptr;
    o.zeros = (ok && p.tab_zeros) ? reinterpret_cast<const uint16_t *>(__ldg(p.tab_zeros + e)) : nullptr;
    const int xr = (MODE == GATEUP) ? z / p.top_k : idx;
    o.xrow = xb + static_cast<size_t>(xr) * p.k * ACT_BYTES;
    o.rw = (MODE == DOWN) ? (ok ? __ldg(p.route_w + idx) : 0.0f) : 1.0f;
  }
  return o;
}

// ------------------------------------------------------------------------------------ kernel
// Resident blocks per multiprocessor the register budget is cut for: more warps hide more latency.
#ifndef CIUIC_ACC_CHAINS
#define CIUIC_ACC_CHAINS 1  // 1 measured best at 3 resident blocks per multiprocessor (H100)
#endif
// Diagnostics for tuning (never set in a build the package uses): 1 streams the codes but skips the
// arithmetic (the memory system's ceiling for this loop); 2 does the arithmetic on register values
// without loading codes (the arithmetic's ceiling).
#ifndef CIUIC_PROBE
#define CIUIC_PROBE 0
#endif
#ifndef CIUIC_MIN_BLOCKS_SMALL
#define CIUIC_MIN_BLOCKS_SMALL 3
#endif
template <int MT, int RT>
struct MinBlocks {
  static constexpr int value = (MT * RT <= 2) ? CIUIC_MIN_BLOCKS_SMALL : 2;
};

template <int FMT, bool BF16, int MT, int RT, int MODE>
__global__ void __launch_bounds__(kThreads, MinBlocks<MT, RT>::value) wgemm_kernel(const Params p) {
  using T = typename std::conditional<BF16, __nv_bfloat16, __half>::type;
  constexpr int VPT = tile_vectors(FMT);  // 16-byte vectors per lane per tile
  constexpr int CK = chunk_tiles(FMT, RT);               // tiles per chunk
  constexpr int NV = CK * VPT;                           // vectors per row tile per chunk
  constexpr int CKK = CK * 64;                           // inputs per chunk
  constexpr int RS = CKK * 2 + 16;                       // x row stride in shared memory (bytes)
  constexpr int XR = MT * 8;                             // x rows staged
  static_assert(MODE != GATEUP || RT == 2, "gate_up pairs a gate tile with its up tile");
  static_assert(MODE == PLAIN || MT == 1, "MoE steps take one x row per block");

  // Dynamic shared memory: two chunk buffers of x ([XR][RS] each), or in whole mode the staged rows
  // of x for this block's K range ([rows][wstride], fragment order, see stage_whole).
  extern __shared__ __align__(128) unsigned char dsm[];
  unsigned char *xs[2] = {dsm, dsm + XR * RS};
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int z = blockIdx.z, split = blockIdx.y;
  const int m_rows = (MODE == PLAIN) ? p.m : 1;
  const int npad = p.nt * 16;

  int ntile[RT];
  bool rvalid[RT];
  if constexpr (MODE == GATEUP) {
    const int half = p.nt >> 1;
    const int base = blockIdx.x * kWarps + warp;
    ntile[0] = base;
    ntile[RT - 1] = base + half;
    rvalid[0] = rvalid[RT - 1] = base < half;
  } else {
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      ntile[r] = (blockIdx.x * kWarps + warp) * RT + r;
      rvalid[r] = ntile[r] < p.nt;
    }
  }

  const int kt_begin = split * p.tps;
  const int kt_end = min(p.kt, kt_begin + p.tps);
  const int nchunks = (kt_end - kt_begin + CK - 1) / CK;
  const int nj = (MODE == DOWN) ? p.top_k : 1;
  const int nsteps = nj * nchunks;
  const uint32_t gmask = (1u << p.gshift) - 1u;

#if CIUIC_PROBE == 1
  uint32_t sink = 0;
#endif

  // rows of x beyond m are read by ldmatrix but never staged: zero them once
  for (int i = tid; !p.whole && i < 2 * (XR - m_rows) * (RS / 16); i += kThreads) {
    const int b = i / ((XR - m_rows) * (RS / 16));
    const int o = i - b * (XR - m_rows) * (RS / 16);
    reinterpret_cast<uint4 *>(xs[b] + m_rows * RS)[o] = make_uint4(0, 0, 0, 0);
  }

  // NA independent accumulator chains per (row tile, batch tile): consecutive mma.sync into one
  // accumulator wait for each other, which other warps' work normally hides (NA = 1).
  constexpr int NA = CIUIC_ACC_CHAINS;
  float acc[RT][MT][NA][4], tot[RT][MT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        tot[r][mt][i] = 0.0f;
#pragma unroll
        for (int a = 0; a < NA; ++a) acc[r][mt][a][i] = 0.0f;
      }

  auto step_jc = [&](int step, int &j, int &c) {
    j = (MODE == DOWN) ? step / nchunks : 0;
    c = step - j * nchunks;
  };

  // Codes, scales and zero pairs of one chunk into registers. A chunk that lies wholly inside the
  // K range (all but possibly the last) takes the branch-free path: one base pointer per row tile,
  // constant offsets per tile.
  auto load_w = [&](int step, uint4 (&w)[RT][NV], uint32_t (&sc)[RT][CK], uint32_t (&zr)[RT][CK]) {
    int j, c;
    step_jc(step, j, c);
    const Operand o = operand<MODE, 2>(p, z, j);
    const int kt0 = kt_begin + c * CK;
    const bool full = kt0 + CK <= kt_end;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const bool live = o.codes != nullptr && rvalid[r];
      const uint4 *cb = o.codes + (static_cast<size_t>(ntile[r]) * p.kt + kt0) * (VPT * 32) + lane;
      const float *fb = static_cast<const float *>(o.scales) + static_cast<size_t>(ntile[r] >> 3) * p.kb;
      const size_t gb = static_cast<size_t>(ntile[r]) * p.n_groups * 8 + g;
      const uint32_t *sb = static_cast<const uint32_t *>(o.scales) + gb;
      const uint16_t *zb = o.zeros + gb;
      auto one = [&](int i) {
        const int kt = kt0 + i;
#pragma unroll
        for (int v = 0; v < VPT; ++v) {
#if CIUIC_PROBE == 2
          const uint32_t h = (lane * 0x9E3779B9u) ^ static_cast<uint32_t>(kt * 0x85EBCA6Bu + v);
          w[r][i * VPT + v] = make_uint4(h, h >> 3, h ^ 0x5A5A5A5Au, h + 0x01010101u);
#else
          w[r][i * VPT + v] = ld_stream(cb + (i * VPT + v) * 32);
#endif
        }
        if constexpr (FMT == CIUIC_FMT_FP8) {
          sc[r][i] = __float_as_uint(__ldg(fb + (kt >> 1)));
          zr[r][i] = 0;
        } else {
          const int go = (kt >> p.gshift) * 8;
          sc[r][i] = __ldg(sb + go);
          zr[r][i] = o.zeros ? static_cast<uint32_t>(__ldg(zb + go)) : p.zconst;
        }
      };
      auto none = [&](int i) {
#pragma unroll
        for (int v = 0; v < VPT; ++v) w[r][i * VPT + v] = make_uint4(0, 0, 0, 0);
        sc[r][i] = 0;
        zr[r][i] = p.zconst;
      };
      if (live && full) {
#pragma unroll
        for (int i = 0; i < CK; ++i) one(i);
      } else {
#pragma unroll
        for (int i = 0; i < CK; ++i) {
          if (live && kt0 + i < kt_end) one(i);
          else none(i);
        }
      }
    }
  };

  // x[:, chunk] into shared buffer `buf` (rows < m_rows; inputs past k as zeros).
  auto stage_x = [&](int step, int buf) {
    int j, c;
    step_jc(step, j, c);
    const Operand o = operand<MODE, 2>(p, z, j);
    const int k0 = (kt_begin + c * CK) * 64;
    unsigned char *dst = xs[buf];
    if (p.xvec) {
      constexpr int VPR = CKK / 8;
      const char *xb = static_cast<const char *>(o.xrow);
      for (int i = tid; i < m_rows * VPR; i += kThreads) {
        const int row = i / VPR, cv = i - row * VPR;
        const int kk = k0 + cv * 8;
        const bool in = kk < p.k;
        const char *src = in ? xb + (static_cast<size_t>(row) * p.k + kk) * 2 : xb;
        cp_async16(smem_u32(dst + row * RS + cv * 16), src, in ? 16 : 0);
      }
    } else {
      const uint16_t *xh = static_cast<const uint16_t *>(o.xrow);
      for (int i = tid; i < m_rows * CKK; i += kThreads) {
        const int row = i / CKK, kk = i - row * CKK;
        const int kg = k0 + kk;
        const uint16_t v = kg < p.k ? xh[static_cast<size_t>(row) * p.k + kg] : static_cast<uint16_t>(0);
        *reinterpret_cast<uint16_t *>(dst + row * RS + kk * 2) = v;
      }
    }
  };

  // WHOLE (std::true_type / std::false_type): how x is staged, a compile-time choice so that the
  // inner loop has no branch on it
  auto compute = [&](auto whole_c, int step, int buf, const uint4 (&w)[RT][NV], const uint32_t (&sc)[RT][CK],
                     const uint32_t (&zr)[RT][CK]) {
    constexpr bool WHOLE = decltype(whole_c)::value;
    int j, c;
    step_jc(step, j, c);
    const float rw = (MODE == DOWN) ? operand<MODE, 2>(p, z, j).rw : 1.0f;
    const int kt0 = kt_begin + c * CK;
    const uint32_t xbase = smem_u32(xs[buf]) + (lane & 7) * RS + (lane >> 3) * 16;
    // whole mode: lane (g, t) takes its B words of two k16 steps with one 16-byte load from its
    // batch row (PLAIN: row 8 * mt + g; MoE: lane group 0 only, row j of the staged rows)
    const int brow = (MODE == DOWN) ? j : (MODE == PLAIN ? g : 0);
    const unsigned char *wrow = dsm + brow * p.wstride + t4 * 16 + (kt0 - kt_begin) * 128;
    auto tile = [&](int i) {
      const int kt = kt0 + i;
      uint32_t zlo[RT], zhi[RT];
#pragma unroll
      for (int r = 0; r < RT; ++r) zero_words<FMT, BF16>(zr[r][i], zlo[r], zhi[r]);
#pragma unroll
      for (int qp = 0; qp < 2; ++qp) {
        uint32_t b[MT][4];
        if constexpr (WHOLE) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const bool valid = (MODE == PLAIN) ? mt * 8 + g < m_rows : g == 0;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (valid) v = *reinterpret_cast<const uint4 *>(wrow + mt * 8 * p.wstride + i * 128 + qp * 64);
            b[mt][0] = v.x;
            b[mt][1] = v.y;
            b[mt][2] = v.z;
            b[mt][3] = v.w;
          }
        } else {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) ldsm_x4(b[mt], xbase + mt * 8 * RS + (i * 64 + qp * 32) * 2);
        }
#pragma unroll
        for (int qq = 0; qq < 2; ++qq) {
          const int q = qp * 2 + qq;
#pragma unroll
          for (int r = 0; r < RT; ++r) {
            uint32_t w0, w1;
            step_words<VPT>(w[r][i * VPT], w[r][i * VPT + VPT - 1], q, w0, w1);
#if CIUIC_PROBE == 1
            sink ^= w0 ^ w1 ^ b[0][qq * 2];
            continue;
#endif
            uint32_t a[4];
            dequant<FMT, BF16>(w0, w1, zlo[r], zhi[r], a);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma16816<BF16>(acc[r][mt][q % NA], a, b[mt][qq * 2], b[mt][qq * 2 + 1]);
          }
        }
      }
      // end of a scale group (or of this K range): scale the group's sums into the totals
      if ((((kt + 1) & gmask) == 0) || kt + 1 == kt_end) {
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          float sx, sy;
          if constexpr (FMT == CIUIC_FMT_FP8) {
            sx = sy = __uint_as_float(sc[r][i]) * rw;
          } else {
            const uint32_t s2 = sc[r][i];
            const float2 f = __half22float2(*reinterpret_cast<const __half2 *>(&s2));
            sx = f.x * rw;
            sy = f.y * rw;
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              v[e] = acc[r][mt][0][e];
#pragma unroll
              for (int a = 1; a < NA; ++a) v[e] += acc[r][mt][a][e];
#pragma unroll
              for (int a = 0; a < NA; ++a) acc[r][mt][a][e] = 0.0f;
            }
            tot[r][mt][0] = fmaf(v[0], sx, tot[r][mt][0]);
            tot[r][mt][1] = fmaf(v[1], sx, tot[r][mt][1]);
            tot[r][mt][2] = fmaf(v[2], sy, tot[r][mt][2]);
            tot[r][mt][3] = fmaf(v[3], sy, tot[r][mt][3]);
          }
        }
      }
    };
    if (kt0 + CK <= kt_end) {
#pragma unroll
      for (int i = 0; i < CK; ++i) tile(i);
    } else {
#pragma unroll
      for (int i = 0; i < CK; ++i)
        if (kt0 + i < kt_end) tile(i);
    }
  };

  // x rows for the whole K range, once, in fragment order: within each run of 32 inputs, lane t's
  // 16 bytes are inputs (2t, 2t+1, 2t+8, 2t+9) of the first k16 step, then of the second.
  auto stage_whole = [&]() {
    const int nrows = (MODE == PLAIN) ? m_rows : (MODE == DOWN ? p.top_k : 1);
    const int k0 = kt_begin * 64, span = (kt_end - kt_begin) * 64;
    for (int r = 0; r < nrows; ++r) {
      const Operand o = operand<MODE, 2>(p, z, r);
      const uint16_t *xh = static_cast<const uint16_t *>(o.xrow) + (MODE == PLAIN ? static_cast<size_t>(r) * p.k : 0);
      unsigned char *dst = dsm + r * p.wstride;
      if (p.xvec) {
        // eight 16-byte loads in flight per thread before any store (one L2 round trip, not eight)
        constexpr int U = 8;
        for (int v0 = tid; v0 < span / 8; v0 += U * kThreads) {
          uint4 val[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int kg = k0 + (v0 + u * kThreads) * 8;
            val[u] = make_uint4(0, 0, 0, 0);
            if (v0 + u * kThreads < span / 8 && kg < p.k) val[u] = __ldg(reinterpret_cast<const uint4 *>(xh + kg));
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int e = (v0 + u * kThreads) * 8;
            if (e >= span) break;
            const int base = (e >> 5) * 64 + (((e & 31) >> 4) * 2 + ((e & 15) >> 3)) * 4;
            *reinterpret_cast<uint32_t *>(dst + base + 0) = val[u].x;
            *reinterpret_cast<uint32_t *>(dst + base + 16) = val[u].y;
            *reinterpret_cast<uint32_t *>(dst + base + 32) = val[u].z;
            *reinterpret_cast<uint32_t *>(dst + base + 48) = val[u].w;
          }
        }
      } else {
        for (int e = tid; e < span; e += kThreads) {
          const int kg = k0 + e;
          const uint16_t val = kg < p.k ? xh[kg] : static_cast<uint16_t>(0);
          const int w = e & 15;
          const int off = (e >> 5) * 64 + ((w & 7) >> 1) * 16 + (((e & 31) >> 4) * 2 + (w >> 3)) * 4 + (w & 1) * 2;
          *reinterpret_cast<uint16_t *>(dst + off) = val;
        }
      }
    }
  };

  uint4 wA[RT][NV], wB[RT][NV];
  uint32_t sA[RT][CK], zA[RT][CK], sB[RT][CK], zB[RT][CK];
  if (p.whole) {
    // ---- whole mode: no barrier in the loop; each warp streams on its own, one chunk ahead
    if (nsteps > 0) load_w(0, wA, sA, zA);
    stage_whole();
    __syncthreads();
    for (int s = 0; s < nsteps; s += 2) {
      if (s + 1 < nsteps) load_w(s + 1, wB, sB, zB);
      if (rvalid[0]) compute(std::true_type{}, s, 0, wA, sA, zA);
      if (s + 1 >= nsteps) break;
      if (s + 2 < nsteps) load_w(s + 2, wA, sA, zA);
      if (rvalid[0]) compute(std::true_type{}, s + 1, 0, wB, sB, zB);
    }
  }
  // ---- chunk mode: chunk s computes while chunk s + 1 (codes and x) is in flight
  if (nsteps > 0 && !p.whole) {
    load_w(0, wA, sA, zA);
    stage_x(0, 0);
  }
  cp_async_commit();
  for (int s = 0; s < nsteps && !p.whole; s += 2) {
    if (s + 1 < nsteps) {
      load_w(s + 1, wB, sB, zB);
      stage_x(s + 1, 1);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (rvalid[0]) compute(std::false_type{}, s, 0, wA, sA, zA);
    __syncthreads();
    if (s + 1 >= nsteps) break;
    if (s + 2 < nsteps) {
      load_w(s + 2, wA, sA, zA);
      stage_x(s + 2, 0);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (rvalid[0]) compute(std::false_type{}, s + 1, 1, wB, sB, zB);
    __syncthreads();
  }
  cp_async_wait<0>();

  // ---- epilogue
#if CIUIC_PROBE == 1
  if (sink == 0x9E3779B9u) tot[0][0][0] += 1.0f;
#endif
  T *yo = static_cast<T *>(p.y);
  const T *bias = static_cast<const T *>(p.bias);
  if (gridDim.y == 1) {
    if constexpr (MODE == PLAIN) {
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int row = ntile[r] * 16 + g + 8 * (i >> 1);
            const int m = mt * 8 + 2 * t4 + (i & 1);
            if (rvalid[r] && row < p.n && m < m_rows) {
              float v = tot[r][mt][i];
              if (bias) v += to_f<T>(bias[row]);
              yo[static_cast<size_t>(m) * p.n + row] = from_f<T>(v);
            }
          }
    } else if constexpr (MODE == GATEUP) {
      const int inter = p.n >> 1;
      if (rvalid[0] && t4 == 0) {
#pragma unroll
        for (int i = 0; i < 4; i += 2) {
          const int row = ntile[0] * 16 + g + 8 * (i >> 1);
          yo[static_cast<size_t>(z) * inter + row] = from_f<T>(silu(tot[0][0][i]) * tot[RT - 1][0][i]);
        }
      }
    } else {
      if (rvalid[0] && t4 == 0) {
#pragma unroll
        for (int i = 0; i < 4; i += 2) {
          const int row = ntile[0] * 16 + g + 8 * (i >> 1);
          if (row < p.n) yo[static_cast<size_t>(z) * p.n + row] = from_f<T>(tot[0][0][i]);
        }
      }
    }
    return;
  }

  // split-K: write this split's partial sums, the last block of the range adds them up
  const size_t zstride = static_cast<size_t>(m_rows) * npad;
  float *part = p.ws + (static_cast<size_t>(split) * gridDim.z + z) * zstride;
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = ntile[r] * 16 + g + 8 * (i >> 1);
        const int m = mt * 8 + 2 * t4 + (i & 1);
        if (rvalid[r] && m < m_rows) part[static_cast<size_t>(m) * npad + row] = tot[r][mt][i];
      }
  int *counter = p.counters + static_cast<size_t>(z) * gridDim.x + blockIdx.x;
  if (!last_split_block(counter, tid == 0, s_last)) return;
  const int nsplit = gridDim.y;
  const size_t sstride = static_cast<size_t>(gridDim.z) * zstride;
  const float *base = p.ws + static_cast<size_t>(z) * zstride;
  if constexpr (MODE == PLAIN) {
    constexpr int NR = kWarps * RT * 16;
    const int r0 = blockIdx.x * NR;
    for (int i = tid; i < m_rows * NR; i += kThreads) {
      const int m = i / NR, row = r0 + (i - m * NR);
      if (row >= p.n) continue;
      float v = sum_splits(base + static_cast<size_t>(m) * npad + row, nsplit, sstride);
      if (bias) v += to_f<T>(bias[row]);
      yo[static_cast<size_t>(m) * p.n + row] = from_f<T>(v);
    }
  } else if constexpr (MODE == GATEUP) {
    const int inter = p.n >> 1;
    const int r0 = blockIdx.x * kWarps * 16;
    for (int i = tid; i < kWarps * 16; i += kThreads) {
      const int row = r0 + i;
      if (row >= inter) continue;
      const float gs = sum_splits(base + row, nsplit, sstride);
      const float us = sum_splits(base + row + inter, nsplit, sstride);
      yo[static_cast<size_t>(z) * inter + row] = from_f<T>(silu(gs) * us);
    }
  } else {
    const int r0 = blockIdx.x * kWarps * 16;
    for (int i = tid; i < kWarps * 16; i += kThreads) {
      const int row = r0 + i;
      if (row >= p.n) continue;
      yo[static_cast<size_t>(z) * p.n + row] = from_f<T>(sum_splits(base + row, nsplit, sstride));
    }
  }
  if (tid == 0) *counter = 0;
}

// ------------------------------------------------------------------------------ host side
// What the split-K plan needs to know besides the kernel's own occupancy.
constexpr int kWholeBudget = 64 * 1024;    // shared memory for x staged whole (3 blocks fit an SM)
constexpr int kWholeMaxBytes = 96 * 1024;  // the dynamic shared memory limit the kernels are opened to

struct SplitRequest {
  int requested;             // 0: choose; > 0: this many splits (clamped to what fits)
  int min_splits;            // at least this many (0: no minimum)
  int stage_rows;            // x rows a block stages (batch rows, or top_k for the MoE down step)
  int staging;               // CIUIC_STAGE_AUTO / _WHOLE / _CHUNK
  int mt;                    // batch tiles of the kernel (set by the launcher)
  int blocks_xz;             // blocks without split-K (grid.x * grid.z)
  int64_t floats_per_split;  // workspace floats one split needs
  bool has_workspace;
  int64_t ws_floats;         // room for partial sums
};

// Multiprocessors and shared memory per multiprocessor of the current device (api.cu, cached).
int sm_count();
int sm_shared_bytes();

// The most K splits whose partial sums the workspace holds for `blocks` blocks per split (api.cu).
int workspace_splits(const SplitRequest &rq, int blocks);

// Splits and tiles per split for a kernel of `ck` tiles per chunk of which `occ` blocks fit on a
// multiprocessor (api.cu).
int plan_splits(const SplitRequest &rq, int kt, int ck, int occ, int *tps);

// Let `kernel` use up to `max_smem` bytes of dynamic shared memory and return how many of its blocks
// of `threads` fit on a multiprocessor with `smem` bytes each; 0 when either call fails (this device
// cannot open it that far, or the query fails). A failure's error is cleared here, so that the next
// launch's check does not take it for its own.
template <class Kernel>
int open_and_fit(Kernel kernel, int threads, int max_smem, int smem) {
  int v = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, threads, smem) != cudaSuccess || v <= 0) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

// As open_and_fit, `fallback` when it fails.
template <class Kernel>
int resident_blocks(Kernel kernel, int threads, int max_smem, int smem, int fallback) {
  const int v = open_and_fit(kernel, threads, max_smem, smem);
  return v > 0 ? v : fallback;
}

// Launch one instantiation with its split-K plan; returns the launch's error.
template <int FMT, bool BF16, int MT, int RT, int MODE>
cudaError_t launch_wgemm(Params p, dim3 grid, const SplitRequest &rq, cudaStream_t stream) {
  constexpr int CK = chunk_tiles(FMT, RT);
  constexpr int chunk_bytes = 2 * MT * 8 * (CK * 64 * 2 + 16);  // two x chunk buffers
  auto kernel = wgemm_kernel<FMT, BF16, MT, RT, MODE>;
  // resident blocks per multiprocessor (registers, shared memory), once per instantiation
  static const int occ = resident_blocks(kernel, kThreads, kWholeMaxBytes, chunk_bytes, 2);
  const int ck = CK;
  int tps = 0;
  SplitRequest r1 = rq;
  r1.mt = MT;
  int s = plan_splits(r1, p.kt, ck, occ, &tps);
  int smem = chunk_bytes;
  p.whole = 0;
  {
    // whole mode when asked for, and by default for one row of int8 weights, if the staged rows fit
    // the budget (with more splits if that makes them fit); chunk mode otherwise. Measured on an H100
    // (DeepSeek-V3's two large shapes, native/README.md): one row of int8 is 0.4-5.4 us faster in
    // whole mode; fp8 is faster in chunk mode on one of the two, and four rows of either mostly are.
    // Rows are padded by 64 bytes: the 8 rows one 16-byte shared load reads fall in distinct banks.
    const bool whole = rq.staging == CIUIC_STAGE_WHOLE ||
                       (rq.staging == CIUIC_STAGE_AUTO && FMT == CIUIC_FMT_INT8 && MODE == PLAIN && p.m == 1);
    const int rows = rq.stage_rows;
    auto bytes = [&](int t) { return rows * (t * 128 + 64); };
    if (whole && bytes(tps) > kWholeBudget && rq.requested == 0) {
      const int fit = ((kWholeBudget / rows) - 64) / 128 / ck * ck;  // tiles per split that fit
      if (fit >= ck) {
        SplitRequest r2 = r1;
        r2.min_splits = (p.kt + fit - 1) / fit;
        s = plan_splits(r2, p.kt, ck, occ, &tps);
      }
    }
    if (whole && bytes(tps) <= kWholeBudget) {
      p.whole = 1;
      p.wstride = tps * 128 + 64;
      smem = bytes(tps);
    }
  }
  grid.y = s;
  p.tps = tps;
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Per-format entry points (one translation unit each, compiled in parallel).
#define CIUIC_LAUNCH_ARGS const Params &p, dim3 grid, const SplitRequest &rq, cudaStream_t s
cudaError_t launch_plain_int4(bool bf16, int mt, CIUIC_LAUNCH_ARGS);
cudaError_t launch_plain_int8(bool bf16, int mt, CIUIC_LAUNCH_ARGS);
cudaError_t launch_plain_fp8(bool bf16, int mt, CIUIC_LAUNCH_ARGS);
cudaError_t launch_moe_int4(bool bf16, int mode, CIUIC_LAUNCH_ARGS);
cudaError_t launch_moe_int8(bool bf16, int mode, CIUIC_LAUNCH_ARGS);
cudaError_t launch_moe_fp8(bool bf16, int mode, CIUIC_LAUNCH_ARGS);

}  // namespace ciuic

// Instantiations of one format (used by wgemm_<fmt>.cu).
#define CIUIC_DEFINE_FORMAT(NAME, FMT)                                                                 \
  namespace ciuic {                                                                                    \
  template <bool BF16>                                                                                 \
  static cudaError_t plain_##NAME(int mt, CIUIC_LAUNCH_ARGS) {                                         \
    switch (mt) {                                                                                      \
      case 1: return launch_wgemm<FMT, BF16, 1, plain_rt(FMT, 1), PLAIN>(p, grid, rq, s);              \
      case 2: return launch_wgemm<FMT, BF16, 2, plain_rt(FMT, 2), PLAIN>(p, grid, rq, s);              \
      case 3: return launch_wgemm<FMT, BF16, 3, plain_rt(FMT, 3), PLAIN>(p, grid, rq, s);              \
      default: return launch_wgemm<FMT, BF16, 4, plain_rt(FMT, 4), PLAIN>(p, grid, rq, s);             \
    }                                                                                                  \
  }                                                                                                    \
  cudaError_t launch_plain_##NAME(bool bf16, int mt, CIUIC_LAUNCH_ARGS) {                              \
    return bf16 ? plain_##NAME<true>(mt, p, grid, rq, s) : plain_##NAME<false>(mt, p, grid, rq, s);    \
  }                                                                                                    \
  cudaError_t launch_moe_##NAME(bool bf16, int mode, CIUIC_LAUNCH_ARGS) {                              \
    if (mode == GATEUP)                                                                                \
      return bf16 ? launch_wgemm<FMT, true, 1, 2, GATEUP>(p, grid, rq, s)                              \
                  : launch_wgemm<FMT, false, 1, 2, GATEUP>(p, grid, rq, s);                            \
    return bf16 ? launch_wgemm<FMT, true, 1, 1, DOWN>(p, grid, rq, s)                                  \
                : launch_wgemm<FMT, false, 1, 1, DOWN>(p, grid, rq, s);                                \
  }                                                                                                    \
  }
