"""Small launches of every kernel variant, for compute-sanitizer (memcheck, racecheck).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \\
        python tests/gpu/sanitize_cases.py [--quick]

Caching is off so that every tensor is its own allocation and an access past its end is caught.
Each result is also checked against the reference; the exit code is 1 on a mismatch.
"""

from __future__ import annotations

import sys

import torch

from ciuic_lab.kernels.cuda import CUDA
from ciuic_lab.kernels.reference import moe_reference
from ciuic_lab.quant import QuantSpec, dequantize, quantize

SPECS = [
    QuantSpec(bits=4, scheme="asym", group=128),
    QuantSpec(bits=4, scheme="sym", group="channel"),
    QuantSpec(bits=8, scheme="asym", group=64),
    QuantSpec(bits=8, format="fp8_e4m3", group=128, scheme="sym"),
]


PLANS = ((0, 0), (2, 2), (0, 1), (3, 1))  # (splits, staging): launcher's own, chunked, whole
GEMV_PLANS = ((0, 3), (3, 3), (0, 4), (2, 5), (0, 6), (2, 7))  # the GEMV (batches of 1 to 8 rows; every format)
PIPE_PLANS = ((0, 8), (3, 8))  # int4 only: the pipelined kernel (any batch)
MOE_GEMV_PLANS = ((0, 4), (3, 4), (0, 5), (2, 5))  # the MoE steps on the GEMV (int4 g128, fp8; the others fall back)


def rel(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def main(quick: bool) -> int:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    CUDA.tune = False  # every plan below is named explicitly
    bad = 0
    cases = 0
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)
    batches = (1, 17) if quick else (1, 5, 9, 17, 30)
    for spec in SPECS:
        for n, k in ((37, 200), (45, 256)):
            qt = quantize(torch.randn(n, k, device=dev) * 0.05, spec)
            p = CUDA.prepare(qt)
            wd = dequantize(qt, torch.float64)
            for dtype in dtypes:
                for m in batches:
                    for splits, staging in PLANS + GEMV_PLANS + (PIPE_PLANS if spec.bits == 4 and not spec.is_fp8 else ()):
                        CUDA.splits, CUDA.staging = splits, staging
                        x = torch.randn(m, k, device=dev).to(dtype)
                        y = CUDA.linear(x, p)
                        e = rel(y, x.double() @ wd.T)
                        cases += 1
                        if not e < 1e-2:
                            bad += 1
                            print(f"MISMATCH {spec.label()} N={n} K={k} M={m} {dtype} splits={splits} "
                                  f"staging={staging}: {e:.3g}")
            CUDA.splits, CUDA.staging = 0, 0
        # MoE, both launches (an intermediate size of 6 tiles: the down step's slots are padded to 8)
        hidden, inter, n_exp = 256, 336, 4
        gq = [quantize(torch.randn(2 * inter, hidden, device=dev) * 0.05, spec) for _ in range(n_exp)]
        dq = [quantize(torch.randn(hidden, inter, device=dev) * 0.05, spec) for _ in range(n_exp)]
        gu, dn = [CUDA.prepare(q) for q in gq], [CUDA.prepare(q) for q in dq]
        for splits, staging in PLANS + MOE_GEMV_PLANS:
            CUDA.splits, CUDA.staging = splits, staging
            for dtype in dtypes:
                x = torch.randn(2, hidden, device=dev).to(dtype)
                ids = torch.tensor([[0, 3], [2, -1]], device=dev)
                w = torch.rand(2, 2, device=dev)
                y = CUDA.moe(x, ids, w, gu, dn)
                er = rel(y, moe_reference(x, ids, w, gq, dq, dtype))
                cases += 1
                if not er < 1e-2:
                    bad += 1
                    print(f"MISMATCH moe {spec.label()} {dtype} splits={splits} staging={staging}: {er:.3g}")
        CUDA.splits, CUDA.staging = 0, 0
    torch.cuda.synchronize()
    print(f"sanitize cases: {cases} run, {bad} mismatched")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main("--quick" in sys.argv))
