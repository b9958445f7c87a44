"""The numba CPU backend against the torch reference, on fresh random shapes.

Tolerances (kernel vs reference, both fp32 accumulation; only the summation order differs):
``|ours - ref| <= TOL * max|ref|`` elementwise, TOL = 2e-5 for fp32 activations; bf16/fp16
activations are compared with the reference fed the same rounded activations, output rounded once.
Shapes are drawn fresh each run (odd N, K not a multiple of the group nor of the vector width,
batch 1..33); the seed is in every failure message.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ciuic_lab.errors import KernelError
from ciuic_lab.kernels import REFERENCE, REGISTRY
from ciuic_lab.kernels import numba_cpu as NC
from ciuic_lab.kernels.numba_cpu import NUMBA
from ciuic_lab.quant import QuantSpec, dequantize, quantize

TOL = 2e-5
SEED = int.from_bytes(os.urandom(4), "little")

pytestmark = pytest.mark.skipif(not NUMBA.available()[0], reason=NUMBA.available()[1])


def _rng(*salt):
    return np.random.default_rng([SEED, *salt])


def _close(y, ref, tol, what):
    scale = float(ref.abs().max()) or 1.0
    err = float((y.float() - ref.float()).abs().max()) / scale
    assert err <= tol, f"{what}: max rel err {err:.2e} > {tol:.0e} (seed {SEED})"


def _weight(n, k, rng):
    return torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32) * 0.05)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["rowmajor", "interleaved4"])
def test_linear_matches_reference(bits, layout):
    rng = _rng(bits, len(layout))
    group = 64
    n = int(rng.integers(1, 60)) * 2 + 1  # odd
    k = int(rng.integers(2, 6)) * group + int(rng.integers(1, 16)) * 2 + 1  # not a multiple of group, lanes
    scheme = ("asym", "sym")[int(rng.integers(2))]
    qt = quantize(_weight(n, k, rng), QuantSpec(bits=bits, scheme=scheme, group=group))
    p = NUMBA.prepare(qt, layout)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    for m in (1, int(rng.integers(2, 9)), int(rng.integers(9, 34))):
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
        y = NUMBA.linear(x, p, bias)
        assert y.shape == (m, n) and y.dtype == torch.float32
        _close(y, REFERENCE.linear(x, qt, bias), TOL, f"int{bits} {scheme} {layout} N={n} K={k} M={m}")


@pytest.mark.parametrize("layout", ["rowmajor", "interleaved1"])
@pytest.mark.parametrize("bits,scheme,group", [(4, "asym", "channel"), (8, "sym", "tensor")])
def test_single_group_per_row(layout, bits, scheme, group):
    rng = _rng(bits, 7, len(layout))
    n, k = int(rng.integers(3, 80)) | 1, int(rng.integers(40, 700))
    qt = quantize(_weight(n, k, rng), QuantSpec(bits=bits, scheme=scheme, group=group))
    p = NUMBA.prepare(qt, layout)
    for m in (1, 5):
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
        _close(NUMBA.linear(x, p), REFERENCE.linear(x, qt), TOL, f"int{bits} {group} {layout} N={n} K={k} M={m}")


@pytest.mark.parametrize("layout", ["rowmajor", "interleaved1", "interleaved4"])
@pytest.mark.parametrize("bits,group", [(4, 64), (4, "channel"), (8, 128), (8, "channel"), (2, 64), (3, 128)])
def test_prefill_path_and_dequantize_exact(layout, bits, group):
    """Batches above 32 dequantize (in numba) and use torch's GEMM; the dense weight is the reference's,
    for every bit width and layout, on a row whose length is not a whole number of chunks or bytes."""
    rng = _rng(11, bits, len(layout), 0 if group == "channel" else group)
    n, k = int(rng.integers(3, 60)) | 1, int(rng.integers(130, 700)) | 1
    qt = quantize(_weight(n, k, rng), QuantSpec(bits=bits, group=group))
    p = NUMBA.prepare(qt, layout)
    assert torch.allclose(p.dequantize(), dequantize(qt), rtol=0, atol=1e-6), f"int{bits} {group} N={n} K={k}"
    x = torch.from_numpy(rng.standard_normal((40, k)).astype(np.float32))
    _close(NUMBA.linear(x, p), REFERENCE.linear(x, qt), TOL, f"prefill {layout} int{bits} {group} N={n} K={k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_activations_cast_at_the_boundary(dtype):
    rng = _rng(13)
    qt = quantize(_weight(33, 200, rng), QuantSpec(bits=4, group=64))
    p = NUMBA.prepare(qt, "rowmajor")
    x = torch.from_numpy(rng.standard_normal((3, 200)).astype(np.float32)).to(dtype)
    y = NUMBA.linear(x, p)
    assert y.dtype == dtype
    ref = REFERENCE.linear(x.float(), qt).to(dtype)
    _close(y, ref, 1e-2, f"{dtype}")


@pytest.mark.parametrize("macs", [0, None])
def test_bf16_prefill_on_a_bf16_weight_where_that_gemm_is_fast(monkeypatch, macs):
    """Above MAX_GEMM_ROWS, bf16 activations meet the weight dequantized straight to bf16 (rounded
    as torch rounds, bit for bit) where oneDNN's bf16 GEMM is fast and the product large enough
    (``macs`` 0: always), else fp32; either way the output is bf16 and matches the reference."""
    if macs is not None:
        monkeypatch.setattr(NC, "BF16_GEMM_MACS", macs)
    rng = _rng(41)
    n, k = int(rng.integers(40, 90)) | 1, int(rng.integers(200, 500)) | 1
    qt = quantize(_weight(n, k, rng), QuantSpec(bits=4, group=64))
    p = NUMBA.prepare(qt, "rowmajor")
    assert torch.equal(p.dequantize(torch.bfloat16).view(torch.int16), dequantize(qt).to(torch.bfloat16).view(torch.int16))
    x = torch.from_numpy(rng.standard_normal((NC.MAX_GEMM_ROWS + 7, k)).astype(np.float32)).to(torch.bfloat16)
    expect = NC.gemm_dtype(torch.bfloat16, x.shape[0] * n * k)
    assert (expect == torch.bfloat16) == (macs == 0 and NC.gemm_dtype(torch.bfloat16) == torch.bfloat16)
    y = NUMBA.linear(x, p)
    assert y.dtype == torch.bfloat16
    _close(y, REFERENCE.linear(x.float(), qt), 2e-2, f"bf16 prefill macs={macs} N={n} K={k}")


def test_moe_grouped_matches_expert_loop():
    """moe(): transformers' DeepseekV3Experts maths over the selected experts, against a plain loop."""
    rng = _rng(17)
    e, hidden, inter, t, top = 6, 128, 64, 3, 2
    spec = QuantSpec(bits=4, group=64)
    gu = [quantize(_weight(2 * inter, hidden, rng), spec) for _ in range(e)]
    dn = [quantize(_weight(hidden, inter, rng), spec) for _ in range(e)]
    x = torch.from_numpy(rng.standard_normal((t, hidden)).astype(np.float32))
    idx = torch.from_numpy(np.stack([rng.choice(e, top, replace=False) for _ in range(t)]).astype(np.int64))
    wts = torch.from_numpy(rng.random((t, top)).astype(np.float32))
    ref = torch.zeros(t, hidden)
    for ti in range(t):
        for j in range(top):
            ex = int(idx[ti, j])
            g, u = (x[ti:ti + 1] @ dequantize(gu[ex]).T).chunk(2, dim=-1)
            ref[ti] += wts[ti, j] * (torch.nn.functional.silu(g) * u @ dequantize(dn[ex]).T)[0]
    for layout in ("rowmajor", "interleaved4"):
        pg = [NUMBA.prepare(q, layout) for q in gu]
        pd = [NUMBA.prepare(q, layout) for q in dn]
        _close(NUMBA.moe(x, idx, wts, pg, pd), ref, 1e-4, f"moe {layout}")
        # the prefill form (one batched product per expert) gives the same
        big_idx, big_w = idx.repeat(45, 1), wts.repeat(45, 1)
        out = NUMBA.moe(x.repeat(45, 1), big_idx, big_w, pg, pd)
        _close(out[:t], ref, 1e-4, f"moe prefill {layout}")
    # an unquantized expert: the caller loops
    assert NUMBA.moe(x, idx, wts, [None] + pg[1:], pd) is NotImplemented


@pytest.mark.parametrize("dtype,macs", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 0)])
def test_moe_prefill_form_matches_the_reference(monkeypatch, dtype, macs):
    """The prefill form (pairs sorted by expert, one product per expert) against the fp64 reference:
    experts with more than MAX_GEMM_ROWS rows (dense GEMM, bf16 where that is fast) and fewer (the
    tile kernels) in one call, an expert nobody chose, and ids outside the lists, which count nothing."""
    from ciuic_lab.kernels.reference import moe_reference

    if macs is not None:  # every product above MAX_GEMM_ROWS on the bf16 GEMM (where it is fast)
        monkeypatch.setattr(NC, "BF16_GEMM_MACS", macs)
    rng = _rng(29)
    e, hidden, inter, top = 5, 96, 48, 2
    t = int(rng.integers(90, 140))
    spec = QuantSpec(bits=4, group=32)
    gu = [quantize(_weight(2 * inter, hidden, rng), spec) for _ in range(e)]
    dn = [quantize(_weight(hidden, inter, rng), spec) for _ in range(e)]
    x = torch.from_numpy(rng.standard_normal((t, hidden)).astype(np.float32)).to(dtype)
    # expert 0 in every token's first slot, 1 in ten tokens' second, 2 and 3 sharing the rest, 4 in
    # none; a few slots hold -1 or e (no expert); tokens in random order
    idx = np.zeros((t, top), np.int64)
    idx[:, 1] = rng.choice([2, 3], t)
    idx[:10, 1] = 1
    idx[10:16, 1] = -1
    idx[16:20, 0] = e
    idx = torch.from_numpy(idx[rng.permutation(t)])
    wts = torch.from_numpy(rng.random((t, top)).astype(np.float32)).to(dtype)
    assert t * top > 4 * NC.MAX_GEMM_ROWS  # the prefill form
    assert (idx == 0).sum() > NC.MAX_GEMM_ROWS and 0 < (idx == 1).sum() <= NC.MAX_GEMM_ROWS
    ref = moe_reference(x, idx, wts.double(), gu, dn, dtype)
    pg = [NUMBA.prepare(q, "rowmajor") for q in gu]
    pd = [NUMBA.prepare(q, "rowmajor") for q in dn]
    out = NUMBA.moe(x, idx, wts, pg, pd)
    assert out.dtype == dtype and out.shape == x.shape
    # bf16: the weights rounded to bf16 for the GEMM and the output rounded once, as torch's bf16 linear
    _close(out.double(), ref, 1e-4 if dtype == torch.float32 else 2e-2, f"moe prefill {dtype}")


def test_moe_bank_cache_lets_dead_weights_go():
    """The grouped-MoE bank cache must not keep quantized experts alive once their module drops them."""
    import gc
    import weakref

    rng = _rng(19)
    spec = QuantSpec(bits=4, group=64)
    x = torch.from_numpy(rng.standard_normal((1, 64)).astype(np.float32))
    idx, wts = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]])
    pg = [NUMBA.prepare(quantize(_weight(64, 64, rng), spec)) for _ in range(3)]
    pd = [NUMBA.prepare(quantize(_weight(64, 32, rng), spec)) for _ in range(3)]
    before = len(NUMBA._moe_cache)
    NUMBA.moe(x, idx, wts, pg, pd)
    NUMBA.moe(x, idx, wts, pg, pd)  # the second call reuses the bank
    assert len(NUMBA._moe_cache) == before + 1
    codes = weakref.ref(pg[0].codes)
    del pg, pd
    gc.collect()
    assert len(NUMBA._moe_cache) == before and codes() is None


def test_registry_picks_numba_on_cpu_and_falls_back():
    spec = QuantSpec(bits=4, group=128)
    assert REGISTRY.pick("cpu", spec, "rowmajor", 1).name == "numba"
    assert REGISTRY.pick("cpu", spec, "interleaved4", 8).name == "numba"
    assert REGISTRY.pick("cpu", QuantSpec(bits=5, group=128), "rowmajor", 1).name == "torch"
    assert REGISTRY.pick("cpu", QuantSpec(bits=3, group=16), "rowmajor", 1).name == "torch"  # group too small
    assert REGISTRY.pick("cpu", QuantSpec.from_dict({"format": "fp8_e4m3"}), "rowmajor", 1).name == "torch"
    assert REGISTRY.pick("cpu", spec, "rowmajor", 1, kernel="torch").name == "torch"
    assert NUMBA.priority > REFERENCE.priority
    assert set(("rowmajor", "interleaved1", "interleaved4")) <= set(NUMBA.layouts)


def test_registry_choice_is_remembered_until_what_it_rests_on_changes(monkeypatch):
    """The choice is looked up, not made again, on each call; it follows ``CIUIC_BACKENDS``, a backend
    that stops being available (a failed build) and one registered later."""
    spec = QuantSpec(bits=4, group=128)
    monkeypatch.delenv("CIUIC_BACKENDS", raising=False)
    assert REGISTRY.pick("cpu", spec, "rowmajor", 1) is NUMBA
    calls = []
    monkeypatch.setattr(REGISTRY, "candidates", lambda *a: calls.append(a) or [REFERENCE])
    assert REGISTRY.pick("cpu", spec, "rowmajor", 1) is NUMBA and not calls  # remembered
    monkeypatch.undo()
    monkeypatch.setenv("CIUIC_BACKENDS", "torch")
    assert REGISTRY.pick("cpu", spec, "rowmajor", 1) is REFERENCE
    monkeypatch.delenv("CIUIC_BACKENDS")
    assert REGISTRY.pick("cpu", spec, "rowmajor", 1) is NUMBA
    monkeypatch.setattr(NUMBA, "available", lambda: (False, "broken"))
    assert REGISTRY.pick("cpu", spec, "rowmajor", 1) is REFERENCE
    monkeypatch.undo()
    assert REGISTRY.pick("cpu", spec, "rowmajor", 1) is NUMBA

    class Faster:
        name, device, priority, layouts = "faster-test", "cpu", NUMBA.priority + 1, ("rowmajor",)

        def available(self):
            return True, ""

        def supports(self, spec, layout, batch):
            return True

    try:
        REGISTRY.register(Faster())
        assert REGISTRY.pick("cpu", spec, "rowmajor", 1).name == "faster-test"
    finally:
        REGISTRY.backends.pop("faster-test")
        REGISTRY._picks.clear()
    assert REGISTRY.pick("cpu", spec, "rowmajor", 1) is NUMBA


def test_bad_input_is_a_one_line_kernel_error():
    rng = _rng(19)
    qt = quantize(_weight(9, 64, rng), QuantSpec(bits=4, group=32))
    p = NUMBA.prepare(qt, "rowmajor")
    cases = [
        (torch.zeros(2, 63), "[M, 64]"),
        (torch.zeros(64), "[M, 64]"),
        (torch.zeros(2, 64, dtype=torch.int32), "float32"),
        (torch.zeros(64, 2).T, "contiguous"),
        (torch.zeros(2, 64, device="meta"), "CPU"),
    ]
    for x, word in cases:
        with pytest.raises(KernelError, match=None) as ei:
            NUMBA.linear(x, p)
        msg = str(ei.value)
        assert word in msg and "\n" not in msg, msg
    with pytest.raises(KernelError, match="bias"):
        NUMBA.linear(torch.zeros(1, 64), p, torch.zeros(8))
    with pytest.raises(KernelError, match="prepare"):
        NUMBA.linear(torch.zeros(1, 64), qt)
    with pytest.raises(KernelError, match="bits"):
        NUMBA.prepare(quantize(_weight(4, 64, rng), QuantSpec(bits=6, group=32)))
    with pytest.raises(KernelError, match="layout"):
        NUMBA.prepare(qt, "blocked")
    with pytest.raises(KernelError, match="group size"):
        NUMBA.prepare(quantize(_weight(4, 64, rng), QuantSpec(bits=3, group=16)))
    with pytest.raises(KernelError, match="index a bank"):
        NUMBA.prepare(quantize(torch.zeros(2, 4, 64), QuantSpec(bits=4, group=32)))


def test_threads_follow_usable_cpus():
    import numba

    from ciuic_lab.kernels.compat import usable_cpus

    rng = _rng(23)
    p = NUMBA.prepare(quantize(_weight(9, 64, rng), QuantSpec(bits=4, group=64)), "rowmajor")
    NUMBA.linear(torch.zeros(1, 64), p)
    assert numba.get_num_threads() == min(usable_cpus(), numba.config.NUMBA_NUM_THREADS)
    try:
        assert NC.set_threads(1) == 1
        assert numba.get_num_threads() == 1
        NUMBA.linear(torch.zeros(1, 64), p)
        with pytest.raises(KernelError, match="threads"):
            NC.set_threads(10_000)
    finally:
        NC.set_threads(None)


def test_inner_loop_is_vectorized():
    """The compiled GEMV loop uses packed vector FMAs (AVX2/AVX-512 on x86; NEON fmla on ARM), and on
    AVX-512 the table-lookup unpack (vpermps)."""
    import platform

    import numba

    rng = _rng(29)
    qt = quantize(_weight(8, 256, rng), QuantSpec(bits=4, group=128))
    p = NUMBA.prepare(qt, "rowmajor")
    fresh = numba.njit(parallel=True, fastmath=True)(NC._linear.py_func)  # uncached: asm stays inspectable
    x = np.zeros((1, 256), np.float32)
    y = np.zeros((1, 8), np.float32)
    fresh(p.codes, p.s, p.b, x, y, p.dims, p.meta, *p.confs)
    asm = "\n".join(fresh.inspect_asm().values())
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "vfmadd" in asm and ("%ymm" in asm or "%zmm" in asm)
        if p.confs[0].endswith(".1"):  # the table-lookup kernels
            assert "vpermps" in asm
    elif platform.machine().lower() in ("aarch64", "arm64"):
        assert "fmla" in asm and ".4s" in asm


def test_portable_unpack_matches_lookup_unpack(monkeypatch):
    """The target-neutral unpack (mask + convert) and the AVX-512 table lookup give the same results."""
    rng = _rng(37)
    qt = quantize(_weight(21, 300, rng), QuantSpec(bits=4, group=128))
    x = torch.from_numpy(rng.standard_normal((3, 300)).astype(np.float32))
    monkeypatch.setattr(NC, "USE_LUT", False)
    p = NUMBA.prepare(qt, "rowmajor")
    assert p.confs[0].endswith(".0")
    _close(NUMBA.linear(x, p), REFERENCE.linear(x, qt), TOL, "portable unpack")
    _close(NUMBA.linear(x[:1], p), REFERENCE.linear(x[:1], qt), TOL, "portable unpack, batch 1")


def test_fresh_process_loads_kernels_from_the_cache():
    rng = _rng(31)
    p = NUMBA.prepare(quantize(_weight(96, 320, rng), QuantSpec(bits=4, group=128)), "rowmajor")
    NUMBA.linear(torch.zeros(1, 320), p)  # compiled (or loaded) here, so the on-disk cache holds it
    code = (
        "import time, torch\n"
        "from ciuic_lab.kernels.numba_cpu import NUMBA, _linear\n"
        "from ciuic_lab.quant import QuantSpec, quantize\n"
        "p = NUMBA.prepare(quantize(torch.randn(96, 320), QuantSpec(bits=4, group=128)), 'rowmajor')\n"
        "t = time.perf_counter(); NUMBA.linear(torch.zeros(1, 320), p); dt = time.perf_counter() - t\n"
        "print(sum(_linear.stats.cache_hits.values()), sum(_linear.stats.cache_misses.values()), dt)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    hits, misses, dt = out.stdout.split()[-3:]
    assert int(hits) >= 1, out.stdout
    assert float(dt) < 2.0, f"first call took {dt}s despite the cache"


def test_bench_kernels_quick_rows_and_ratios():
    """The benchmark's quick mode: torch peers and ours, checked before timed, ratios to fp32 per row."""
    from ciuic_lab.measure.bench_cpu import bench_kernels_cpu

    out = bench_kernels_cpu(shapes=((256, 96),), batches=(1, 3), quick=True, formats=("int4",),
                            layouts=("rowmajor",), jit=False)
    kernels = {(r["kernel"], r["batch"]) for r in out["rows"]}
    for m in (1, 3):
        assert ("torch fp32 F.linear", m) in kernels and ("torch bf16", m) in kernels
        assert ("ours int4 rowmajor", m) in kernels
    for r in out["rows"]:
        assert r["ms"] > 0 and r["speedup_vs_fp32"] > 0 and r["fp32_ms"] > 0
        if r["kind"] == "ours":
            assert r["checked"], r
    assert out["llc_bytes"] > 0 and out["usable_cpus"] >= 1
    assert any(s["format"] == "int4" for s in out["summary"])
