// The int4 GEMV for the two grouped MoE steps (gemv.cuh, modes GATEUP and DOWN): their launcher.
#include "gemv.cuh"

namespace ciuic {

cudaError_t launch_gemv_moe_int4(bool bf16, int mode, Params p, const SplitRequest &rq, int gz, cudaStream_t stream,
                                 bool *launched) {
  return launch_moe_fmt<CIUIC_FMT_INT4>(bf16, mode, p, rq, gz, stream, launched);
}

}  // namespace ciuic
