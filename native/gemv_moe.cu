// The int4 GEMV for the two grouped MoE steps (gemv.cuh, modes GATEUP and DOWN) and their launcher.
#include "gemv.cuh"

namespace ciuic {

template <bool BF16, int GT, int MODE>
static cudaError_t launch_moe_shape(Params p, const SplitRequest &rq, int gz, cudaStream_t stream, bool *launched) {
  switch (rq.staging) {
    case CIUIC_STAGE_GEMV_1X3: return launch_gemv_slices<CIUIC_FMT_INT4, BF16, GT, 1, 3, MODE>(p, rq, gz, stream, launched);
    case CIUIC_STAGE_GEMV_1X7: return launch_gemv_slices<CIUIC_FMT_INT4, BF16, GT, 1, 7, MODE>(p, rq, gz, stream, launched);
    default: *launched = false; return cudaSuccess;
  }
}

template <bool BF16, int MODE>
static cudaError_t launch_moe_gt(Params p, const SplitRequest &rq, int gz, cudaStream_t stream, bool *launched) {
  if constexpr (CIUIC_GEMV_DEPTH % 2 == 0)
    if (p.gshift == 1) return launch_moe_shape<BF16, 2, MODE>(p, rq, gz, stream, launched);
  if constexpr (CIUIC_GEMV_DEPTH % 4 == 0)
    if (p.gshift == 2) return launch_moe_shape<BF16, 4, MODE>(p, rq, gz, stream, launched);
  *launched = false;  // other groups: wgemm
  return cudaSuccess;
}

cudaError_t launch_gemv_moe_int4(bool bf16, int mode, Params p, const SplitRequest &rq, int gz, cudaStream_t stream,
                                 bool *launched) {
  if (mode == GATEUP)
    return bf16 ? launch_moe_gt<true, GATEUP>(p, rq, gz, stream, launched)
                : launch_moe_gt<false, GATEUP>(p, rq, gz, stream, launched);
  return bf16 ? launch_moe_gt<true, DOWN>(p, rq, gz, stream, launched)
              : launch_moe_gt<false, DOWN>(p, rq, gz, stream, launched);
}

}  // namespace ciuic
