// The pipelined int4 GEMM (pipe.cuh): its launcher.
#include "pipe.cuh"

namespace ciuic {

template <bool BF16, int MT, int GT>
static cudaError_t launch_pipe(Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  constexpr int NW = CIUIC_PIPE_WARPS, KS = CIUIC_PIPE_KS, P = CIUIC_PIPE_STAGES;
  constexpr int threads = NW * 32;
  constexpr int max_smem = P * pipe_stage_bytes(NW, KS, MT * 8);
  *launched = false;
  auto kernel = pipe_i4_kernel<BF16, MT, NW, KS, P, GT>;
  // opened to the largest ring of this instantiation; blocks per multiprocessor once per row count
  static int fits[CIUIC_MAX_M + 1] = {0};
  const int smem = P * pipe_stage_bytes(NW, KS, p.m);
  if (fits[p.m] == 0) {
    const int v = open_and_fit(kernel, threads, max_smem, smem);
    fits[p.m] = v > 0 ? v : -1;
  }
  if (fits[p.m] < 0) return cudaSuccess;  // the ring does not fit this device: not launched
  SplitRequest r = rq;
  r.mt = 1;
  r.blocks_xz = (p.nt + NW - 1) / NW;
  if (r.requested <= 0) {
    // Without a request: the most splits that keep every block in one wave, if they fill at least 3/4
    // of it; else enough for 1.5 waves or more (measured on an H100, int4 g128, 9-16 rows: 56 row
    // blocks of 18432->7168 fastest at 4 splits, 0.85 of a wave; 144 of 7168->18432 at 3-5 splits,
    // 1.6-2.7 waves, against 55 us at one split, 0.55 of a wave, and 52 us at two, 1.09 waves)
    const int wave = fits[p.m] * sm_count(), b = r.blocks_xz;
    int s = wave / b > 1 ? wave / b : 1;
    if (4 * static_cast<int64_t>(b) * s < 3 * static_cast<int64_t>(wave)) s = (3 * wave + 2 * b - 1) / (2 * b);
    r.requested = s;
  }
  int tps = 0;
  const int s = plan_splits(r, p.kt, KS, fits[p.m], &tps);
  p.tps = tps;
  dim3 grid(r.blocks_xz, s, 1);
  kernel<<<grid, threads, smem, stream>>>(p);
  *launched = true;
  return cudaGetLastError();
}

template <bool BF16, int GT>
static cudaError_t launch_pipe_mt(Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  switch ((p.m + 7) / 8) {
    case 1: return launch_pipe<BF16, 1, GT>(p, rq, stream, launched);
    case 2: return launch_pipe<BF16, 2, GT>(p, rq, stream, launched);
    case 3: return launch_pipe<BF16, 3, GT>(p, rq, stream, launched);
    default: return launch_pipe<BF16, 4, GT>(p, rq, stream, launched);
  }
}

template <bool BF16>
static cudaError_t launch_pipe_dt(Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  // groups of 2 or 4 tiles (128, 256 inputs) take the compile-time group loop
  if constexpr (CIUIC_PIPE_STATIC_GROUPS && CIUIC_PIPE_KS % 2 == 0)
    if (p.gshift == 1) return launch_pipe_mt<BF16, 2>(p, rq, stream, launched);
  if constexpr (CIUIC_PIPE_STATIC_GROUPS && CIUIC_PIPE_KS % 4 == 0)
    if (p.gshift == 2) return launch_pipe_mt<BF16, 4>(p, rq, stream, launched);
  return launch_pipe_mt<BF16, 0>(p, rq, stream, launched);
}

cudaError_t launch_pipe_int4(bool bf16, Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  *launched = false;
  const bool a16 = (reinterpret_cast<uintptr_t>(p.scales) & 15) == 0 &&
                   (reinterpret_cast<uintptr_t>(p.zeros) & 15) == 0;
  // (x offsets are 32-bit in the kernel)
  if (!p.xvec || !a16 || p.m < 1 || p.m > CIUIC_MAX_M || static_cast<int64_t>(p.m) * p.k * 2 >= (int64_t(1) << 31))
    return cudaSuccess;
  return bf16 ? launch_pipe_dt<true>(p, rq, stream, launched) : launch_pipe_dt<false>(p, rq, stream, launched);
}

}  // namespace ciuic
