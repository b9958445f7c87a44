// The int4 GEMV for batches of 1 to 8 rows (gemv.cuh): the plain linear's launchers.
#include "gemv.cuh"

namespace ciuic {

// Blocks of 4 row tiles, each warp its own tile over the block's K range (CIUIC_STAGE_GEMV).
template <bool BF16, int GT>
static cudaError_t launch_gemv_rows(Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  constexpr int D = CIUIC_GEMV_DEPTH;
  *launched = false;
  auto kernel = gemv_i4_kernel<BF16, GT, kGemvWarps, 1, PLAIN>;
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

template <bool BF16, int GT>
static cudaError_t launch_gemv(Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  switch (rq.staging) {
    case CIUIC_STAGE_GEMV_1X3: return launch_gemv_slices<BF16, GT, 1, 3, PLAIN>(p, rq, 1, stream, launched);
    case CIUIC_STAGE_GEMV_1X7: return launch_gemv_slices<BF16, GT, 1, 7, PLAIN>(p, rq, 1, stream, launched);
    case CIUIC_STAGE_GEMV_3X3: return launch_gemv_slices<BF16, GT, 3, 3, PLAIN>(p, rq, 1, stream, launched);
    case CIUIC_STAGE_GEMV_2X7: return launch_gemv_slices<BF16, GT, 2, 7, PLAIN>(p, rq, 1, stream, launched);
    default: return launch_gemv_rows<BF16, GT>(p, rq, stream, launched);
  }
}

template <bool BF16>
static cudaError_t launch_gemv_dt(Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  // groups of 2 or 4 tiles (128, 256 inputs) take the compile-time group loop when D holds them
  if constexpr (CIUIC_GEMV_DEPTH % 2 == 0)
    if (p.gshift == 1) return launch_gemv<BF16, 2>(p, rq, stream, launched);
  if constexpr (CIUIC_GEMV_DEPTH % 4 == 0)
    if (p.gshift == 2) return launch_gemv<BF16, 4>(p, rq, stream, launched);
  return launch_gemv<BF16, 0>(p, rq, stream, launched);
}

cudaError_t launch_gemv_int4(bool bf16, Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  return bf16 ? launch_gemv_dt<true>(p, rq, stream, launched) : launch_gemv_dt<false>(p, rq, stream, launched);
}

}  // namespace ciuic
