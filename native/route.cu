// route.cu -- the selection half of DeepSeek-V3's MoE router with one expert group (n_group =
// topk_group = 1), in one launch: from the router's fp32 logits, scores = sigmoid(logits), the top-k
// experts chosen on scores + bias, their scores as weights (normalized to sum 1 if asked, times a
// scale), and optionally one more expert of weight 1 (a shared expert run in the same grouped MoE
// launch). At decode this replaces about ten small kernels per layer (sigmoid, bias, top-k, gather,
// sum, divide, concatenations); the logits' product stays with cuBLAS, which spreads it over the GPU.
#include <cuda_runtime.h>
#include <stdint.h>

#include "ciuic_kernels.h"

namespace ciuic {

// One warp per token. Scores live in shared memory ([n_experts] sigmoid scores, then the biased
// choice values); the top k come from k rounds of a warp-wide argmax (ties: the lower index).
__global__ void __launch_bounds__(32) route_kernel(const float *__restrict__ logits, int n_experts,
                                                   const float *__restrict__ bias, int top_k, int norm,
                                                   float scale, int extra, int64_t *__restrict__ ids,
                                                   float *__restrict__ wts) {
  extern __shared__ float smem[];
  float *score = smem;               // [n_experts] sigmoid scores
  float *choice = smem + n_experts;  // [n_experts] scores + bias; -inf once taken
  const int t = blockIdx.x;
  const int lane = threadIdx.x;
  const float *row = logits + static_cast<int64_t>(t) * n_experts;
  for (int e = lane; e < n_experts; e += 32) {
    const float s = 1.f / (1.f + expf(-row[e]));
    score[e] = s;
    choice[e] = s + (bias ? bias[e] : 0.f);
  }
  __syncwarp();
  const int width = top_k + (extra >= 0 ? 1 : 0);
  int64_t *out_i = ids + static_cast<int64_t>(t) * width;
  float *out_w = wts + static_cast<int64_t>(t) * width;
  float sum = 0.f;
  for (int j = 0; j < top_k; ++j) {
    float best = -INFINITY;
    int bi = n_experts;
    for (int e = lane; e < n_experts; e += 32) {
      const float c = choice[e];
      if (c > best || (c == best && e < bi)) { best = c; bi = e; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
    }
    if (bi >= n_experts) bi = 0;  // only when no choice compares (all NaN): keep the ids in range
    const float s = score[bi];
    sum += s;
    __syncwarp();
    if (lane == 0) {
      out_i[j] = bi;
      out_w[j] = s;
      choice[bi] = -INFINITY;
    }
    __syncwarp();
  }
  if (lane == 0) {
    for (int j = 0; j < top_k; ++j) out_w[j] = norm ? out_w[j] / (sum + 1e-20f) * scale : out_w[j] * scale;
    if (extra >= 0) {
      out_i[top_k] = extra;
      out_w[top_k] = 1.f;
    }
  }
}

}  // namespace ciuic

extern "C" int ciuic_moe_route(const float *logits, int tokens, int n_experts, const float *bias, int top_k,
                               int norm, float scale, int extra, int64_t *ids, float *wts, ciuic_stream_t stream) {
  using namespace ciuic;
  if (tokens < 0 || n_experts <= 0 || n_experts > 4096 || top_k <= 0 || top_k > n_experts) return CIUIC_ERR_SHAPE;
  if (tokens == 0) return 0;
  if (!logits || !ids || !wts) return CIUIC_ERR_NULL;
  const size_t smem = 2 * sizeof(float) * static_cast<size_t>(n_experts);
  route_kernel<<<tokens, 32, smem, reinterpret_cast<cudaStream_t>(stream)>>>(logits, n_experts, bias, top_k, norm,
                                                                            scale, extra, ids, wts);
  return static_cast<int>(cudaGetLastError());
}
