"""One int4 g128 launch shape, run a few times for a profiler (ncu) to look at: for tuning.

    ncu -k regex:wgemm_kernel --launch-skip 3 --launch-count 1 python3 tests/gpu/ncu_int4.py K N M SPLITS [STAGING]

STAGING: 2 (chunked wgemm, the default here) or 3 (the GEMV, kernel gemv_kernel).
"""

import sys

import torch

from ciuic_lab.kernels.cuda import CUDA
from ciuic_lab.quant import QuantSpec, quantize

k, n, m, splits = (int(a) for a in sys.argv[1:5])
staging = int(sys.argv[5]) if len(sys.argv) > 5 else 2
w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
p = CUDA.prepare(quantize(w, QuantSpec(bits=4, scheme="asym", group=128)), "auto")
x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
CUDA.splits, CUDA.staging = splits, staging
for _ in range(6):
    CUDA.linear(x, p)
torch.cuda.synchronize()
