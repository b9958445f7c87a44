// api.cu -- the C entry points of ciuic_kernels.h: argument checks, launch planning (split-K),
// batch chunking and dispatch to the per-format instantiations.
#include <cuda_runtime.h>
#include <stdint.h>

#include "ciuic_kernels.h"
#include "gemv.cuh"
#include "pipe.cuh"
#include "wgemm.cuh"

namespace ciuic {

// One attribute of the current device, read once per device (`fallback` when it cannot be read).
template <cudaDeviceAttr A>
static int device_attr(int fallback) {
  static int cache[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return fallback;
  if (cache[dev] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, A, dev) != cudaSuccess || v <= 0) v = fallback;
    cache[dev] = v;
  }
  return cache[dev];
}

int sm_count() { return device_attr<cudaDevAttrMultiProcessorCount>(132); }
int sm_shared_bytes() { return device_attr<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(100 * 1024); }

static bool aligned(const void *p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

// tiles per group as a shift; 31 means one group per row. Returns false for an unsupported group.
static bool group_shift(int group, int k, int n_groups, int *shift) {
  const int kt = (k + 63) / 64;
  if (group == 0 || group >= kt * 64) {
    if (n_groups != 1) return false;
    *shift = 31;
    return true;
  }
  if (group < 64 || group % 64 != 0) return false;
  const int tiles = group / 64;
  if (tiles & (tiles - 1)) return false;
  if (n_groups != (k + group - 1) / group) return false;
  int s = 0;
  while ((1 << s) < tiles) ++s;
  *shift = s;
  return true;
}

}  // namespace ciuic

// The most K splits whose partial sums the workspace holds for `blocks` blocks per split (1 without a
// workspace, or with more blocks than counters).
int ciuic::workspace_splits(const SplitRequest &rq, int blocks) {
  if (!rq.has_workspace || blocks > CIUIC_COUNTER_BYTES / 4 || rq.ws_floats < 2 * rq.floats_per_split) return 1;
  const int64_t n = rq.ws_floats / rq.floats_per_split;
  return n > (1 << 30) ? (1 << 30) : static_cast<int>(n);
}

// Split-K plan: the K ranges (and tiles per range, a multiple of the chunk) for one launch. Without a
// request, for batch <= 8 it fills one wave of resident blocks (occupancy x multiprocessors): every
// block starts at once, and no second, partial wave leaves the memory system idle at the end (this
// matched the best split of every DeepSeek-V3 shape measured on an H100). A range is at least one
// chunk, and the partial sums must fit the workspace (none: no split).
int ciuic::plan_splits(const SplitRequest &rq, int kt, int ck, int occ, int *tps) {
  const int nck = (kt + ck - 1) / ck;
  int s;
  if (rq.requested > 0) {
    s = rq.requested;
  } else {
    // Batch <= 8: the most splits that still fit one wave. Larger batches: long K ranges split into
    // ranges of about 8 chunks, at most 4 splits (their partial sums cost more to add up).
    const int wave = occ * sm_count();
    s = wave / (rq.blocks_xz > 0 ? rq.blocks_xz : 1);
    if (rq.mt > 1) {
      const int by_k = (nck + 7) / 8;
      if (s < by_k) s = by_k;
      if (s > 4) s = 4;
    }
    if (s < rq.min_splits) s = rq.min_splits;
  }
  if (s > nck) s = nck;
  const int by_ws = workspace_splits(rq, rq.blocks_xz);
  if (s > by_ws) s = by_ws;
  if (s < 1) s = 1;
  const int per = (kt + s - 1) / s;
  *tps = (per + ck - 1) / ck * ck;
  return (kt + *tps - 1) / *tps;
}

namespace ciuic {

static void set_workspace(Params &p, void *ws) {
  p.counters = static_cast<int *>(ws);
  p.ws = ws ? reinterpret_cast<float *>(static_cast<char *>(ws) + CIUIC_COUNTER_BYTES) : nullptr;
}

// The GEMV's block shape for one row of x when no plan was measured: the shapes the backend's
// measurements chose on an H100 for DeepSeek-V3's weights (docs/benchmarks.md), by rows and inputs.
// Two rows and more keep 4 row tiles per block, which measured as fast or faster there. The 1 x 7
// shape (small weights) runs without splits across blocks, as measured best.
static int gemv_auto_shape(int nt, int kt) {
  if (nt >= 768) return kt >= 48 ? CIUIC_STAGE_GEMV_3X3 : CIUIC_STAGE_GEMV_1X3;
  if (nt >= 256) return CIUIC_STAGE_GEMV_2X7;
  return CIUIC_STAGE_GEMV_1X7;
}

// Rows up to which CIUIC_STAGE_AUTO takes the GEMV, by format: int4 CIUIC_GEMV_AUTO_M; int8 and fp8
// one (on an H100, 7168->18432 / 18432->7168: 48-50 us in the block shapes gemv_auto_shape picks
// against 52-61 us on wgemm; at four rows wgemm is as fast or faster, and the tuner measures both).
static int gemv_auto_rows(int fmt) { return fmt == CIUIC_FMT_INT4 ? CIUIC_GEMV_AUTO_M : 1; }

static cudaError_t launch_gemv(int fmt, bool bf16, const Params &p, const SplitRequest &rq, cudaStream_t s,
                               bool *launched) {
  switch (fmt) {
    case CIUIC_FMT_INT4: return launch_gemv_int4(bf16, p, rq, s, launched);
    case CIUIC_FMT_INT8: return launch_gemv_int8(bf16, p, rq, s, launched);
    default: return launch_gemv_fp8(bf16, p, rq, s, launched);
  }
}

static cudaError_t dispatch_plain(int fmt, bool bf16, int mt, CIUIC_LAUNCH_ARGS) {
  switch (fmt) {
    case CIUIC_FMT_INT4: return launch_plain_int4(bf16, mt, p, grid, rq, s);
    case CIUIC_FMT_INT8: return launch_plain_int8(bf16, mt, p, grid, rq, s);
    default: return launch_plain_fp8(bf16, mt, p, grid, rq, s);
  }
}

static cudaError_t dispatch_moe(int fmt, bool bf16, int mode, CIUIC_LAUNCH_ARGS) {
  switch (fmt) {
    case CIUIC_FMT_INT4: return launch_moe_int4(bf16, mode, p, grid, rq, s);
    case CIUIC_FMT_INT8: return launch_moe_int8(bf16, mode, p, grid, rq, s);
    default: return launch_moe_fp8(bf16, mode, p, grid, rq, s);
  }
}

static cudaError_t launch_gemv_moe(int fmt, bool bf16, int mode, const Params &p, const SplitRequest &rq, int gz,
                                   cudaStream_t s, bool *launched) {
  switch (fmt) {
    case CIUIC_FMT_INT4: return launch_gemv_moe_int4(bf16, mode, p, rq, gz, s, launched);
    case CIUIC_FMT_INT8: return launch_gemv_moe_int8(bf16, mode, p, rq, gz, s, launched);
    default: return launch_gemv_moe_fp8(bf16, mode, p, rq, gz, s, launched);
  }
}

// One grouped MoE step: the GEMV in the block shape asked for (gemv-1x3, gemv-1x7; groups a body holds:
// int4 128 or 256 inputs, int8 128, fp8 its blocks), else wgemm with the launcher's own staging. grid.z: the step's pairs or tokens. Unasked
// (auto), up to CIUIC_GEMV_AUTO_M tokens take the GEMV in the shapes measured best on an H100 for DeepSeek-V3's
// experts and the decode benchmark's (native/README.md; 1.35-1.5x faster than wgemm there): down 1 x 7;
// gate_up 1 x 3 while its blocks fit one wave (4 per multiprocessor), else 1 x 7.
static int moe_launch(int fmt, bool bf16, int mode, int tokens, const Params &p, dim3 grid, const SplitRequest &rq,
                      cudaStream_t st) {
  SplitRequest rg = rq;
  if (rg.staging == CIUIC_STAGE_AUTO && tokens <= CIUIC_GEMV_AUTO_M) {
    const bool one_wave = static_cast<int64_t>(p.nt / 2) * grid.z <= 4LL * sm_count();
    rg.staging = mode == GATEUP && one_wave ? CIUIC_STAGE_GEMV_1X3 : CIUIC_STAGE_GEMV_1X7;
  }
  if (rg.staging == CIUIC_STAGE_GEMV_1X3 || rg.staging == CIUIC_STAGE_GEMV_1X7) {
    bool done = false;
    const cudaError_t e = launch_gemv_moe(fmt, bf16, mode, p, rg, static_cast<int>(grid.z), st, &done);
    if (done || e != cudaSuccess) return static_cast<int>(e);
  }
  SplitRequest r2 = rq;
  if (r2.staging >= CIUIC_STAGE_GEMV) r2.staging = CIUIC_STAGE_AUTO;
  return static_cast<int>(dispatch_moe(fmt, bf16, mode, p, grid, r2, st));
}

static SplitRequest split_request(int requested, int staging, int blocks_xz, int64_t floats_per_split, void *ws,
                                  int64_t ws_bytes, int stage_rows) {
  SplitRequest rq;
  rq.requested = requested;
  rq.staging = staging;
  rq.mt = 1;
  rq.min_splits = 0;
  rq.stage_rows = stage_rows;
  rq.blocks_xz = blocks_xz;
  rq.floats_per_split = floats_per_split;
  rq.has_workspace = ws != nullptr && ws_bytes > CIUIC_COUNTER_BYTES;
  rq.ws_floats = rq.has_workspace ? (ws_bytes - CIUIC_COUNTER_BYTES) / 4 : 0;
  return rq;
}

// Checks shared by the three entry points; fills the weight geometry of `p`.
static int common_setup(Params &p, int fmt, int dtype, int n, int k, int group, int n_groups, bool has_zeros) {
  if (fmt != CIUIC_FMT_INT4 && fmt != CIUIC_FMT_INT8 && fmt != CIUIC_FMT_FP8) return CIUIC_ERR_FORMAT;
  if (dtype != CIUIC_DT_BF16 && dtype != CIUIC_DT_FP16) return CIUIC_ERR_DTYPE;
  if (n <= 0 || k <= 0) return CIUIC_ERR_SHAPE;
  p.n = n;
  p.k = k;
  p.nt = (n + 15) / 16;
  p.kt = (k + 63) / 64;
  p.kb = (k + 127) / 128;
  if (fmt == CIUIC_FMT_FP8) {
    p.gshift = 1;
    p.n_groups = p.kb;
    p.zconst = 0;
  } else {
    int shift = 0;
    if (!group_shift(group, k, n_groups, &shift)) return CIUIC_ERR_GROUP;
    p.gshift = shift;
    p.n_groups = n_groups;
    p.zconst = fmt == CIUIC_FMT_INT4 ? 0x0808u : 0x8080u;
    (void)has_zeros;
  }
  return 0;
}

}  // namespace ciuic

using namespace ciuic;

extern "C" int ciuic_abi_version(void) { return CIUIC_ABI_VERSION; }

extern "C" const char *ciuic_error_string(int code) {
  switch (code) {
    case 0: return "no error";
    case CIUIC_ERR_FORMAT: return "unsupported weight format (accepted: int4, int8, fp8_e4m3)";
    case CIUIC_ERR_DTYPE: return "unsupported activation dtype (accepted: bfloat16, float16)";
    case CIUIC_ERR_SHAPE: return "bad shape (sizes must be positive; MoE intermediate size a multiple of 16)";
    case CIUIC_ERR_GROUP:
      return "unsupported group (accepted: 64 * 2^j inputs with ceil(k / group) groups per row, or one group per row)";
    case CIUIC_ERR_ALIGN: return "misaligned pointer (codes 16-byte, scales 4-byte, zeros/x/y 2-byte aligned)";
    case CIUIC_ERR_NULL: return "a required pointer is NULL";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

extern "C" int ciuic_layout_bytes(int fmt, int n, int k, int n_groups, int64_t *out) {
  if (!out) return CIUIC_ERR_NULL;
  if (n <= 0 || k <= 0) return CIUIC_ERR_SHAPE;
  const int64_t nt = (n + 15) / 16, kt = (k + 63) / 64;
  switch (fmt) {
    case CIUIC_FMT_INT4:
    case CIUIC_FMT_INT8:
      if (n_groups <= 0) return CIUIC_ERR_GROUP;
      out[0] = nt * kt * (fmt == CIUIC_FMT_INT4 ? 512 : 1024);
      out[1] = nt * n_groups * 8 * 4;
      out[2] = nt * n_groups * 8 * 2;
      return 0;
    case CIUIC_FMT_FP8:
      out[0] = nt * kt * 1024;
      out[1] = 0;
      out[2] = 0;
      return 0;
    default: return CIUIC_ERR_FORMAT;
  }
}

extern "C" int ciuic_wgemm(int fmt, int dtype, const void *x, int m, int n, int k, const void *codes,
                           const void *scales, const void *zeros, int group, int n_groups, const void *bias,
                           void *y, void *workspace, int64_t workspace_bytes, int splits, int staging,
                           ciuic_stream_t stream) {
  Params p = {};
  int err = common_setup(p, fmt, dtype, n, k, group, n_groups, zeros != nullptr);
  if (err) return err;
  if (m < 0) return CIUIC_ERR_SHAPE;
  if (m == 0) return 0;
  if (!x || !codes || !scales || !y) return CIUIC_ERR_NULL;
  if (!aligned(codes, 16) || !aligned(scales, 4) || !aligned(zeros, 2) || !aligned(x, 2) || !aligned(y, 2) ||
      !aligned(bias, 2) || !aligned(workspace, 16))
    return CIUIC_ERR_ALIGN;
  p.codes = static_cast<const uint4 *>(codes);
  p.scales = scales;
  p.zeros = fmt == CIUIC_FMT_FP8 ? nullptr : static_cast<const uint16_t *>(zeros);
  p.bias = bias;
  set_workspace(p, workspace);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const bool bf16 = dtype == CIUIC_DT_BF16;
  for (int m0 = 0; m0 < m; m0 += CIUIC_MAX_M) {
    const int mc = (m - m0) < CIUIC_MAX_M ? (m - m0) : CIUIC_MAX_M;
    const int mt = (mc + 7) / 8;
    const int rt = plain_rt(fmt, mt);
    p.m = mc;
    p.x = static_cast<const char *>(x) + static_cast<size_t>(m0) * k * 2;
    p.y = static_cast<char *>(y) + static_cast<size_t>(m0) * n * 2;
    p.xvec = (k % 8 == 0) && aligned(p.x, 16);
    const int gx = (p.nt + kWarps * rt - 1) / (kWarps * rt);
    const SplitRequest rq = split_request(splits, staging, gx, static_cast<int64_t>(mc) * p.nt * 16, workspace, workspace_bytes, mc);
    cudaError_t e = cudaSuccess;
    bool done = false;
    // the GEMV when asked for (m <= 8), and by default up to gemv_auto_rows(fmt) rows: faster than
    // wgemm there on an H100 (native/README.md); at more rows the backend's tuner measures both
    const bool gemv_asked = staging >= CIUIC_STAGE_GEMV && staging <= CIUIC_STAGE_GEMV_2X7;
    if ((gemv_asked && mc <= CIUIC_GEMV_MAX_M) || (staging == CIUIC_STAGE_AUTO && mc <= gemv_auto_rows(fmt))) {
      SplitRequest rg = rq;
      if (staging == CIUIC_STAGE_AUTO && mc == 1) {
        rg.staging = gemv_auto_shape(p.nt, p.kt);
        if (rg.staging == CIUIC_STAGE_GEMV_1X7 && rg.requested == 0) rg.requested = 1;  // measured best
      }
      e = launch_gemv(fmt, bf16, p, rg, st, &done);
    }
    // the pipelined kernel when asked for, and by default for 9..16 rows: faster than wgemm there on an
    // H100 (native/README.md)
    if (fmt == CIUIC_FMT_INT4 && (staging == CIUIC_STAGE_PIPE || (staging == CIUIC_STAGE_AUTO && mc > CIUIC_GEMV_MAX_M && mc <= 16)))
      e = launch_pipe_int4(bf16, p, rq, st, &done);
    if (!done) {
      SplitRequest r2 = rq;
      if (gemv_asked || staging == CIUIC_STAGE_PIPE) r2.staging = CIUIC_STAGE_AUTO;
      e = dispatch_plain(fmt, bf16, mt, p, dim3(gx, 1, 1), r2, st);
    }
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  return 0;
}

extern "C" int ciuic_moe_gate_up(int fmt, int dtype, const void *x, int tokens, int top_k, const int64_t *ids,
                                 int n_experts, const uint64_t *tab_codes, const uint64_t *tab_scales,
                                 const uint64_t *tab_zeros, int k, int inter, int group, int n_groups, void *h,
                                 void *workspace, int64_t workspace_bytes, int splits, int staging,
                                 ciuic_stream_t stream) {
  Params p = {};
  if (inter <= 0 || inter % 16 != 0) return CIUIC_ERR_SHAPE;
  int err = common_setup(p, fmt, dtype, 2 * inter, k, group, n_groups, tab_zeros != nullptr);
  if (err) return err;
  if (tokens < 0 || top_k <= 0 || n_experts <= 0) return CIUIC_ERR_SHAPE;
  if (tokens == 0) return 0;
  if (!x || !ids || !tab_codes || !tab_scales || !h) return CIUIC_ERR_NULL;
  if (!aligned(x, 2) || !aligned(h, 2) || !aligned(ids, 8) || !aligned(workspace, 16)) return CIUIC_ERR_ALIGN;
  p.x = x;
  p.m = 1;
  p.y = h;
  p.ids = ids;
  p.top_k = top_k;
  p.n_experts = n_experts;
  p.tab_codes = reinterpret_cast<const unsigned long long *>(tab_codes);
  p.tab_scales = reinterpret_cast<const unsigned long long *>(tab_scales);
  p.tab_zeros = fmt == CIUIC_FMT_FP8 ? nullptr : reinterpret_cast<const unsigned long long *>(tab_zeros);
  p.xvec = (k % 8 == 0) && aligned(x, 16);
  set_workspace(p, workspace);
  const int pairs = tokens * top_k;
  const int gx = (p.nt / 2 + kWarps - 1) / kWarps;
  const SplitRequest rq =
      split_request(splits, staging, gx * pairs, static_cast<int64_t>(pairs) * p.nt * 16, workspace, workspace_bytes, 1);
  return moe_launch(fmt, dtype == CIUIC_DT_BF16, GATEUP, tokens, p, dim3(gx, 1, pairs), rq, reinterpret_cast<cudaStream_t>(stream));
}

extern "C" int ciuic_moe_down(int fmt, int dtype, const void *h, int tokens, int top_k, const int64_t *ids,
                              const float *route_w, int n_experts, const uint64_t *tab_codes,
                              const uint64_t *tab_scales, const uint64_t *tab_zeros, int inter, int hidden,
                              int group, int n_groups, void *out, void *workspace, int64_t workspace_bytes,
                              int splits, int staging, ciuic_stream_t stream) {
  Params p = {};
  int err = common_setup(p, fmt, dtype, hidden, inter, group, n_groups, tab_zeros != nullptr);
  if (err) return err;
  if (tokens < 0 || top_k <= 0 || n_experts <= 0) return CIUIC_ERR_SHAPE;
  if (tokens == 0) return 0;
  if (!h || !ids || !route_w || !tab_codes || !tab_scales || !out) return CIUIC_ERR_NULL;
  if (!aligned(h, 2) || !aligned(out, 2) || !aligned(ids, 8) || !aligned(route_w, 4) || !aligned(workspace, 16))
    return CIUIC_ERR_ALIGN;
  p.x = h;
  p.m = 1;
  p.y = out;
  p.ids = ids;
  p.route_w = route_w;
  p.top_k = top_k;
  p.n_experts = n_experts;
  p.tab_codes = reinterpret_cast<const unsigned long long *>(tab_codes);
  p.tab_scales = reinterpret_cast<const unsigned long long *>(tab_scales);
  p.tab_zeros = fmt == CIUIC_FMT_FP8 ? nullptr : reinterpret_cast<const unsigned long long *>(tab_zeros);
  p.xvec = (inter % 8 == 0) && aligned(h, 16);
  set_workspace(p, workspace);
  const int gx = (p.nt + kWarps - 1) / kWarps;
  const SplitRequest rq =
      split_request(splits, staging, gx * tokens, static_cast<int64_t>(tokens) * p.nt * 16, workspace, workspace_bytes, top_k);
  return moe_launch(fmt, dtype == CIUIC_DT_BF16, DOWN, tokens, p, dim3(gx, 1, tokens), rq, reinterpret_cast<cudaStream_t>(stream));
}
