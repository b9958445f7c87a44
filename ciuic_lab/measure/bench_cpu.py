"""``ciuic-lab bench kernels --device cpu``: quantized CPU kernels against torch, in the same run.

For each shape (K -> N) and batch, one row per candidate:

- torch peers: fp32 ``F.linear`` (the reference every ratio is taken against), bf16 ``F.linear``,
  int8 weight-only ``torch._weight_int8pack_mm`` (per-channel scales) and int4
  ``aten._weight_int4pack_mm_for_cpu`` (groups of 128);
- ours: the numba backend for each format (int8 per-channel sym, int4/int3/int2 groups of 128 asym)
  and each layout.

Method. Each candidate rotates among enough copies of its weight that the copies together exceed the
last-level cache (size read from the OS), so every call streams its weight from memory as decode does
on a real model. A candidate is checked against the torch reference on the benchmark shape before it is
timed. Timing alternates the candidate with torch fp32, call by call, after a warm-up; the row reports
the median time of each and ``speedup_vs_fp32`` = median fp32 / median candidate from those
alternating samples, so a slow patch of the machine hits both alike.

The first kernel call of a fresh process is measured in two subprocesses sharing a new Numba cache
directory: the first compiles (``compile_s``), the second loads the compiled kernel from the cache
(``cache_load_s``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..kernels import REGISTRY
from ..kernels import compat
from ..kernels import layouts as L
from ..quant import QuantSpec, dequantize, quantize

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (7168, 2048), (2048, 7168))  # (K, N)
QUICK_SHAPES = ((512, 384), (384, 512))
FORMATS = {
    "int8": QuantSpec(bits=8, scheme="sym", group="channel"),
    "int4": QuantSpec(bits=4, scheme="asym", group=128),
    "int3": QuantSpec(bits=3, scheme="asym", group=128),
    "int2": QuantSpec(bits=2, scheme="asym", group=128),
}
QUICK_FORMATS = ("int8", "int4")
TOLERANCE = 2e-4  # max |ours - reference| / max |reference| (fp32 accumulation order only)


def _median(v: list[float]) -> float:
    return statistics.median(v) if v else float("nan")


def _copies(nbytes: int, llc: int, quick: bool, cap: int = 256) -> int:
    if quick:
        return 2
    return max(2, min(cap, math.ceil(1.25 * llc / max(1, nbytes))))


def _clone_all(obj):
    """Deep copy of a prepared weight's tensors/arrays (fresh memory, same values)."""
    import copy

    import numpy as np

    new = copy.copy(obj)
    for k, v in vars(obj).items():
        if isinstance(v, torch.Tensor):
            setattr(new, k, v.clone())
        elif isinstance(v, np.ndarray):
            setattr(new, k, v.copy())
    return new


class _Candidate:
    def __init__(self, name: str, kind: str, fn: Callable[[int], Any], copies: int, nbytes: int,
                 fmt: str | None = None, layout: str | None = None, err: float | None = None):
        self.name, self.kind, self.fn, self.copies, self.nbytes = name, kind, fn, copies, nbytes
        self.fmt, self.layout, self.err = fmt, layout, err


def _torch_candidates(w: torch.Tensor, x: torch.Tensor, llc: int, quick: bool) -> list[_Candidate]:
    n, k = w.shape
    out = []
    # bf16
    wb = w.to(torch.bfloat16)
    nb = _copies(wb.numel() * 2, llc, quick)
    bank_b = [wb.clone() for _ in range(nb)]
    xb = x.to(torch.bfloat16)
    out.append(_Candidate("torch bf16", "torch", lambda i: F.linear(xb, bank_b[i % nb]), nb, wb.numel() * 2))
    # int8 weight-only, per-channel
    if hasattr(torch, "_weight_int8pack_mm"):
        s8 = (w.abs().amax(dim=1) / 127).clamp_min(1e-8)
        w8 = torch.round(w / s8[:, None]).clamp(-127, 127).to(torch.int8)
        n8 = _copies(w8.numel(), llc, quick)
        bank8 = [w8.clone() for _ in range(n8)]
        out.append(_Candidate("torch int8 (_weight_int8pack_mm)", "torch",
                              lambda i: torch._weight_int8pack_mm(x, bank8[i % n8], s8), n8, w8.numel()))
    # int4, groups of 128
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    conv = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is not None and conv is not None and k % 128 == 0:
        try:
            qt = quantize(w, QuantSpec(bits=4, scheme="asym", group=128))
            q = qt.codes_unpacked().to(torch.int32)
            s = qt.group_scales().to(torch.float32)  # [N, G]
            z = qt.group_zeros().to(torch.float32)
            # torch's int4 maths: w = (q - 8) * s + zero_term, zero_term = (8 - z) * s
            sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
            w4 = conv(q, 1)
            n4 = _copies(w4.numel() * w4.element_size(), llc, quick)
            bank4 = [w4.clone() for _ in range(n4)]
            op(x, bank4[0], 128, sz)
            out.append(_Candidate("torch int4 (_weight_int4pack_mm_for_cpu)", "torch",
                                  lambda i: op(x, bank4[i % n4], 128, sz), n4, w4.numel() * w4.element_size()))
        except (RuntimeError, NotImplementedError):
            pass
    return out


def _our_candidates(w: torch.Tensor, x: torch.Tensor, llc: int, quick: bool, formats, layouts) -> list[_Candidate]:
    backend = REGISTRY.get("numba")
    ok, _ = backend.available()
    if not ok:
        return []
    out = []
    for fname in formats:
        spec = FORMATS[fname]
        qt = quantize(w, spec)
        ref = F.linear(x, dequantize(qt, torch.float32))
        scale = float(ref.abs().max()) or 1.0
        for lay in layouts:
            if not backend.supports(spec, lay, x.shape[0]):
                continue
            p0 = backend.prepare(qt, lay)
            err = float((backend.linear(x, p0) - ref).abs().max()) / scale
            nbytes = p0.nbytes
            nc = _copies(nbytes, llc, quick)
            bank = [p0] + [_clone_all(p0) for _ in range(nc - 1)]
            out.append(_Candidate(f"ours {fname} {lay}", "ours",
                                  lambda i, bank=bank, nc=nc: backend.linear(x, bank[i % nc]), nc, nbytes,
                                  fname, lay, err))
    return out


def _time_pair(peer: Callable[[int], Any], cand: Callable[[int], Any], warmup: int, repeats: int):
    for i in range(warmup):
        peer(i)
        cand(i)
    tp, tc = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        peer(i)
        t1 = time.perf_counter()
        cand(i)
        t2 = time.perf_counter()
        tp.append(t1 - t0)
        tc.append(t2 - t1)
    return tp, tc


def jit_first_call(bits: int = 4, group: int = 128, layout: str = "rowmajor") -> dict[str, Any]:
    """First ``linear`` call in fresh processes: cold (compiles) then warm (loads Numba's on-disk cache)."""
    code = (
        "import time, torch\n"
        "from ciuic_lab.kernels.numba_cpu import NUMBA, _linear\n"
        "from ciuic_lab.quant import QuantSpec, quantize\n"
        f"qt = quantize(torch.randn(96, 320), QuantSpec(bits={bits}, group={group}))\n"
        f"p = NUMBA.prepare(qt, {layout!r}); x = torch.randn(1, 320)\n"
        "t = time.perf_counter(); NUMBA.linear(x, p); dt = time.perf_counter() - t\n"
        "import json; print(json.dumps({'s': dt, 'hits': sum(_linear.stats.cache_hits.values()), "
        "'misses': sum(_linear.stats.cache_misses.values())}))\n"
    )
    out: dict[str, Any] = {"config": f"int{bits} g{group} {layout}, batch 1"}
    with tempfile.TemporaryDirectory(prefix="ciuic-numba-") as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        runs = []
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
            if proc.returncode != 0:
                out["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "subprocess failed"
                return out
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out["compile_s"] = round(runs[0]["s"], 3)
    out["cache_load_s"] = round(runs[1]["s"], 3)
    out["cache_hit"] = runs[1]["hits"] > 0
    return out


def bench_kernels_cpu(shapes=None, batches=(1, 8), quick: bool = False, formats=None, layouts=None,
                      repeats: int | None = None, warmup: int | None = None, jit: bool = True,
                      torch_peers: bool = True) -> dict[str, Any]:
    """Time every candidate against torch fp32 (see the module docstring); JSON-able result."""
    shapes = tuple(shapes or (QUICK_SHAPES if quick else SHAPES))
    formats = tuple(formats or (QUICK_FORMATS if quick else FORMATS))
    layouts = tuple(layouts or (("rowmajor", "interleaved4") if quick else L.LAYOUTS))
    repeats = repeats or (5 if quick else 21)
    warmup = warmup or (2 if quick else 5)
    llc = compat.llc_bytes()
    info = compat.report()
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for k, n in shapes:
        w = torch.randn(n, k, generator=gen) * (1.0 / math.sqrt(k))
        for m in batches:
            x = torch.randn(m, k, generator=gen)
            nf = _copies(w.numel() * 4, llc, quick)
            bank_f = [w.clone() for _ in range(nf)]

            def fp32(i, bank_f=bank_f, nf=nf, x=x):
                return F.linear(x, bank_f[i % nf])

            cands = (_torch_candidates(w, x, llc, quick) if torch_peers else []) + _our_candidates(
                w, x, llc, quick, formats, layouts)
            peer_all: list[float] = []
            for c in cands:
                tp, tc = _time_pair(fp32, c.fn, warmup, repeats)
                peer_all += tp
                mp, mc = _median(tp), _median(tc)
                row = {"shape": f"{k}->{n}", "k": k, "n": n, "batch": m, "kernel": c.name, "kind": c.kind,
                       "format": c.fmt, "layout": c.layout, "ms": round(mc * 1e3, 4),
                       "fp32_ms": round(mp * 1e3, 4), "speedup_vs_fp32": round(mp / mc, 3),
                       "weight_mb": round(c.nbytes / 2**20, 2), "copies": c.copies}
                if c.err is not None:
                    row["max_rel_err"] = c.err
                    row["checked"] = bool(c.err <= TOLERANCE)
                rows.append(row)
                c.fn = None  # free the copies before the next candidate
            rows.append({"shape": f"{k}->{n}", "k": k, "n": n, "batch": m, "kernel": "torch fp32 F.linear",
                         "kind": "torch", "format": None, "layout": None, "ms": round(_median(peer_all) * 1e3, 4),
                         "fp32_ms": round(_median(peer_all) * 1e3, 4), "speedup_vs_fp32": 1.0,
                         "weight_mb": round(w.numel() * 4 / 2**20, 2), "copies": nf})
            del bank_f, cands
    # best of ours vs torch's own quantized kernels, per shape and batch
    summary = []
    for k, n in shapes:
        for m in batches:
            grp = [r for r in rows if r["k"] == k and r["n"] == n and r["batch"] == m]
            for fmt, tname in (("int8", "torch int8"), ("int4", "torch int4")):
                ours = [r for r in grp if r["format"] == fmt]
                theirs = [r for r in grp if r["kernel"].startswith(tname)]
                if ours:
                    best = max(ours, key=lambda r: r["speedup_vs_fp32"])
                    ent = {"shape": f"{k}->{n}", "batch": m, "format": fmt, "best_layout": best["layout"],
                           "ours_vs_fp32": best["speedup_vs_fp32"]}
                    if theirs:
                        ent["torch_vs_fp32"] = theirs[0]["speedup_vs_fp32"]
                        ent["ours_vs_torch_same_format"] = round(theirs[0]["ms"] / best["ms"], 3)
                    summary.append(ent)
    out: dict[str, Any] = {
        "device": "cpu",
        "cpu": info["cpu"]["model"],
        "features": {k: v for k, v in info["cpu"]["features"].items() if v},
        "usable_cpus": info["cpu"]["usable"],
        "llc_bytes": llc,
        "numba_threads": info["numba"].get("threads_used_by_kernels"),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "method": "median of alternating calls vs torch fp32; each candidate rotates weight copies beyond the LLC",
        "rows": rows,
        "summary": summary,
    }
    if jit:
        out["jit"] = jit_first_call()
    return out


__all__ = ["bench_kernels_cpu", "jit_first_call", "SHAPES", "FORMATS"]
