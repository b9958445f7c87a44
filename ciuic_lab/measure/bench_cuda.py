"""GPU benchmarks: the quantized kernels against cuBLAS and torch's int4 kernel, and decode end to end.

``bench_kernels_cuda`` times, on DeepSeek-V3's projection shapes and batches 1/4/16:

- ``cublas_bf16``: ``F.linear`` with a bf16 weight (cuBLAS);
- ``tinygemm_int4``: torch's int4 kernel (``aten._weight_int4pack_mm``, groups of 128);
- ``ciuic_int4`` / ``ciuic_int8`` / ``ciuic_fp8``: this project's kernels (int4 and int8 with groups of
  128 and zero points, fp8 e4m3 with 128x128 block scales).

Every kernel of ours is checked against the torch reference (fp64) on the same inputs before it is
timed. Timing: CUDA events around each call, the GPU kept busy ahead of the host (a spin kernel) so
host overhead stays out; warm-up, many repeats, the median. The weights rotate over enough copies to
exceed the L2 cache several times, so every call reads from device memory. Achieved bandwidth counts
the weight's stored bytes (codes, scales, zero points) and is set against the device-to-device copy
bandwidth measured in the same run (bytes read plus bytes written).

Each row is timed twice: ``us``, isolated (events around every call, as above), and ``chained_us``,
back to back in one captured CUDA graph (as a captured decode step runs them: no events or host gaps
between calls, each launch's own start and tail kept). ``launch_fit`` times int4 batch 1 at N = 18432
over four K and fits each kernel to ``us = fixed + bytes / rate``: how fast it streams its weight,
apart from what each launch costs whatever its size (which is why a 70 MB weight cannot show the
streaming rate in its isolated time). ``empty_launch_us`` is an empty kernel timed both ways: the
floor of every row; the figure ``*_isolated_ceiling_pct_copy_bw`` is what a kernel would show
isolated if it read its bytes at exactly the copy bandwidth from its first instant to its last and
cost nothing beyond that empty launch.

``moe_rows`` time the two grouped MoE launches for one decode token (int4 g128 experts, and fp8
e4m3 ones, DeepSeek-V3's own format; the decode benchmark's experts and DeepSeek-V3's, the shared
expert as one more slot), each against the same
selected experts' bf16 products through cuBLAS (one ``F.linear`` per slot, nothing else), with the
ids rotating over enough experts that every launch reads its weights from device memory. The MoE
output is checked against the fp64 reference first.

``bench_decode_cuda`` builds a ~2B-parameter DeepSeek-V3-architecture model from a config (random
weights) and measures greedy decode tokens/s with a static KV cache and CUDA graphs, bf16 against
int4 (groups of 128) on these kernels. ``profile=True`` adds the kernels that take the most device
time per step. Note what transformers' DeepSeek-V3 attention does per decode step: it caches the
compressed latents and expands them with ``kv_b_proj`` over the whole cache (``expand_kv``), so that
projection runs on max_cache_len rows every step, in both plans.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import CiuicError
from ..kernels.cuda import GEMV_STAGINGS, STAGE_CHUNK, STAGE_NAMES, STAGE_PIPE, STAGE_WHOLE, tune_splits
from ..kernels.reference import moe_reference
from ..models.cache import cache_kwargs
from ..quant import QuantSpec, dequantize, quantize
from .bench_decode import DECODE_RECIPE

# DeepSeek-V3 projections, (K inputs, N outputs)
DEEPSEEK_V3_SHAPES = (
    (7168, 18432),   # dense MLP gate / up (intermediate 18432)
    (18432, 7168),   # dense MLP down
    (7168, 2048),    # routed expert gate / up (moe_intermediate 2048)
    (2048, 7168),    # routed expert down
    (7168, 1536),    # attention q_a (q_lora_rank 1536)
    (1536, 24576),   # attention q_b (128 heads x 192)
)
SPECS = {
    "int4": QuantSpec(bits=4, scheme="asym", group=128),
    "int8": QuantSpec(bits=8, scheme="asym", group=128),
    "fp8": QuantSpec(bits=8, format="fp8_e4m3", group=128, scheme="sym"),
}


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        raise CiuicError("bench --device cuda needs a CUDA GPU; this machine has none (accepted here: --device cpu)")


def _cuda_backend():
    from ..kernels.cuda import CUDA

    ok, why = CUDA.available()
    if not ok:
        raise CiuicError(f"the cuda kernel backend is not available: {why}")
    return CUDA


# ----------------------------------------------------------------------------------- timing
def time_calls(fns: list[Callable[[], Any]], reps: int = 100, warmup: int = 10, tries: int = 3) -> dict[str, float]:
    """Median (and spread) of device time per call, in microseconds, cycling through ``fns``.

    Each call sits between two CUDA events. Before the timed calls are queued a spin kernel keeps the
    GPU busy for longer than the host needs to queue them all, so the events measure the GPU, not the
    launch overhead of the host. Should the host still fall behind (a stall on a shared machine: the
    GPU then idles inside the events, and p90 runs away from p10), the round is measured again, up to
    ``tries`` rounds, and the steadiest kept."""
    n = len(fns)
    for i in range(warmup):
        fns[i % n]()
    torch.cuda.synchronize()
    best: dict[str, float] | None = None
    for _ in range(max(1, tries)):
        t0 = time.perf_counter()
        for i in range(min(reps, 20)):
            fns[i % n]()
        torch.cuda.synchronize()
        host_s = (time.perf_counter() - t0) / min(reps, 20)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        spin_s = min(0.5, 2.0 * host_s * reps + 2e-3)
        torch.cuda._sleep(int(spin_s * 2.0e9))
        for i in range(reps):
            starts[i].record()
            fns[i % n]()
            ends[i].record()
        torch.cuda.synchronize()
        us = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
        r = {"us": statistics.median(us), "p10": us[len(us) // 10], "p90": us[(9 * len(us)) // 10]}
        if best is None or r["p90"] - r["p10"] < best["p90"] - best["p10"]:
            best = r
        if r["p90"] <= 1.5 * r["p10"] + 2.0:
            break
    return best


def capture_graph(run: Callable[[], Any], warmups: int) -> "torch.cuda.CUDAGraph":
    """``run`` captured in a CUDA graph on a side stream it first ran on ``warmups`` times eagerly (so
    what it allocates and keeps per stream, our kernels' split-K workspace say, exists before capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):
        run()
    return g


def time_chain(fns: list[Callable[[], Any]], reps: int = 30, min_calls: int = 12) -> float:
    """Device time per call, in microseconds, of ``fns`` run back to back as a CUDA graph runs them.

    The calls (cycled through until there are ``min_calls``) are captured in one graph on a stream
    they were first run on eagerly (so workspaces they keep per stream exist); each replay sits
    between two CUDA events, behind a spin kernel as in ``time_calls``; the median replay over the
    number of calls. Against ``time_calls`` this drops the events between calls and the launch gaps
    the host leaves, as in a captured decode step; what stays is each launch's own start and tail."""
    n = len(fns)
    calls = max(n, math.ceil(min_calls / n) * n)

    def run():
        for i in range(calls):
            fns[i % n]()

    g = capture_graph(run, warmups=1)
    g.replay()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda._sleep(int(2.0e9 * 0.02))
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3 / calls


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy, bytes read + bytes written per second (GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], reps=reps, warmup=3)["us"]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (t * 1e-6) / 1e9


def isolated_ceiling_pct(nbytes: int, copy_gbs: float, floor_us: float) -> float:
    """Percent of the copy bandwidth an isolated launch shows if it streams ``nbytes`` at exactly the
    copy bandwidth from its first instant to its last, and costs nothing beyond an empty launch timed
    the same way (``floor_us``): events and launch included, no ramp-up, no tail."""
    stream_us = nbytes / copy_gbs / 1e3
    return 100.0 * stream_us / (floor_us + stream_us)


def _copies(nbytes: int, l2_bytes: int) -> int:
    """How many copies of a weight make every call miss the L2 cache."""
    return max(2, min(64, math.ceil(3 * l2_bytes / max(nbytes, 1))))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------ peers
def _tinygemm_pack(qt) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 g128 asym weight in tinygemm's form: w = (q - 8) * s + zero, zero = (8 - z) * s."""
    q = qt.codes_unpacked()                                   # [N, K] uint8
    packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)  # two codes a byte, even code high
    w = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), 8)
    s = qt.group_scales().float()
    z = (8.0 - qt.group_zeros().float()) * s
    sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, N, 2]
    return w, sz


class _Peers:
    """One weight of shape [n, k] in every timed form, each rotated over enough copies to miss L2:
    bf16 (cuBLAS), torch's int4 pack (tinygemm), and ours per format."""

    def __init__(self, backend, k: int, n: int, formats, l2: int, gen: torch.Generator):
        dev = gen.device
        self.k, self.n = k, n
        w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
        self.dense = [w] + [w.clone() for _ in range(_copies(n * k * 2, l2) - 1)]
        self.q = {f: quantize(w, SPECS[f]) for f in formats}
        self.ours = {}
        for f in formats:
            p0 = backend.prepare(self.q[f], "auto")
            self.ours[f] = [p0] + [p0.clone() for _ in range(_copies(p0.nbytes, l2) - 1)]
        self.tg, self.tg_error = None, None
        if "int4" in formats:
            try:
                tw, tsz = _tinygemm_pack(self.q["int4"])
                nb = tw.numel() * tw.element_size()
                self.tg = [(tw, tsz)] + [(tw.clone(), tsz.clone()) for _ in range(_copies(nb, l2) - 1)]
            except Exception as e:  # an older/newer torch without the CUDA int4 kernel
                self.tg_error = f"{type(e).__name__}: {e}"[:200]

    def calls(self, backend, x: torch.Tensor, formats, check: bool = True) -> dict[str, tuple[list, int, float | None]]:
        """kernel name -> (calls over the copies, weight bytes, relative error against fp64 or None).
        Every kernel of ours is checked before it is timed; a wrong one raises (unless not ``check``:
        diagnostic builds that skip part of the work)."""
        out: dict[str, tuple[list, int, float | None]] = {
            "cublas_bf16": ([lambda wi=wi: F.linear(x, wi) for wi in self.dense], self.n * self.k * 2, None)}
        label = f"{self.k}->{self.n} batch {x.shape[0]}"
        refs = {f: x.double() @ dequantize(self.q[f], torch.float64).T for f in formats}  # fp64, once per format
        if self.tg is not None:
            try:
                err = _rel_err(torch.ops.aten._weight_int4pack_mm(x, self.tg[0][0], 128, self.tg[0][1]), refs["int4"])
                out["tinygemm_int4"] = ([lambda a=a, b=b: torch.ops.aten._weight_int4pack_mm(x, a, 128, b)
                                         for a, b in self.tg], self.q["int4"].nbytes, err)
            except Exception as e:
                self.tg_error = f"{type(e).__name__}: {e}"[:200]
        for f in formats:
            cps = self.ours[f]
            y = torch.full((x.shape[0], self.n), float("nan"), dtype=torch.bfloat16, device=x.device)
            backend.linear(x, cps[0], out=y)
            err = _rel_err(y, refs[f])
            if check and not err < 1e-2:
                raise CiuicError(f"ciuic_{f} {label}: relative error {err:.3g} against the reference; "
                                 "refusing to time a wrong kernel")
            out[f"ciuic_{f}"] = ([lambda c=c: backend.linear(x, c) for c in cps], self.q[f].nbytes, err)
        return out


def _timed_row(fns: list, nbytes: int, copy_gbs: float, reps: int, chained: bool) -> dict[str, Any]:
    r = time_calls(fns, reps=reps)
    row = {"us": r["us"], "p10_us": r["p10"], "p90_us": r["p90"], "weight_bytes": nbytes,
           "GBps": nbytes / r["us"] / 1e3, "pct_copy_bw": 100 * nbytes / r["us"] / 1e3 / copy_gbs}
    if chained:
        t = time_chain(fns)
        row.update(chained_us=t, chained_pct_copy_bw=100 * nbytes / t / 1e3 / copy_gbs)
    return row


def bench_kernels_cuda(shapes=None, batches=(1, 4, 16), quick: bool = False,
                       formats=("int4", "int8", "fp8"), sweep: bool = False, reps: int | None = None,
                       chained: bool = True, fit_ks=None, moe: bool = True) -> dict:
    """Kernel timings on the GPU (see the module's docstring). ``sweep`` also times every split-K
    choice of our int4 kernel (for tuning; the reported row is the launcher's own choice).
    ``chained`` adds each kernel's time per call back to back in a CUDA graph (``time_chain``);
    ``fit_ks`` (default: 3584, 7168, 14336, 21504 in a full run, none in a quick one) times int4 batch 1
    at N = 18432 for those K and fits each kernel's time to ``fixed + bytes / streaming rate``; ``moe``
    adds the grouped MoE launches (``moe_rows``, ``bench_moe_cuda``)."""
    _need_cuda()
    backend = _cuda_backend()
    shapes = tuple(shapes or (DEEPSEEK_V3_SHAPES[:2] if quick else DEEPSEEK_V3_SHAPES))
    batches = tuple(batches if not quick else (1, 16))
    reps = reps or (30 if quick else 200)
    if fit_ks is None:
        fit_ks = () if quick else (3584, 7168, 14336, 21504)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
    copy_gbs = copy_bandwidth()
    gen = torch.Generator(device=dev)
    gen.manual_seed(1234)
    rows: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    tg_error = None
    for k, n in shapes:
        peers = _Peers(backend, k, n, formats, l2, gen)
        for m in batches:
            x = (torch.randn(m, k, device=dev, generator=gen)).to(torch.bfloat16)
            base = {"shape": f"{k}->{n}", "K": k, "N": n, "batch": m}
            peer_rows = {}
            for name, (fns, nbytes, err) in peers.calls(backend, x, formats).items():
                row = {**base, "kernel": name, **_timed_row(fns, nbytes, copy_gbs, reps, chained), "rel_err": err}
                peer_rows[name] = row
                rows.append(row)
            cb, tg = peer_rows["cublas_bf16"], peer_rows.get("tinygemm_int4")
            for f in formats:
                row = peer_rows[f"ciuic_{f}"]
                for peer, key in ((cb, "cublas"), (tg, "tinygemm")):
                    if peer is None:
                        continue
                    row[f"speedup_vs_{key}"] = peer["us"] / row["us"]
                    if chained:
                        row[f"chained_speedup_vs_{key}"] = peer["chained_us"] / row["chained_us"]
                cps = peers.ours[f]
                cfg = [v for key, v in backend.tuned.items()
                       if key[0] == "linear" and key[4:6] == (n, k) and key[2] == cps[0].fmt and key[-1] == min(m, 32)]
                if cfg:
                    row["config"] = {"splits": cfg[0][0], "staging": STAGE_NAMES[cfg[0][1]]}
                if sweep and f == "int4":
                    sw = {}
                    for st in (STAGE_CHUNK, STAGE_WHOLE, *GEMV_STAGINGS, STAGE_PIPE):
                        for s in tune_splits(st):
                            backend.splits, backend.staging = s, st
                            try:
                                sw[f"{STAGE_NAMES[st]}/{s}"] = time_calls([lambda c=c: backend.linear(x, c) for c in cps],
                                                                      reps=max(20, reps // 4))["us"]
                            finally:
                                backend.splits, backend.staging = 0, 0
                    sweeps.append({**base, "format": f, "auto_us": row["us"], "by_splits_us": sw})
        tg_error = tg_error or peers.tg_error
        del peers
        torch.cuda.empty_cache()
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "copy_bandwidth_GBps": copy_gbs,
        "l2_bytes": l2,
        "timing": f"CUDA events per call, median of {reps}, weights rotated over >= 3x L2"
                  + ("; chained_*: back to back in one CUDA graph, median replay / calls" if chained else ""),
        "rows": rows,
    }
    moe_formats = tuple(f for f in ("int4", "fp8") if f in formats)
    if moe and moe_formats:
        out["moe_rows"] = bench_moe_cuda(backend, copy_gbs, l2, gen, quick=quick, reps=reps, chained=chained,
                                         formats=moe_formats)
    if fit_ks and "int4" in formats:
        out["launch_fit"] = launch_fit(backend, fit_ks, 18432, copy_gbs, l2, gen, reps=min(reps, 100))
    if tg_error:
        out["tinygemm_error"] = tg_error
    if sweeps:
        out["splits_sweep"] = sweeps
    empty = [lambda: torch.cuda._sleep(0)]  # one block that returns at once: every launch's floor
    out["empty_launch_us"] = {"isolated": time_calls(empty, reps=reps)["us"]}
    if chained:
        out["empty_launch_us"]["chained"] = time_chain(empty)
    out["figures"] = _figures(rows, copy_gbs, out["empty_launch_us"]["isolated"])
    for r in out.get("moe_rows", ()):
        if r["kernel"] != "cublas_bf16":
            key = f"moe_{r['experts']}_{r['step']}" + ("" if r["kernel"] == "ciuic_int4" else f"_{r['kernel'][6:]}")
            out["figures"][f"{key}_pct_copy_bw"] = r["pct_copy_bw"]
            out["figures"][f"{key}_vs_cublas"] = r.get("speedup_vs_cublas")
    return out


# (name, hidden, moe intermediate, top-k + the shared expert, experts to rotate over (full run, quick))
MOE_SHAPES = (
    ("decode-bench", 4096, 1536, 5, (24, 12)),
    ("deepseek-v3", 7168, 2048, 9, (24, 0)),
)


def bench_moe_cuda(backend, copy_gbs: float, l2: int, gen: torch.Generator, quick: bool = False,
                   reps: int = 200, chained: bool = True, shapes=MOE_SHAPES, formats=("int4",)) -> list[dict[str, Any]]:
    """The grouped MoE launches for one token (see the module's docstring): per expert shape and step
    (gate_up, down), ``cublas_bf16`` (one ``F.linear`` per selected expert) and ``ciuic_<format>`` for
    each of ``formats`` (the backend's own plan for the launch; the same ids, weights and x), with
    bytes, GB/s and the share of the copy bandwidth."""
    dev = gen.device
    rows: list[dict[str, Any]] = []
    for name, hidden, inter, slots, n_full in shapes:
        n_exp = n_full[1] if quick else n_full[0]
        if n_exp == 0:
            continue
        gu16 = [(torch.randn(2 * inter, hidden, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
                for _ in range(n_exp)]
        dn16 = [(torch.randn(hidden, inter, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
                for _ in range(n_exp)]
        pick = torch.Generator(device="cpu")
        pick.manual_seed(n_exp)
        inputs = []
        for _ in range(16):
            ids = torch.randperm(n_exp, generator=pick)[:slots].view(1, slots).to(dev)
            w = torch.rand(1, slots, device=dev, generator=gen)
            x = torch.randn(1, hidden, device=dev, generator=gen).to(torch.bfloat16)
            inputs.append((ids, w, x))
        ours = {}
        for f in formats:
            gq, dq = [quantize(w, SPECS[f]) for w in gu16], [quantize(w, SPECS[f]) for w in dn16]
            gu, dn = [backend.prepare(q, "auto") for q in gq], [backend.prepare(q, "auto") for q in dq]
            sets = [backend.moe_steps(x, ids, w, gu, dn) for ids, w, x in inputs]
            ids, w, x = inputs[0]
            y = backend.moe(x, ids, w, gu, dn)
            err = _rel_err(y, moe_reference(x, ids, w, gq, dq, torch.bfloat16))
            if not err < 1e-2:
                raise CiuicError(f"moe {name} {f}: relative error {err:.3g} against the reference; refusing to time it")
            for st in sets:  # every set's h written once (the down step's input)
                for _, launch, *_ in st.launches:
                    launch(0, 0)
            ours[f] = (gu[0].nbytes, dn[0].nbytes, sets, err, (gu, dn))  # (the launches point into gu, dn)
            del gq, dq
        first = ours[formats[0]][2]
        for k, step in enumerate(("gate_up", "down")):
            # the selected experts' bf16 weights, listed on the host (no copy back inside a graph capture)
            if step == "gate_up":
                dense = [lambda x=x, ws=[gu16[e] for e in ids[0].tolist()]: [F.linear(x, wi) for wi in ws]
                         for ids, _, x in inputs]
                nb16 = 2 * inter * hidden * 2
            else:
                dense = [lambda h=st.h, ws=[dn16[e] for e in ids[0].tolist()]:
                         [F.linear(h[j:j + 1], wi) for j, wi in enumerate(ws)] for (ids, _, _), st in zip(inputs, first)]
                nb16 = hidden * inter * 2
            base = {"experts": name, "hidden": hidden, "inter": inter, "slots": slots, "step": step}
            cb = {**base, "kernel": "cublas_bf16", **_timed_row(dense, slots * nb16, copy_gbs, reps, chained)}
            rows.append(cb)
            for f in formats:
                nb_gu, nb_dn, sets, err, _ = ours[f]
                fns = []
                for st in sets:
                    _, launch, key, cands, _ = st.launches[k]
                    plan = backend._choice(key, launch, dev, cands)
                    fns.append(lambda launch=launch, plan=plan: launch(*plan))
                nb = nb_gu if step == "gate_up" else nb_dn
                row = {**base, "kernel": f"ciuic_{f}", **_timed_row(fns, slots * nb, copy_gbs, reps, chained),
                       "rel_err": err}
                row["speedup_vs_cublas"] = cb["us"] / row["us"]
                if chained:
                    row["chained_speedup_vs_cublas"] = cb["chained_us"] / row["chained_us"]
                tuned = backend.tuned.get(sets[0].launches[k][2])
                if tuned:
                    row["config"] = {"splits": tuned[0], "staging": STAGE_NAMES[tuned[1]]}
                rows.append(row)
        del gu16, dn16, inputs, ours, first
        torch.cuda.empty_cache()
    return rows


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``us = fixed + nbytes / rate`` over (nbytes, us): (fixed in us, rate in GB/s)."""
    if len(points) < 2 or len({p[0] for p in points}) < 2:
        raise ValueError(f"fitting a line needs two or more distinct sizes; got {points}")
    slope, fixed = statistics.linear_regression([p[0] for p in points], [p[1] for p in points])
    return fixed, 1e-3 / slope


def launch_fit(backend, ks, n: int, copy_gbs: float, l2: int, gen: torch.Generator, reps: int = 100) -> dict:
    """int4 batch 1 at N = ``n`` for each K in ``ks``, each kernel timed isolated and chained; per
    kernel and method, the line ``us = fixed + bytes / rate``: the launch's fixed cost (start,
    ramp-up, tail) apart from the rate at which it streams its weight (against the copy bandwidth)."""
    pts: dict[str, list[tuple[float, float]]] = {}
    for k in ks:
        peers = _Peers(backend, k, n, ("int4",), l2, gen)
        x = torch.randn(1, k, device=gen.device, generator=gen).to(torch.bfloat16)
        for name, (fns, nbytes, _) in peers.calls(backend, x, ("int4",)).items():
            r = _timed_row(fns, nbytes, copy_gbs, reps, chained=True)
            pts.setdefault(f"{name}/isolated", []).append((nbytes, r["us"]))
            pts.setdefault(f"{name}/chained", []).append((nbytes, r["chained_us"]))
        del peers
        torch.cuda.empty_cache()
    fits = {}
    for key, p in pts.items():
        fixed, rate = fit_line(p)
        fits[key] = {"fixed_us": fixed, "stream_GBps": rate, "stream_pct_copy_bw": 100 * rate / copy_gbs,
                     "points_us": {f"{b / 1e6:.1f}MB": round(t, 2) for b, t in p}}
    return {"n": n, "ks": list(ks), "batch": 1, "fits": fits}


def _figures(rows: list[dict], copy_gbs: float, floor_us: float) -> dict[str, Any]:
    """The headline numbers, read off the rows (``chained_*``: the same, back to back), and from the
    empty launch's isolated time (``floor_us``) the ceiling of the isolated percentage for the int4
    batch-1 weight."""
    def get(shape, m, kernel):
        for r in rows:
            if r["shape"] == shape and r["batch"] == m and r["kernel"] == kernel:
                return r
        return None

    f: dict[str, Any] = {}
    a = get("7168->18432", 1, "ciuic_int4")
    if a:
        f["int4_b1_7168x18432_pct_copy_bw"] = a["pct_copy_bw"]
        f["int4_b1_7168x18432_vs_cublas"] = a.get("speedup_vs_cublas")
        f["int4_b1_7168x18432_vs_tinygemm"] = a.get("speedup_vs_tinygemm")
        f["int4_b1_7168x18432_isolated_ceiling_pct_copy_bw"] = isolated_ceiling_pct(
            a["weight_bytes"], copy_gbs, floor_us)
        if "chained_us" in a:
            f["chained_int4_b1_7168x18432_pct_copy_bw"] = a["chained_pct_copy_bw"]
            f["chained_int4_b1_7168x18432_vs_cublas"] = a.get("chained_speedup_vs_cublas")
            f["chained_int4_b1_7168x18432_vs_tinygemm"] = a.get("chained_speedup_vs_tinygemm")
    for shape in ("7168->18432", "18432->7168"):
        b = get(shape, 16, "ciuic_int4")
        if b:
            f[f"int4_b16_{shape.replace('->', 'x')}_vs_cublas"] = b.get("speedup_vs_cublas")
    c = get("7168->18432", 1, "ciuic_fp8")
    if c:
        f["fp8_b1_7168x18432_pct_copy_bw"] = c["pct_copy_bw"]
    return f


# ------------------------------------------------------------------------------ decode
DECODE_CONFIG = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1536,
    num_hidden_layers=6, first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4,
    n_shared_experts=1, n_group=1, topk_group=1, num_attention_heads=32, num_key_value_heads=32,
    q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    max_position_embeddings=4096, tie_word_embeddings=False,
)
QUICK_CONFIG = dict(DECODE_CONFIG, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                    num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384,
                    kv_lora_rank=256, vocab_size=8192)


def build_decode_model(config: dict | None = None, dtype=torch.bfloat16, device="cuda", seed: int = 0,
                       experts_implementation: str | None = "grouped_mm"):
    """A DeepSeek-V3-architecture model from a config, random weights (std 0.02), in eval mode.

    ``experts_implementation``: transformers' expert kernel for the bf16 baseline; ``grouped_mm`` (one
    grouped GEMM, no host synchronisation, so it can be captured in a CUDA graph) where this
    transformers has it, else its default loop."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**(config or DECODE_CONFIG))
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = DeepseekV3ForCausalLM._from_config(cfg, experts_implementation=experts_implementation,
                                                        dtype=dtype) if experts_implementation else None
        except (TypeError, ValueError):
            model = None
        if model is None:
            model = DeepseekV3ForCausalLM(cfg)
        model = model.to(dtype)
    for p in model.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
    for name, b in model.named_buffers():
        if "e_score_correction_bias" in name:
            b.zero_()
    return model.eval()


def _decode_tokens_per_s(model, prompt_len: int, new_tokens: int, graphs: bool, profile: bool = False) -> dict[str, Any]:
    """Greedy decode with a static cache; one captured CUDA graph per step when ``graphs``."""
    from transformers import StaticCache

    dev = next(model.parameters()).device
    max_len = prompt_len + new_tokens + 64  # warm-up, capture and profiled steps come on top
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=dev)
    kv = cache_kwargs(model, cache)
    with torch.no_grad():
        out = model(input_ids=ids, **kv, cache_position=torch.arange(prompt_len, device=dev), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        pos = torch.tensor([prompt_len], device=dev)

        def step():
            o = model(input_ids=tok, **kv, cache_position=pos, position_ids=pos[None], use_cache=True)
            tok.copy_(o.logits[:, -1:].argmax(-1))
            pos.add_(1)

        mode = "eager"
        run = step
        if graphs:
            try:
                run = capture_graph(step, warmups=2).replay
                mode = "cuda_graph"
            except Exception as e:  # capture failed: time the eager loop and say why
                mode = f"eager (graph capture failed: {type(e).__name__}: {str(e)[:160]})"
                run = step
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        n = new_tokens
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        top = _profile_top(run) if profile else None
    out = {"tokens_per_s": n / dt, "ms_per_token": 1e3 * dt / n, "mode": mode}
    if top is not None:
        out["top_kernels"] = top
    return out


def _profile_top(run, steps: int = 5, keep: int = 12) -> list[dict[str, Any]]:
    """The kernels that take the most device time per decode step (torch profiler, CUDA activity)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                run()
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None)
            if t is None:
                t = getattr(e, "cuda_time_total", 0.0)
            rows.append((e.key, float(t), int(e.count)))
        rows.sort(key=lambda r: -r[1])
        total = sum(r[1] for r in rows)
        out = [{"kernel": k[:100], "us_per_step": t / steps, "calls_per_step": c / steps} for k, t, c in rows[:keep]]
        out.append({"kernel": "(all)", "us_per_step": total / steps})
        return out
    except Exception as e:  # the profiler is a diagnostic: never fail the benchmark for it
        return [{"error": f"{type(e).__name__}: {e}"[:200]}]


def bench_decode_cuda(quick: bool = False, recipe: Any = None, prompt_len: int = 32,
                      new_tokens: int | None = None, graphs: bool = True, profile: bool = False) -> dict:
    """Decode tokens/s of a DeepSeek-V3-architecture model on the GPU, bf16 vs a quantized plan
    (``recipe``: anything :func:`ciuic_lab.resolve` takes; default :data:`DECODE_RECIPE`)."""
    _need_cuda()
    backend = _cuda_backend()
    from ..plan import resolve
    from ..sites import sites
    from ..transforms import apply, backends_in_use

    cfg = QUICK_CONFIG if quick else DECODE_CONFIG
    new_tokens = new_tokens or (16 if quick else 128)
    model = build_decode_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    impl_note = f"bf16 experts: {getattr(model.config, '_experts_implementation', None)}"
    base = _decode_tokens_per_s(model, prompt_len, new_tokens, graphs, profile)
    plan = resolve(copy.deepcopy(DECODE_RECIPE) if recipe is None else recipe, sites(model))
    name = plan.recipe.name
    t0 = time.perf_counter()
    apply(model, plan)
    apply_s = time.perf_counter() - t0
    q = _decode_tokens_per_s(model, prompt_len, new_tokens, graphs, profile)
    used = sorted(set(backends_in_use(model).values()))
    out = {
        "device": torch.cuda.get_device_name(),
        "model": "DeepseekV3ForCausalLM from a config, random weights",
        "params": n_params,
        "config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "n_routed_experts",
                                       "num_experts_per_tok", "moe_intermediate_size", "intermediate_size")},
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "recipe": plan.recipe.to_dict(),
        "apply_s": apply_s,
        "backends": used,
        "rows": [
            {"plan": "bf16", **base},
            {"plan": name, **q},
        ],
        "speedup": q["tokens_per_s"] / base["tokens_per_s"],
    }
    out["note"] = impl_note
    del backend
    return out
