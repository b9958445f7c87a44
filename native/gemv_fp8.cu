// The GEMV for batches of 1 to 8 rows (gemv.cuh), fp8 weights: the plain linear's launcher and the
// grouped MoE steps'.
#include "gemv.cuh"

namespace ciuic {

cudaError_t launch_gemv_fp8(bool bf16, Params p, const SplitRequest &rq, cudaStream_t stream, bool *launched) {
  return bf16 ? launch_gemv_groups<CIUIC_FMT_FP8, true>(p, rq, stream, launched)
              : launch_gemv_groups<CIUIC_FMT_FP8, false>(p, rq, stream, launched);
}

cudaError_t launch_gemv_moe_fp8(bool bf16, int mode, Params p, const SplitRequest &rq, int gz, cudaStream_t stream,
                                bool *launched) {
  return launch_moe_fmt<CIUIC_FMT_FP8>(bf16, mode, p, rq, gz, stream, launched);
}

}  // namespace ciuic
