// Instantiations of the weight-only GEMM for fp8 weights (plain linear and the two MoE steps).
#include "wgemm.cuh"

CIUIC_DEFINE_FORMAT(fp8, CIUIC_FMT_FP8)
