/*
 * ciuic_kernels.h -- the C interface of Ciuic Lab's CUDA kernels.
 *
 * Everything between the CDEF markers is plain C that cffi parses as it is (ciuic_lab/kernels/cuda.py
 * reads this file; it is the only declaration of the interface). Outside the markers: include guards
 * and the C++ linkage block, which cffi never sees.
 *
 * Conventions:
 *   - every pointer is a device pointer unless noted; tensors are dense and row-major;
 *   - every function returns 0 on success, a CUDA error code (cudaError_t) when the CUDA runtime
 *     reported one, or a CIUIC_ERR_* code for arguments it refuses; ciuic_error_string() names it;
 *   - launches are asynchronous on `stream`; the error returned is the launch's (cudaGetLastError);
 *   - weights are in the tiled layouts of native/README.md, made by the ciuic_repack_* functions.
 */
#ifndef CIUIC_KERNELS_H
#define CIUIC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF BEGIN */
typedef struct CUstream_st *ciuic_stream_t;

#define CIUIC_ABI_VERSION 4

/* weight formats */
#define CIUIC_FMT_INT4 0
#define CIUIC_FMT_INT8 1
#define CIUIC_FMT_FP8 2
/* activation dtypes */
#define CIUIC_DT_BF16 0
#define CIUIC_DT_FP16 1

/* argument errors (CUDA's own codes are all below 1000) */
#define CIUIC_ERR_FORMAT 1001
#define CIUIC_ERR_DTYPE 1002
#define CIUIC_ERR_SHAPE 1003
#define CIUIC_ERR_GROUP 1004
#define CIUIC_ERR_ALIGN 1005
#define CIUIC_ERR_NULL 1006

/* tiles: 16 output rows x 64 inputs; a warp reads one tile with one (int4) or two (int8, fp8)
   16-byte loads per lane */
#define CIUIC_TILE_N 16
#define CIUIC_TILE_K 64
/* which kernel and how x reaches the tensor cores: chosen by the launcher (auto), staged once for
   the block's whole K range (whole, when it fits 64 KB of shared memory; more splits are taken to
   make it fit), chunk by chunk (chunk), or the GEMV for batches of 1 to 8 rows (every format; x
   staged once per block, 27-28 warps per multiprocessor; larger batches take auto's choice): gemv,
   blocks of 4 row tiles over one K range; gemv_<R>x<S>, blocks of R row tiles whose K range S warps
   share (their sums meet in shared memory; `splits` then splits K across blocks on top); pipe, int4
   with codes, scale pairs and x streamed through a ring of shared-memory stages (any batch; other
   formats, or x, scales or zeros not 16-byte aligned, take auto's choice) */
#define CIUIC_STAGE_AUTO 0
#define CIUIC_STAGE_WHOLE 1
#define CIUIC_STAGE_CHUNK 2
#define CIUIC_STAGE_GEMV 3
#define CIUIC_STAGE_GEMV_1X3 4
#define CIUIC_STAGE_GEMV_1X7 5
#define CIUIC_STAGE_GEMV_3X3 6
#define CIUIC_STAGE_GEMV_2X7 7
#define CIUIC_STAGE_PIPE 8
/* batch rows the GEMV takes (larger launches run the general kernel) */
#define CIUIC_GEMV_MAX_M 8
/* batch rows up to which CIUIC_STAGE_AUTO takes the int4 GEMV (the tuner races the pipelined kernel above);
   int8 and fp8: one row */
#define CIUIC_GEMV_AUTO_M 4
/* rows of x one launch takes; larger batches are cut into launches of this many rows */
#define CIUIC_MAX_M 32
/* bytes at the start of a workspace that hold split-K arrival counters (zeroed by the caller once) */
#define CIUIC_COUNTER_BYTES 262144

int ciuic_abi_version(void);
const char *ciuic_error_string(int code);

/* Bytes of the tiled arrays for a weight of n rows and k inputs with n_groups groups per row:
   out[0] codes, out[1] scales, out[2] zero points (int formats; 0 for fp8, whose scales stay as
   given, fp32 [ceil(n/128), ceil(k/128)]). */
int ciuic_layout_bytes(int fmt, int n, int k, int n_groups, int64_t *out);

/* Row-major packed integer weight (quant.pack: codes uint8 [n, row_bytes(k, bits)], scales fp16
   [n, n_groups], zeros uint8 [n, n_groups] or NULL for sym) -> tiled codes, scale pairs, zero pairs.
   bits is 4 or 8. */
int ciuic_repack_int(int bits, const uint8_t *codes, const uint16_t *scales, const uint8_t *zeros,
                     int n, int k, int n_groups, void *out_codes, void *out_scales, void *out_zeros,
                     ciuic_stream_t stream);

/* fp8 e4m3 codes uint8 [n, k] -> tiled codes (scales are used as given). */
int ciuic_repack_fp8(const uint8_t *codes, int n, int k, void *out_codes, ciuic_stream_t stream);

/* y[m, n] = x[m, k] @ W^T (+ bias[n]) for a tiled weight W [n, k].
   fmt/dtype: CIUIC_FMT_* / CIUIC_DT_* (x, bias and y share dtype). group: inputs per scale group,
   64 * 2^j, or 0 for one group per row (channel, tensor). zeros: NULL for sym (zero point
   2^(bits-1)). scales: tiled pairs (int) or fp32 block scales (fp8). bias may be NULL.
   workspace: zeroed once by the caller, CIUIC_COUNTER_BYTES of counters then fp32 partial sums;
   NULL or too small disables split-K. splits: 0 chooses; otherwise the split-K count to use.
   staging: CIUIC_STAGE_*. */
int ciuic_wgemm(int fmt, int dtype, const void *x, int m, int n, int k,
                const void *codes, const void *scales, const void *zeros, int group, int n_groups,
                const void *bias, void *y, void *workspace, int64_t workspace_bytes, int splits,
                int staging, ciuic_stream_t stream);

/* MoE, step 1: for every token t and slot j, e = ids[t, j]:
   h[t*top_k + j, :] = silu(x[t] @ G_e^T) * (x[t] @ U_e^T), where expert e's tiled gate_up weight is
   [2*inter, k] with the gate rows first. tab_*: device arrays of n_experts device pointers (uint64)
   to each expert's tiled codes / scales / zeros (tab_zeros NULL for sym). ids: int64 [tokens, top_k];
   an id outside [0, n_experts) contributes zeros. inter must be a multiple of 16. */
int ciuic_moe_gate_up(int fmt, int dtype, const void *x, int tokens, int top_k, const int64_t *ids,
                      int n_experts, const uint64_t *tab_codes, const uint64_t *tab_scales,
                      const uint64_t *tab_zeros, int k, int inter, int group, int n_groups, void *h,
                      void *workspace, int64_t workspace_bytes, int splits, int staging,
                      ciuic_stream_t stream);

/* MoE, step 2: out[t, :] = sum_j route_w[t, j] * (h[t*top_k + j] @ D_e^T), e = ids[t, j], with expert
   e's tiled down weight [hidden, inter]. route_w: fp32 [tokens, top_k]. */
int ciuic_moe_down(int fmt, int dtype, const void *h, int tokens, int top_k, const int64_t *ids,
                   const float *route_w, int n_experts, const uint64_t *tab_codes,
                   const uint64_t *tab_scales, const uint64_t *tab_zeros, int inter, int hidden,
                   int group, int n_groups, void *out, void *workspace, int64_t workspace_bytes,
                   int splits, int staging, ciuic_stream_t stream);
/* MoE router with one expert group (DeepSeek-V3's sigmoid scoring), from its fp32 logits [tokens,
   n_experts] (h @ W^T): score = sigmoid(logit); each token's top_k experts by score + bias (bias fp32
   [n_experts] or NULL; ties: the lower index) go to ids[t, :top_k] (int64) with weights score (divided
   by their sum + 1e-20 when norm, then times scale) in wts[t, :top_k] (fp32). extra >= 0 appends expert
   `extra` with weight 1 (ids and wts are then [tokens, top_k + 1]). n_experts <= 4096. */
int ciuic_moe_route(const float *logits, int tokens, int n_experts, const float *bias, int top_k, int norm,
                    float scale, int extra, int64_t *ids, float *wts, ciuic_stream_t stream);
/* CDEF END */

#ifdef __cplusplus
}
#endif

#endif /* CIUIC_KERNELS_H */
