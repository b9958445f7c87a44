// repack.cu -- from the project's row-major packed format (ciuic_lab.quant.pack) to the tiled
// layouts the kernels read (README.md). Runs once per weight, at apply time, on the GPU.
#include <cuda_runtime.h>
#include <stdint.h>

#include "ciuic_kernels.h"

namespace ciuic {

// Where the byte/nibble `p` of a lane's code word lands in the weight: the lane's row tile
// coordinates in, (row within tile, input within tile) out. `q` is the k16 step (0..3) of the tile,
// g = lane / 4, t = lane % 4, `reg`/`half` the mma A-fragment register and its 16-bit half.
__device__ __forceinline__ void frag_pos(int g, int t, int q, int reg, int half, int &row, int &col) {
  row = g + 8 * (reg & 1);
  col = q * 16 + 2 * t + 8 * (reg >> 1) + half;
}

// int4: a tile is 32 lanes x 4 words; word q of lane l holds the 8 codes of k16 step q:
// nibble p is register (p & 3), half (p >> 2).
__global__ void repack_int4_kernel(const uint8_t *__restrict__ codes, int n, int k, int rb, int kt,
                                   int64_t words, uint32_t *__restrict__ out) {
  for (int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; w < words;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int q = static_cast<int>(w & 3), lane = static_cast<int>((w >> 2) & 31);
    const int64_t tile = w >> 7;
    const int nt_i = static_cast<int>(tile / kt), kt_i = static_cast<int>(tile % kt);
    const int g = lane >> 2, t = lane & 3;
    uint32_t word = 0;
#pragma unroll
    for (int pn = 0; pn < 8; ++pn) {
      int row, col;
      frag_pos(g, t, q, pn & 3, pn >> 2, row, col);
      row += nt_i * 16;
      col += kt_i * 64;
      uint32_t code = 0;
      if (row < n && col < k) {
        const uint8_t b = codes[static_cast<int64_t>(row) * rb + (col >> 1)];
        code = (col & 1) ? (b >> 4) : (b & 15u);
      }
      word |= code << (4 * pn);
    }
    out[w] = word;
  }
}

// int8 and fp8: a tile is two halves of 32 lanes x 16 bytes; half v of lane l holds k16 steps
// 2v and 2v + 1, two words each. Word h of a step holds registers 2h and 2h + 1:
//   int8: bytes (r.lo, r.hi, r'.lo, r'.hi)      fp8: bytes (r.lo, r'.lo, r.hi, r'.hi)
__global__ void repack_byte_kernel(const uint8_t *__restrict__ codes, int n, int k, int rb, int kt,
                                   int fp8, int64_t words, uint32_t *__restrict__ out) {
  for (int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; w < words;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int wi = static_cast<int>(w & 255);
    const int64_t tile = w >> 8;
    const int v = wi >> 7, lane = (wi >> 2) & 31, q = v * 2 + ((wi >> 1) & 1), h = wi & 1;
    const int nt_i = static_cast<int>(tile / kt), kt_i = static_cast<int>(tile % kt);
    const int g = lane >> 2, t = lane & 3;
    uint32_t word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int reg = fp8 ? 2 * h + (b & 1) : 2 * h + (b >> 1);
      const int half = fp8 ? (b >> 1) : (b & 1);
      int row, col;
      frag_pos(g, t, q, reg, half, row, col);
      row += nt_i * 16;
      col += kt_i * 64;
      const uint32_t code = (row < n && col < k) ? codes[static_cast<int64_t>(row) * rb + col] : 0u;
      word |= code << (8 * b);
    }
    out[w] = word;
  }
}

// Scale and zero-point pairs: entry (tile, group, g) holds rows 16 * tile + g and 16 * tile + g + 8.
__global__ void repack_groups_kernel(const uint16_t *__restrict__ scales, const uint8_t *__restrict__ zeros,
                                     int n, int n_groups, int64_t entries, uint32_t *__restrict__ out_s,
                                     uint16_t *__restrict__ out_z) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < entries;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int g = static_cast<int>(i & 7);
    const int64_t rest = i >> 3;
    const int gi = static_cast<int>(rest % n_groups);
    const int nt_i = static_cast<int>(rest / n_groups);
    const int r0 = nt_i * 16 + g, r1 = r0 + 8;
    const uint32_t s0 = r0 < n ? scales[static_cast<int64_t>(r0) * n_groups + gi] : 0u;
    const uint32_t s1 = r1 < n ? scales[static_cast<int64_t>(r1) * n_groups + gi] : 0u;
    out_s[i] = s0 | (s1 << 16);
    if (out_z) {
      const uint32_t z0 = (r0 < n && zeros) ? zeros[static_cast<int64_t>(r0) * n_groups + gi] : 0u;
      const uint32_t z1 = (r1 < n && zeros) ? zeros[static_cast<int64_t>(r1) * n_groups + gi] : 0u;
      out_z[i] = static_cast<uint16_t>(z0 | (z1 << 8));
    }
  }
}

static unsigned grid_for(int64_t items) {
  const int64_t blocks = (items + 255) / 256;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

}  // namespace ciuic

using namespace ciuic;

extern "C" int ciuic_repack_int(int bits, const uint8_t *codes, const uint16_t *scales, const uint8_t *zeros,
                                int n, int k, int n_groups, void *out_codes, void *out_scales, void *out_zeros,
                                ciuic_stream_t stream) {
  if (bits != 4 && bits != 8) return CIUIC_ERR_FORMAT;
  if (n <= 0 || k <= 0 || n_groups <= 0) return CIUIC_ERR_SHAPE;
  if (!codes || !scales || !out_codes || !out_scales || (zeros && !out_zeros)) return CIUIC_ERR_NULL;
  const int nt = (n + 15) / 16, kt = (k + 63) / 64;
  const int rb = (k + 7) / 8 * bits;  // bytes of one packed row
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (bits == 4) {
    const int64_t words = static_cast<int64_t>(nt) * kt * 128;
    repack_int4_kernel<<<grid_for(words), 256, 0, s>>>(codes, n, k, rb, kt, words, static_cast<uint32_t *>(out_codes));
  } else {
    const int64_t words = static_cast<int64_t>(nt) * kt * 256;
    repack_byte_kernel<<<grid_for(words), 256, 0, s>>>(codes, n, k, rb, kt, 0, words, static_cast<uint32_t *>(out_codes));
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return static_cast<int>(e);
  const int64_t entries = static_cast<int64_t>(nt) * n_groups * 8;
  repack_groups_kernel<<<grid_for(entries), 256, 0, s>>>(scales, zeros, n, n_groups, entries,
                                                         static_cast<uint32_t *>(out_scales),
                                                         zeros ? static_cast<uint16_t *>(out_zeros) : nullptr);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int ciuic_repack_fp8(const uint8_t *codes, int n, int k, void *out_codes, ciuic_stream_t stream) {
  if (n <= 0 || k <= 0) return CIUIC_ERR_SHAPE;
  if (!codes || !out_codes) return CIUIC_ERR_NULL;
  const int nt = (n + 15) / 16, kt = (k + 63) / 64;
  const int64_t words = static_cast<int64_t>(nt) * kt * 256;
  repack_byte_kernel<<<grid_for(words), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      codes, n, k, k, kt, 1, words, static_cast<uint32_t *>(out_codes));
  return static_cast<int>(cudaGetLastError());
}
