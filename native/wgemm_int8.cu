// Instantiations of the weight-only GEMM for int8 weights (plain linear and the two MoE steps).
#include "wgemm.cuh"

CIUIC_DEFINE_FORMAT(int8, CIUIC_FMT_INT8)
