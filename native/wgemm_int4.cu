// Instantiations of the weight-only GEMM for int4 weights (plain linear and the two MoE steps).
#include "wgemm.cuh"

CIUIC_DEFINE_FORMAT(int4, CIUIC_FMT_INT4)
