"""Where the time of one int4 GEMV launch goes, from inside (a probe for tuning, not a test).

Needs a build with ``-DCIUIC_GEMV_TIMELINE=1`` (lane 0 of every warp stamps %globaltimer at entry, at
the start and the end of its main loop and before its stores, into the buffer passed as the bias):

    VARIANTS="tl=-DCIUIC_GEMV_TIMELINE=1 tl1=-DCIUIC_GEMV_TIMELINE=1,-DCIUIC_PROBE=1" \\
        PROBE_SCRIPT=tests/gpu/probe_timeline.py bash tests/gpu/probe.sh

One weight (K N from argv, default 7168 18432, int4 g128) in copies beyond L2, x bf16 of one row, the
block shape STAGING (default 6, 3 x 3) at splits 0; the launches are timed with events as the
benchmark does, and the stamps of every launch are read back. Prints, in µs from the first warp's
entry (medians over the launches): the spread of entries, loop starts, loop ends and exits (p0, p10,
p50, p90, p100), the span first entry to last exit beside the event time, and one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

from ciuic_lab.kernels.cuda import CUDA, DT, LIBRARY, STAGE_GEMV_RS, _ptr, build
from ciuic_lab.measure.bench_cuda import time_calls
from ciuic_lab.quant import QuantSpec, quantize

k, n = (int(a) for a in sys.argv[2:4]) if len(sys.argv) > 3 else (7168, 18432)
staging = int(os.environ.get("PROBE_STAGING", "6"))
build()
ffi, lib = LIBRARY.get()
dev = torch.device("cuda")
torch.manual_seed(0)
l2 = torch.cuda.get_device_properties(dev).L2_cache_size
qt = quantize(torch.randn(n, k, device=dev) * 0.02, QuantSpec(bits=4, scheme="asym", group=128))
copies = max(2, -(-3 * l2 // qt.nbytes))
ws = [CUDA.prepare(qt, "auto") for _ in range(copies)]
x = torch.randn(1, k, device=dev).to(torch.bfloat16)
y = torch.empty(1, n, dtype=torch.bfloat16, device=dev)
work = torch.zeros(1 << 24, dtype=torch.float32, device=dev)
reps = 40
bufs = [torch.zeros(1 << 20, dtype=torch.int32, device=dev) for _ in range(reps + 10)]
calls = [0]


def launch(w) -> None:
    b = bufs[calls[0] % len(bufs)]
    calls[0] += 1
    rc = lib.ciuic_wgemm(w.fmt, DT[x.dtype], _ptr(ffi, x), 1, w.n, w.k, w.ptrs[0], w.ptrs[1], w.ptrs[2],
                         w.group, w.n_groups, _ptr(ffi, b), _ptr(ffi, y), _ptr(ffi, work), work.numel(), 0,
                         staging, ffi.cast("ciuic_stream_t", torch.cuda.current_stream().cuda_stream))
    assert rc == 0, rc


for b in bufs:
    b.zero_()
us = time_calls([lambda w=w: launch(w) for w in ws], reps=reps, warmup=10, tries=1)["us"]
torch.cuda.synchronize()
# the block shape: R row tiles x S slices (the GEMV stagings), else 4 row tiles of one slice
R, S = {st: rs for rs, st in STAGE_GEMV_RS.items()}.get(staging, (4, 1))
wpb = R * S  # warps per block; warp w of the grid is slice (w % wpb) % S of block w // wpb


def decoded(b):
    """One launch's stamps: warp ids, their 4 times in µs from the first entry, their multiprocessors."""
    a = b.view(-1, 8)[:, :5].to(torch.int64).cpu()
    idx = torch.nonzero(a[:, 0] != 0).flatten()
    a = a[idx]
    t = ((a[:, :4] - a[:, 0].min()) % (1 << 32)).double() / 1e3
    return idx, t, a[:, 4]


launches = [decoded(b) for b in bufs[-reps:]]
qs = (0.0, 0.1, 0.5, 0.9, 1.0)
names = ("entry", "loop start", "loop end", "exit")
out = {"event_us": us, "warps": int(launches[0][0].numel()), "k": k, "n": n, "staging": staging}
print(f"{k}->{n} staging {staging}: event time {us:.2f} us, {out['warps']} warps; µs from the first entry "
      f"(medians over {len(launches)} launches)")
for j, name in enumerate(names):
    v = [statistics.median(float(torch.quantile(t[:, j], q)) for _, t, _ in launches) for q in qs]
    out[name] = v
    print(f"  {name:>10}: " + "  ".join(f"p{int(q * 100)} {x_:6.2f}" for q, x_ in zip(qs, v)))
# who ends last: loop ends by slice and by how many warps share the multiprocessor, over all launches
by_slice, by_load = {}, {}
for idx, t, sm in launches:
    per_sm = torch.bincount(sm, minlength=int(sm.max()) + 1)
    for w, te, smi in zip(idx.tolist(), t[:, 2].tolist(), sm.tolist()):
        by_slice.setdefault((w % wpb) % S, []).append(te)
        by_load.setdefault(int(per_sm[smi]), []).append(te)
# is the spread per warp or per block / multiprocessor? For the warps of the slices with whole ranges
# (all but the last): the range of loop ends inside a block, against the range of the blocks' medians,
# and of the multiprocessors' medians
if S > 1:
    inb, blk_med, sm_med = [], [], []
    for idx, t, sm in launches:
        per_blk, per_sm = {}, {}
        for w, te, smi in zip(idx.tolist(), t[:, 2].tolist(), sm.tolist()):
            if (w % wpb) % S < S - 1:
                per_blk.setdefault(w // wpb, []).append(te)
                per_sm.setdefault(smi, []).append(te)
        inb.append(statistics.median(max(v) - min(v) for v in per_blk.values()))
        meds = sorted(statistics.median(v) for v in per_blk.values())
        blk_med.append(meds[-1] - meds[0])
        sms = sorted(statistics.median(v) for v in per_sm.values())
        sm_med.append(sms[-1] - sms[0])
    out["spread"] = {"in_block_range": statistics.median(inb), "block_medians_range": statistics.median(blk_med),
                     "sm_medians_range": statistics.median(sm_med)}
    print("  equal-work warps' loop ends, µs: range inside a block (median over blocks) "
          f"{statistics.median(inb):.2f}; range of the blocks' medians {statistics.median(blk_med):.2f}; "
          f"of the multiprocessors' medians {statistics.median(sm_med):.2f}")
out["loop_end_by_slice"] = {k: [round(statistics.median(v), 2), round(max(v), 2), len(v) // reps]
                            for k, v in sorted(by_slice.items())}
out["loop_end_by_sm_warps"] = {k: [round(statistics.median(v), 2), round(max(v), 2), len(v) // reps]
                               for k, v in sorted(by_load.items())}
print("  loop end by slice [median, max, warps a launch]:", out["loop_end_by_slice"])
print("  loop end by warps on the multiprocessor [median, max, warps a launch]:", out["loop_end_by_sm_warps"])
loop = statistics.median(float((t[:, 2] - t[:, 1]).median()) for _, t, _ in launches)
epi = statistics.median(float((t[:, 3] - t[:, 2]).median()) for _, t, _ in launches)
out["loop_median_us"], out["epilogue_median_us"] = loop, epi
print(f"  per warp: loop {loop:.2f} us, loop end -> exit {epi:.2f} us (medians)")
print("TIMELINE " + json.dumps(out))
