"""Probe one build of the byte-format kernels (int8, fp8) at one and four rows (for tuning, not a test).

Run once per build, each with its own sources and cache, e.g. the current tree against an older one
extracted with ``git archive``::

    CIUIC_NATIVE_DIR=/tmp/old/native CIUIC_CUDA_CACHE=/tmp/cc-old python tests/gpu/probe_bytes.py old
    CIUIC_CUDA_CACHE=/tmp/cc-new python tests/gpu/probe_bytes.py new

On DeepSeek-V3's two large shapes, for bf16 and fp16 activations, it times each format's launch as
the backend runs it (the tuner's pick, ``cfg``) and with each staging forced (``forced``: chunk, whole and
the GEMV's block shapes, each with the launcher's own split plan and checked like the first), with the
benchmark's timing (``time_calls``: events around every call,
weights rotated beyond L2), after checking the output against the fp64 reference. Prints one JSON
line "BYTES {...}".
"""

from __future__ import annotations

import json
import sys

import torch

from ciuic_lab.kernels.cuda import CUDA, DT, GEMV_STAGINGS, STAGE_CHUNK, STAGE_NAMES, STAGE_WHOLE
from ciuic_lab.measure.bench_cuda import _Peers, _rel_err, copy_bandwidth, time_calls
from ciuic_lab.quant import dequantize
from probe_setup import start

dev, gen = start(11)
l2 = torch.cuda.get_device_properties(dev).L2_cache_size
out = {"build": sys.argv[1] if len(sys.argv) > 1 else "base", "copy_GBps": copy_bandwidth(), "rows": []}
for k, n in ((7168, 18432), (18432, 7168)):
    peers = _Peers(CUDA, k, n, ("fp8", "int8"), l2, gen)
    wd = {f: dequantize(peers.q[f], torch.float64) for f in ("fp8", "int8")}
    for m in (1, 4):
        for dt in (torch.bfloat16, torch.float16):
            x = torch.randn(m, k, device=dev, generator=gen).to(dt)
            for f in ("fp8", "int8"):
                cps, nbytes = peers.ours[f], peers.q[f].nbytes
                ref = x.double() @ wd[f].T
                err = _rel_err(CUDA.linear(x, cps[0]), ref)
                if not err < 1e-2:
                    raise SystemExit(f"{f} {k}->{n} m={m} {dt}: relative error {err:.3g}, refusing to time it")
                calls = [lambda c=c: CUDA.linear(x, c) for c in cps]
                us = time_calls(calls, reps=100)["us"]
                cfg = [f"{STAGE_NAMES[v[1]]}/{v[0]}" for key, v in CUDA.tuned.items()
                       if key[2] == cps[0].fmt and key[3] == DT[dt] and key[4:6] == (n, k) and key[-1] == m]
                forced = {}
                for st in (STAGE_CHUNK, STAGE_WHOLE, *GEMV_STAGINGS):
                    CUDA.splits, CUDA.staging = 0, st
                    try:
                        e = _rel_err(CUDA.linear(x, cps[0]), ref)
                        if not e < 1e-2:
                            raise SystemExit(f"{f} {k}->{n} m={m} {dt} {STAGE_NAMES[st]}: relative error {e:.3g}")
                        forced[STAGE_NAMES[st]] = round(time_calls(calls, reps=60)["us"], 2)
                    finally:
                        CUDA.splits, CUDA.staging = 0, 0
                out["rows"].append(dict(shape=f"{k}->{n}", m=m, dtype=str(dt).split(".")[-1], fmt=f, us=round(us, 2),
                                        pct_copy_bw=round(100 * nbytes / us / 1e3 / out["copy_GBps"], 1),
                                        rel_err=err, cfg=cfg, forced=forced))
    del peers, wd
    torch.cuda.empty_cache()
print("BYTES " + json.dumps(out))
