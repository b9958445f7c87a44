"""The CUDA kernels against the torch reference, on a GPU (the module skips without one).

Shapes are drawn fresh each run (odd N, K rarely a multiple of the 64-input tile, batch 1..33); the
seed is printed, and ``CIUIC_SEED`` replays a run. Outputs are poisoned (NaN) before each launch so
an unwritten element fails. The reference is fp64 maths on the dequantized weight; the kernels
compute exactly (q - z) * x in fp32 and scale each group once, so the only rounding that matters is
the output's own (bf16: 2^-9, fp16: 2^-12).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from ciuic_lab.errors import KernelError
from ciuic_lab.quant import QTensor, QuantSpec, dequantize, quantize

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from ciuic_lab.kernels import REGISTRY  # noqa: E402
from ciuic_lab.kernels.cuda import CUDA, STAGE_NAMES  # noqa: E402
from ciuic_lab.kernels.reference import moe_reference  # noqa: E402

_ok, _why = CUDA.available()
if not _ok:
    pytest.skip(f"the cuda backend is unavailable: {_why}", allow_module_level=True)

SEED = int(os.environ.get("CIUIC_SEED", random.SystemRandom().randrange(1 << 30)))
print(f"\n[gpu kernels] CIUIC_SEED={SEED}")
DEV = torch.device("cuda")
TOL = {torch.bfloat16: 6e-3, torch.float16: 1.5e-3}
DTYPES = (torch.bfloat16, torch.float16)
SPECS = {
    "int4-asym-g128": QuantSpec(bits=4, scheme="asym", group=128),
    "int4-sym-g64": QuantSpec(bits=4, scheme="sym", group=64),
    "int4-asym-g256": QuantSpec(bits=4, scheme="asym", group=256),
    "int4-asym-channel": QuantSpec(bits=4, scheme="asym", group="channel"),
    "int4-sym-tensor": QuantSpec(bits=4, scheme="sym", group="tensor"),
    "int8-asym-g128": QuantSpec(bits=8, scheme="asym", group=128),
    "int8-sym-channel": QuantSpec(bits=8, scheme="sym", group="channel"),
    "int8-asym-g64": QuantSpec(bits=8, scheme="asym", group=64),
    "fp8": QuantSpec(bits=8, format="fp8_e4m3", group=128, scheme="sym"),
}
BATCHES = (1, 2, 5, 8, 9, 13, 16, 17, 24, 25, 31, 32, 33)


def rng_for(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")


def reference(x: torch.Tensor, qt: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.double() @ dequantize(qt, torch.float64).to(x.device).T
    return y if bias is None else y + bias.double()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def check(y: torch.Tensor, ref: torch.Tensor, dtype, what: str) -> float:
    assert torch.isfinite(y).all(), f"{what}: unwritten (NaN) or non-finite outputs (seed {SEED})"
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} >= {TOL[dtype]} (seed {SEED})"
    return err


def random_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, device=DEV, generator=gen) * 0.05
    w[:, : max(1, k // 17)] *= 4.0  # some wider columns, as real weights have
    return w


def run_linear(x, p, bias=None):
    out = torch.full((x.shape[0], p.n), float("nan"), dtype=x.dtype, device=x.device)
    y = CUDA.linear(x, p, bias, out=out)
    assert y is out
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(SPECS))
def test_linear_random_shapes(name, dtype):
    spec = SPECS[name]
    r = rng_for(f"lin-{name}-{dtype}")
    gen = torch.Generator(device=DEV)
    gen.manual_seed(r.randrange(1 << 30))
    for trial in range(6):
        n = r.randrange(1, 400) | 1
        k = r.choice([r.randrange(1, 900), r.randrange(1, 120) * 8, r.randrange(65, 1500)])
        m = r.choice(BATCHES)
        qt = quantize(random_weight(n, k, gen), spec)
        p = CUDA.prepare(qt)
        x = torch.randn(m, k, device=DEV, generator=gen).to(dtype)
        bias = torch.randn(n, device=DEV, generator=gen).to(dtype) if trial % 2 else None
        y = run_linear(x, p, bias)
        check(y, reference(x, qt, bias), dtype, f"{name} {dtype} N={n} K={k} M={m} bias={bias is not None}")


@pytest.mark.parametrize("fmt", ["int4-asym-g128", "int8-asym-g64", "fp8"])
def test_split_k_paths_agree_and_are_deterministic(fmt):
    spec = SPECS[fmt]
    r = rng_for(f"split-{fmt}")
    gen = torch.Generator(device=DEV)
    gen.manual_seed(r.randrange(1 << 30))
    n, k = 777, 3000 + r.randrange(0, 60)
    qt = quantize(random_weight(n, k, gen), spec)
    p = CUDA.prepare(qt)
    try:
        for m in (1, 9, 32):
            x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
            ref = reference(x, qt)
            for s in (1, 2, 3, 5, 11):
                CUDA.splits = s
                y1 = run_linear(x, p)
                y2 = run_linear(x, p)
                check(y1, ref, torch.bfloat16, f"{fmt} splits={s} M={m} K={k}")
                assert torch.equal(y1, y2), f"{fmt} splits={s}: two runs differ (a race?) (seed {SEED})"
    finally:
        CUDA.splits = 0


@pytest.mark.parametrize("fmt", ["int4-asym-g128", "fp8"])
def test_small_batch_both_staging_modes(fmt):
    """x staged once for the whole K range (when the rows fit the shared-memory budget; more splits
    make them fit) or chunk by chunk, for every split count: the same results."""
    spec = SPECS[fmt]
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    n, k = 333, 6000 + (SEED % 50)
    qt = quantize(random_weight(n, k, gen), spec)
    p = CUDA.prepare(qt)
    try:
        for m in (1, 3, 8, 16, 27):
            x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
            ref = reference(x, qt)
            for staging in (1, 2):  # whole, chunk
                for s in (0, 1, 2, 7):
                    CUDA.splits, CUDA.staging = s, staging
                    check(run_linear(x, p), ref, torch.bfloat16, f"{fmt} M={m} K={k} splits={s} staging={staging}")
    finally:
        CUDA.splits, CUDA.staging = 0, 0


def check_every_plan(spec, dtype, gen, n: int, k: int, m: int, trial: int, plans, label: str) -> None:
    """A fresh weight [n, k] and x [m, k] (x only 2-byte aligned on trial 2; a bias on odd trials) run
    with every (splits, staging) plan: each against the reference, two runs bit for bit."""
    qt = quantize(random_weight(n, k, gen), spec)
    p = CUDA.prepare(qt)
    flat = torch.randn(m * k + 1, device=DEV, generator=gen).to(dtype)
    x = flat[1:].view(m, k) if trial == 2 else flat[: m * k].view(m, k)
    bias = torch.randn(n, device=DEV, generator=gen).to(dtype) if trial % 2 else None
    ref = reference(x, qt, bias)
    for s, st in plans:
        CUDA.splits, CUDA.staging = s, st
        y1 = run_linear(x, p, bias)
        y2 = run_linear(x, p, bias)
        what = f"{label} {dtype} N={n} K={k} M={m} splits={s} staging={st} aligned={trial != 2}"
        check(y1, ref, dtype, what)
        assert torch.equal(y1, y2), f"{what}: two runs differ (a race?) (seed {SEED})"


PIPE_SPECS = ["int4-asym-g128", "int4-sym-g64", "int4-asym-g256", "int4-asym-channel", "int4-sym-tensor"]
# the 1-byte formats: int8 in groups of 2 tiles (the compile-time group loop), of 1 tile and of a row
# (the run-time one), fp8 in its 128 x 128 blocks
GEMV_SPECS = PIPE_SPECS + ["int8-asym-g128", "int8-asym-g64", "int8-sym-channel", "fp8"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", GEMV_SPECS)
def test_gemv_random_shapes_every_split(name, dtype):
    """The GEMV (stagings 3 to 7, every block shape; batches of 1 to 8 rows; 9 rows and more take the general
    kernel), int4, int8 and fp8, on fresh shapes, every split-K count from the launcher's own to more splits than K tiles,
    x 16-byte aligned or not; two runs agree bit for bit."""
    spec = SPECS[name]
    r = rng_for(f"gemv-{name}-{dtype}")
    gen = torch.Generator(device=DEV)
    gen.manual_seed(r.randrange(1 << 30))
    try:
        for trial in range(5):
            n = r.randrange(1, 500) | 1
            k = r.choice([r.randrange(1, 900), r.randrange(1, 200) * 8, r.randrange(700, 2600)])
            m = r.choice([1, 1, 2, 3, 4, 5, 7, 8, 9])
            # blocks of 4 row tiles (3) with every split-K count; blocks of R row tiles whose K range
            # S warps share (4..7: 1x3, 1x7, 3x3, 2x7), 0 to more splits across blocks than K tiles
            plans = [(s, 3) for s in (0, 1, 2, 3, 5, 64)] + \
                [(r.choice([0, 1, 2, 3, 64]), st) for st in range(4, 8)]
            check_every_plan(spec, dtype, gen, n, k, m, trial, plans, f"gemv {name}")
    finally:
        CUDA.splits, CUDA.staging = 0, 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", PIPE_SPECS)
def test_pipe_random_shapes_every_split(name, dtype):
    """The int4 kernel with codes, scale pairs and x streamed through shared memory (staging 8, "pipe")
    on fresh shapes: odd N, K off the tile, 1 to 33 rows (33: a second launch of one row), split-K from
    the launcher's own to more splits than K tiles; x 16-byte aligned (the pipe) or not (it falls back to
    wgemm); two runs agree bit for bit."""
    spec = SPECS[name]
    r = rng_for(f"pipe-{name}-{dtype}")
    gen = torch.Generator(device=DEV)
    gen.manual_seed(r.randrange(1 << 30))
    pipe = STAGE_NAMES.index("pipe")
    try:
        for trial in range(6):
            n = r.randrange(1, 700) | 1
            k = r.choice([r.randrange(1, 200) * 8, r.randrange(1, 900), r.randrange(700, 3000) // 8 * 8])
            m = r.choice(BATCHES)
            check_every_plan(spec, dtype, gen, n, k, m, trial, [(s, pipe) for s in (0, 1, 2, 3, 5, 64)], f"pipe {name}")
    finally:
        CUDA.splits, CUDA.staging = 0, 0


def cuda_kernel_names(run) -> list[str]:
    """The CUDA kernels ``run()`` launches (run once before, so that no first-use work is profiled)."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("name", ["int8-asym-g128", "int8-sym-channel", "fp8"])
def test_byte_formats_run_on_the_gemv_when_asked(name):
    """int8 and fp8 launch the GEMV's kernel (not wgemm) when one of its block shapes is asked for, and
    wgemm when it is not (staging auto, 9 rows)."""
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    p = CUDA.prepare(quantize(random_weight(200, 1000, gen), SPECS[name]))
    x1 = torch.randn(1, 1000, device=DEV, generator=gen).to(torch.bfloat16)
    x9 = torch.randn(9, 1000, device=DEV, generator=gen).to(torch.bfloat16)
    try:
        for staging in range(3, 8):
            CUDA.splits, CUDA.staging = 0, staging
            names = cuda_kernel_names(lambda: CUDA.linear(x1, p))
            assert any("gemv_kernel" in n for n in names) and not any("wgemm_kernel" in n for n in names), \
                (STAGE_NAMES[staging], names)
        CUDA.splits, CUDA.staging = 0, 0
        names = cuda_kernel_names(lambda: CUDA.linear(x9, p))
        assert any("wgemm_kernel" in n for n in names) and not any("gemv_kernel" in n for n in names), names
    finally:
        CUDA.splits, CUDA.staging = 0, 0


def test_gemv_without_workspace_falls_back_when_x_does_not_fit():
    """Captured on a fresh stream (no workspace, so no split-K), a launch whose 8 rows of x over the
    whole K exceed the GEMV's shared memory runs on the general kernel; a small one on the GEMV."""
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    spec = SPECS["int4-asym-g128"]
    try:
        for staging in (3, 4, 6, 7):
            CUDA.staging = staging
            for n, k, m in ((97, 12800 + SEED % 64, 8), (97, 2000, 3)):
                qt = quantize(random_weight(n, k, gen), spec)
                p = CUDA.prepare(qt)
                x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=s):
                    y = CUDA.linear(x, p)
                g.replay()
                torch.cuda.synchronize()
                check(y, reference(x, qt), torch.bfloat16, f"graph, no workspace, staging {staging} N={n} K={k} M={m}")
    finally:
        CUDA.staging = 0


@pytest.mark.parametrize("k,n,m", [(7168, 2048, 1), (7168, 2048, 16), (2048, 7168, 4), (1536, 3072, 1)])
def test_deepseek_shapes(k, n, m):
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    for spec in (SPECS["int4-asym-g128"], SPECS["fp8"]):
        qt = quantize(random_weight(n, k, gen), spec)
        p = CUDA.prepare(qt)
        x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
        check(run_linear(x, p), reference(x, qt), torch.bfloat16, f"{spec.label()} {k}->{n} M={m}")


def test_unaligned_activations_take_the_scalar_path():
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    n, k = 301, 512
    qt = quantize(random_weight(n, k, gen), SPECS["int4-asym-g128"])
    p = CUDA.prepare(qt)
    flat = torch.randn(3 * k + 1, device=DEV, generator=gen).to(torch.bfloat16)
    x = flat[1:].view(3, k)  # 2-byte aligned only
    assert x.data_ptr() % 16 != 0 and x.is_contiguous()
    check(run_linear(x, p), reference(x, qt), torch.bfloat16, "x not 16-byte aligned")


def test_large_batches_are_chunked():
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    n, k = 263, 700
    qt = quantize(random_weight(n, k, gen), SPECS["int4-asym-g128"])
    p = CUDA.prepare(qt)
    for m in (33, 64, 100):
        x = torch.randn(m, k, device=DEV, generator=gen).to(torch.float16)
        check(run_linear(x, p), reference(x, qt), torch.float16, f"M={m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_fp8_every_code(dtype):
    """All 254 finite e4m3 codes (subnormals included) in every position of the fragments."""
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    n, k = 48, 254 * 2 + 3
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8, device=DEV)
    rows = [codes[torch.randperm(254, device=DEV, generator=gen)] for _ in range(2 * n)]
    full = torch.stack(rows).view(n, 2 * 254)
    full = torch.cat([full, codes[:3].expand(n, 3)], dim=1).contiguous()
    scales = torch.rand(1, (k + 127) // 128, device=DEV, generator=gen) + 0.5
    qt = QTensor(SPECS["fp8"], (n, k), full, scales.float(), None, torch.float32)
    p = CUDA.prepare(qt)
    x = (torch.randn(3, k, device=DEV, generator=gen) * 0.01).to(dtype)
    check(run_linear(x, p), reference(x, qt), dtype, "fp8 every code")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_int8_extreme_codes(dtype):
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    n, k, g = 40, 256, 64
    spec = QuantSpec(bits=8, scheme="asym", group=g)
    codes = torch.randint(0, 2, (n, k), device=DEV, generator=gen).to(torch.uint8) * 255
    zeros = torch.randint(0, 2, (n, k // g), device=DEV, generator=gen).to(torch.uint8) * 255
    scales = (torch.rand(n, k // g, device=DEV, generator=gen) * 1e-3 + 1e-4).half()
    qt = QTensor(spec, (n, k), codes, scales, zeros, torch.float32)
    p = CUDA.prepare(qt)
    x = torch.randn(5, k, device=DEV, generator=gen).to(dtype)
    check(run_linear(x, p), reference(x, qt), dtype, "int8 codes and zeros at 0 and 255")


def _random_experts(n_exp: int, hidden: int, inter: int, spec: QuantSpec, gen: torch.Generator):
    """n_exp experts' quantized gate_up [2 * inter, hidden] and down [hidden, inter] weights, and the
    backend's prepared copies: (gate_up, down, prepared gate_up, prepared down)."""
    gu_q = [quantize(random_weight(2 * inter, hidden, gen), spec) for _ in range(n_exp)]
    dn_q = [quantize(random_weight(hidden, inter, gen), spec) for _ in range(n_exp)]
    return gu_q, dn_q, [CUDA.prepare(q) for q in gu_q], [CUDA.prepare(q) for q in dn_q]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["int4-asym-g128", "int8-sym-channel", "fp8", "int4-sym-g64"])
def test_moe_grouped(name, dtype):
    spec = SPECS[name]
    r = rng_for(f"moe-{name}-{dtype}")
    gen = torch.Generator(device=DEV)
    gen.manual_seed(r.randrange(1 << 30))
    n_exp = r.randrange(3, 9)
    hidden = r.choice([256, 320, 448, 200 if not spec.is_fp8 else 384])
    inter = 16 * r.randrange(2, 12)
    gu_q, dn_q, gu, dn = _random_experts(n_exp, hidden, inter, spec, gen)
    try:
        for splits, staging in ((0, 0), (1, 2), (3, 2), (0, 1), (2, 1)):
            CUDA.splits, CUDA.staging = splits, staging
            for tokens in (1, 3, 5):
                top_k = r.randrange(1, min(4, n_exp) + 1)
                ids = torch.stack([torch.randperm(n_exp, device=DEV, generator=gen)[:top_k] for _ in range(tokens)])
                if tokens == 3:
                    ids[1, 0] = -1  # a slot routed nowhere contributes nothing
                wts = torch.rand(tokens, top_k, device=DEV, generator=gen)
                x = torch.randn(tokens, hidden, device=DEV, generator=gen).to(dtype)
                y = CUDA.moe(x, ids, wts, gu, dn)
                assert y is not NotImplemented
                ref = moe_reference(x, ids, wts, gu_q, dn_q, dtype)
                check(y, ref, dtype, f"moe {name} E={n_exp} hidden={hidden} inter={inter} T={tokens} "
                      f"k={top_k} splits={splits} staging={staging}")
    finally:
        CUDA.splits, CUDA.staging = 0, 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["int4-asym-g128", "int4-asym-g256", "int4-sym-g128", "int8-asym-g128", "fp8"])
def test_moe_on_the_gemv_every_shape_and_split(name, dtype):
    """The grouped MoE steps on the GEMV (gemv-1x3, gemv-1x7; gate and up tiles paired in a block, the
    down step's slots as one K range), int4, int8 and fp8: against the float64 reference on fresh random
    shapes (hidden not a multiple of the tile, an intermediate size whose tiles do not fill a body, up to
    9 slots, a slot routed nowhere), every split across blocks, and bit for bit the same on a second run."""
    spec = SPECS.get(name) or QuantSpec(bits=4, scheme=name.split("-")[1], group=int(name.split("-g")[1]))
    r = rng_for(f"moe-gemv-{name}-{dtype}")
    gen = torch.Generator(device=DEV)
    gen.manual_seed(r.randrange(1 << 30))
    for trial in range(2):
        n_exp = r.randrange(4, 12)
        hidden = r.choice([320, 448, 200, 1000]) if trial == 0 else 64 * r.randrange(8, 40) + r.choice([0, 8, 40])
        inter = 16 * r.randrange(2, 40)
        gu_q, dn_q, gu, dn = _random_experts(n_exp, hidden, inter, spec, gen)
        try:
            for staging in (4, 5):  # gemv-1x3, gemv-1x7
                for splits in (0, 1, 2, 3, 4):
                    CUDA.splits, CUDA.staging = splits, staging
                    tokens = r.choice([1, 1, 2, 5])
                    top_k = r.randrange(1, min(9, n_exp) + 1)
                    ids = torch.stack([torch.randperm(n_exp, device=DEV, generator=gen)[:top_k] for _ in range(tokens)])
                    if r.random() < 0.3:
                        ids[tokens - 1, r.randrange(top_k)] = -1  # a slot routed nowhere contributes nothing
                    wts = torch.rand(tokens, top_k, device=DEV, generator=gen)
                    x = torch.randn(tokens, hidden, device=DEV, generator=gen).to(dtype)
                    y = CUDA.moe(x, ids, wts, gu, dn)
                    ref = moe_reference(x, ids, wts, gu_q, dn_q, dtype)
                    what = (f"moe gemv {name} {dtype} E={n_exp} hidden={hidden} inter={inter} T={tokens} k={top_k} "
                            f"splits={splits} staging={STAGE_NAMES[staging]}")
                    check(y, ref, dtype, what)
                    assert torch.equal(CUDA.moe(x, ids, wts, gu, dn), y), f"{what}: not deterministic (seed {SEED})"
        finally:
            CUDA.splits, CUDA.staging = 0, 0


@pytest.mark.parametrize("staging", [4, 5], ids=["gemv-1x3", "gemv-1x7"])
@pytest.mark.parametrize("name", ["int4-asym-g128", "int8-asym-g128", "fp8"])
def test_moe_runs_on_the_gemv_when_asked(name, staging):
    """Both MoE steps launch the GEMV's kernel (not wgemm) when its block shape is asked for."""
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    _, _, gu, dn = _random_experts(4, 1024, 256, SPECS[name], gen)
    x = torch.randn(1, 1024, device=DEV).to(torch.bfloat16)
    ids = torch.tensor([[2, 0, 3]], device=DEV)
    w = torch.rand(1, 3, device=DEV)
    try:
        CUDA.splits, CUDA.staging = 0, staging
        names = cuda_kernel_names(lambda: CUDA.moe(x, ids, w, gu, dn))
    finally:
        CUDA.splits, CUDA.staging = 0, 0
    gemv = sorted({n for n in names if "gemv_kernel" in n})
    assert len(gemv) == 2 and not any("wgemm_kernel" in n for n in names), names


def test_moe_steps_replay_from_a_graph_and_the_moe_benchmark_runs():
    """The MoE launches captured in a CUDA graph (on the capture's stream, with its workspace) write the
    right output when replayed; the benchmark's MoE rows come out whole for a small expert shape."""
    from ciuic_lab.measure.bench_cuda import bench_moe_cuda, capture_graph, copy_bandwidth

    r = rng_for("moe-graph")
    gen = torch.Generator(device=DEV)
    gen.manual_seed(r.randrange(1 << 30))
    hidden, inter, n_exp = 64 * r.randrange(6, 20), 16 * r.randrange(10, 30), 6
    gu_q, dn_q, gu, dn = _random_experts(n_exp, hidden, inter, SPECS["int4-asym-g128"], gen)
    ids = torch.stack([torch.randperm(n_exp, device=DEV, generator=gen)[:3] for _ in range(2)])
    wts = torch.rand(2, 3, device=DEV, generator=gen)
    x = torch.randn(2, hidden, device=DEV, generator=gen).to(torch.bfloat16)
    steps = CUDA.moe_steps(x, ids, wts, gu, dn)
    steps.y.fill_(float("nan"))
    g = capture_graph(lambda: [launch(0, 0) for _, launch, *_ in steps.launches], warmups=1)
    steps.y.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    check(steps.y, moe_reference(x, ids, wts, gu_q, dn_q, torch.bfloat16), torch.bfloat16, "moe steps from a graph")
    rows = bench_moe_cuda(CUDA, copy_bandwidth(1 << 26, reps=3), torch.cuda.get_device_properties(DEV).L2_cache_size,
                          gen, reps=10, shapes=(("small", 512, 256, 3, (6, 6)),), formats=("int4", "fp8"))
    assert [(q["step"], q["kernel"]) for q in rows] == [(s, k) for s in ("gate_up", "down")
                                                        for k in ("cublas_bf16", "ciuic_int4", "ciuic_fp8")]
    assert all(q["us"] > 0 and q["chained_us"] > 0 for q in rows)
    assert rows[1]["rel_err"] < 1e-2 and rows[2]["rel_err"] < 1e-2


def test_moe_declines_what_it_does_not_take():
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    spec = SPECS["int4-asym-g128"]
    _, _, gu, dn = _random_experts(2, 128, 32, spec, gen)
    x = torch.randn(1, 128, device=DEV).to(torch.bfloat16)
    ids = torch.tensor([[0, 1]], device=DEV)
    w = torch.ones(1, 2, device=DEV)
    assert CUDA.moe(x, ids, w, [gu[0], None], dn) is NotImplemented
    big = torch.zeros(300, 2, dtype=torch.int64, device=DEV)
    assert CUDA.moe(torch.zeros(300, 128, device=DEV, dtype=torch.bfloat16), big, torch.ones(300, 2, device=DEV),
                    gu, dn) is NotImplemented


def test_bad_inputs_raise_kernel_error():
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    qt = quantize(random_weight(33, 200, gen), SPECS["int4-asym-g128"])
    p = CUDA.prepare(qt)
    x = torch.randn(4, 200, device=DEV).to(torch.bfloat16)
    with pytest.raises(KernelError, match="dtype"):
        CUDA.linear(x.to(torch.int32), p)
    with pytest.raises(KernelError, match=r"\[M, 200\]"):
        CUDA.linear(torch.randn(4, 199, device=DEV).to(torch.bfloat16), p)
    with pytest.raises(KernelError, match="contiguous"):
        CUDA.linear(torch.randn(4, 400, device=DEV).to(torch.bfloat16)[:, ::2], p)
    with pytest.raises(KernelError, match="cpu"):
        CUDA.linear(x.cpu(), p)
    with pytest.raises(KernelError, match="bias"):
        CUDA.linear(x, p, torch.zeros(32, device=DEV, dtype=torch.bfloat16))
    with pytest.raises(KernelError, match="out"):
        CUDA.linear(x, p, out=torch.empty(4, 33, device=DEV, dtype=torch.float16))
    with pytest.raises(KernelError, match="does not take"):
        CUDA.prepare(quantize(random_weight(8, 64, gen), QuantSpec(bits=4, group=32)))
    with pytest.raises(KernelError, match="one weight"):
        CUDA.prepare(quantize(torch.randn(2, 8, 64, device=DEV), SPECS["int4-asym-g128"]))


def test_float32_activations_run_through_bf16():
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    qt = quantize(random_weight(65, 300, gen), SPECS["int8-asym-g128"])
    x = torch.randn(3, 300, device=DEV, generator=gen)
    y = CUDA.linear(x, CUDA.prepare(qt))
    assert y.dtype == torch.float32
    check(y, reference(x.to(torch.bfloat16), qt), torch.bfloat16, "fp32 x")


def test_registry_picks_cuda_and_the_module_runs_on_it():
    from ciuic_lab.transforms import QuantLinear

    spec = SPECS["int4-asym-g128"]
    assert REGISTRY.pick("cuda", spec, "rowmajor", 1).name == "cuda"
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    qt = quantize(random_weight(130, 256, gen), spec)
    mod = QuantLinear(qt, None)
    x = torch.randn(2, 5, 256, device=DEV, generator=gen).to(torch.bfloat16)
    y = mod(x)
    assert mod.last_backend == "cuda" and y.shape == (2, 5, 130)
    check(y.reshape(10, 130), reference(x.reshape(10, 256), qt), torch.bfloat16, "QuantLinear on cuda")


@pytest.mark.parametrize("same_stream", [True, False], ids=["split-k", "no-workspace"])
def test_cuda_graph_capture_and_replay(same_stream):
    """Captured on the warmed-up stream, the graph uses split-K (its counters must come back to zero
    after every replay); captured on a fresh stream, the launch runs without a workspace."""
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    qt = quantize(random_weight(1000, 2048, gen), SPECS["int4-asym-g128"])
    p = CUDA.prepare(qt)
    x = torch.randn(1, 2048, device=DEV, generator=gen).to(torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = CUDA.linear(x, p)  # warm-up on the capture stream (allocates its workspace)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s if same_stream else None):
        y = CUDA.linear(x, p)
    for _ in range(3):
        x.copy_(torch.randn(1, 2048, device=DEV, generator=gen).to(torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        check(y, reference(x, qt), torch.bfloat16, "graph replay")


def test_first_use_measures_a_plan_and_keeps_it():
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED)
    n, k = 1232 + SEED % 7 * 16, 1984
    qt = quantize(random_weight(n, k, gen), SPECS["int4-asym-g128"])
    p = CUDA.prepare(qt)
    x = torch.randn(1, k, device=DEV, generator=gen).to(torch.bfloat16)
    for key in [key for key in CUDA.tuned if key[4:6] == (n, k)]:  # measured by an earlier test: forget it
        del CUDA.tuned[key]
    before = set(CUDA.tuned)
    y = run_linear(x, p)
    new = [key for key in CUDA.tuned if key not in before]
    assert len(new) == 1 and new[0][4:6] == (n, k)
    splits, staging, us = CUDA.tuned[new[0]]
    assert splits >= 0 and 0 <= staging < len(STAGE_NAMES) and us > 0
    check(y, reference(x, qt), torch.bfloat16, "after tuning")
    run_linear(x, p)
    assert set(CUDA.tuned) == before | set(new)


@pytest.mark.parametrize("other_us, picked", [(99.0, "auto"), (80.0, "other")])
def test_first_use_keeps_the_launchers_plan_unless_another_beats_it_clearly(other_us, picked):
    """Stand-in launches that spin for set times: a candidate within 3% of the launcher's own plan
    (the AUTO staging) loses to it; one clearly faster wins."""
    from ciuic_lab.kernels.cuda import STAGE_AUTO, STAGE_CHUNK, tune_splits

    other = (tune_splits(STAGE_CHUNK)[1], STAGE_CHUNK)
    cycles_per_us = torch.cuda.get_device_properties(DEV).clock_rate / 1e3  # kHz -> cycles per us
    times = {(0, STAGE_AUTO): 100.0, other: other_us}

    def launch(splits, staging):
        torch.cuda._sleep(int(times.get((splits, staging), 300.0) * cycles_per_us))
        return 0

    key = ("test-race", other_us)
    try:
        choice = CUDA._choice(key, launch, DEV, stagings=(STAGE_CHUNK,))
        assert choice == ((0, STAGE_AUTO) if picked == "auto" else other)
        assert CUDA.tuned[key][:2] == choice
    finally:
        CUDA.tuned.pop(key, None)


def _route_reference(logits, bias, top_k, norm, scale):
    """transformers' DeepseekV3 router with one group, after its product (fp64)."""
    scores = torch.sigmoid(logits.double())
    choice = scores + (0 if bias is None else bias.double())
    idx = torch.topk(choice, top_k, dim=-1).indices
    wts = scores.gather(1, idx)
    if norm:
        wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
    return idx, wts * scale, choice


def test_moe_route_matches_the_torch_router():
    r = rng_for("route")
    gen = torch.Generator(device=DEV)
    gen.manual_seed(r.randrange(1 << 30))
    for case in range(16):
        n_exp = r.choice([2, 8, 16, 33, 64, 256])
        top_k = r.randrange(1, min(8, n_exp) + 1)
        tokens = r.choice([1, 2, 5, 17, 300])
        norm, scale = r.random() < 0.7, r.choice([1.0, 2.5])
        extra = r.choice([-1, n_exp])
        logits = 2 * torch.randn(tokens, n_exp, device=DEV, generator=gen)
        bias = None if r.random() < 0.3 else 0.1 * torch.randn(n_exp, device=DEV, generator=gen)
        ids, wts = CUDA.route(logits, bias, top_k, norm, scale, extra=extra)
        ref_i, ref_w, choice = _route_reference(logits, bias, top_k, norm, scale)
        what = f"route E={n_exp} top_k={top_k} T={tokens} norm={norm} scale={scale} extra={extra}"
        assert ids.shape == (tokens, top_k + (extra >= 0)), what
        if extra >= 0:
            assert (ids[:, -1] == extra).all() and (wts[:, -1] == 1).all(), what
            ids, wts = ids[:, :top_k], wts[:, :top_k]
        for t in range(tokens):
            got, want = set(ids[t].tolist()), set(ref_i[t].tolist())
            if got != want:  # only a near-tie at the k-th place may differ (fp32 sigmoid against fp64)
                kth = choice[t].sort(descending=True).values[top_k - 1]
                for e in got ^ want:
                    assert abs(float(choice[t, e] - kth)) < 1e-6, (what, t, got, want)
                continue
            order_g, order_w = ids[t].argsort(), ref_i[t].argsort()
            torch.testing.assert_close(wts[t][order_g].double(), ref_w[t][order_w], rtol=1e-5, atol=1e-7, msg=what)


def test_moe_route_refuses_bad_input():
    logits = torch.randn(2, 8, device=DEV)
    with pytest.raises(KernelError, match="fp32 logits"):
        CUDA.route(logits.half(), None, 2, True, 1.0)
    with pytest.raises(KernelError, match="bias must be fp32"):
        CUDA.route(logits, torch.zeros(7, device=DEV), 2, True, 1.0)
    with pytest.raises(KernelError, match="top 9"):
        CUDA.route(logits, None, 9, True, 1.0)


def test_chained_timing_and_launch_fit_run_and_are_sane():
    """time_chain replays a captured graph of our launches (split-K workspace included); the fit
    gives a positive streaming rate and a fixed cost under the isolated time of the smallest size."""
    from ciuic_lab.measure.bench_cuda import copy_bandwidth, launch_fit, time_calls, time_chain

    rng = rng_for("chain")
    n, k = 16 * rng.randrange(40, 80) + rng.randrange(1, 16), 64 * rng.randrange(20, 40) + rng.randrange(1, 64)
    qt = quantize(torch.randn(n, k, device=DEV), SPECS["int4-asym-g128"])
    p = CUDA.prepare(qt, "auto")
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    outs = [torch.full((1, n), float("nan"), dtype=torch.bfloat16, device=DEV) for _ in range(3)]
    fns = [lambda o=o: CUDA.linear(x, p, out=o) for o in outs]
    iso = time_calls(fns, reps=20)["us"]
    ch = time_chain(fns, reps=5)
    assert 0 < ch < 10 * iso
    want = reference(x, qt)
    for o in outs:  # the replays wrote every output, right
        assert torch.isfinite(o).all()
        assert ((o.double() - want).norm() / want.norm()).item() < TOL[torch.bfloat16]
    gen = torch.Generator(device=DEV)
    gen.manual_seed(rng.randrange(1 << 30))
    l2 = torch.cuda.get_device_properties(DEV).L2_cache_size
    fit = launch_fit(CUDA, (2048, 8192, 16384), 8192, copy_bandwidth(1 << 28, reps=3), l2, gen, reps=10)
    ours = fit["fits"]["ciuic_int4/isolated"]
    assert ours["stream_GBps"] > 0 and set(fit["fits"]) >= {"cublas_bf16/chained", "ciuic_int4/chained"}
    assert ours["fixed_us"] < min(ours["points_us"].values())
