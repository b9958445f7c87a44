"""Probe: the two grouped MoE launches, one decode token, every plan (wgemm's and the GEMV's), on
cold weights (the ids rotate over many experts, so each launch reads its experts from DRAM).

    python3 tests/gpu/probe_moe.py            # the decode benchmark's MoE and DeepSeek-V3's, int4 g128
    python3 tests/gpu/probe_moe.py fp8        # the same with fp8 e4m3 experts (int8: int8 g128)
Prints, per step and plan, the median device time, GB/s over the experts' bytes (codes, scales, zero
points) and the percentage of the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import random
import sys

import torch

from ciuic_lab.kernels.cuda import CUDA, STAGE_AUTO, STAGE_CHUNK, STAGE_NAMES, STAGE_WHOLE, tune_splits
from ciuic_lab.measure.bench_cuda import copy_bandwidth, time_calls
from ciuic_lab.quant import QuantSpec, quantize

SHAPES = {  # name: (hidden, inter, experts, slots per token: top_k + the shared expert)
    "decode-bench 4096x1536 top4+1": (4096, 1536, 48, 5),
    "deepseek-v3 7168x2048 top8+1": (7168, 2048, 40, 9),
}


SPECS = {
    "int4": QuantSpec(bits=4, scheme="asym", group=128),
    "int8": QuantSpec(bits=8, scheme="asym", group=128),
    "fp8": QuantSpec(bits=8, format="fp8_e4m3", group=128, scheme="sym"),
}


def main(fmt: str) -> int:
    dev = torch.device("cuda")
    spec = SPECS[fmt]
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s, {fmt} experts")
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    r = random.Random(0)
    CUDA.tune = False
    fails = 0
    for name, (hidden, inter, n_exp, slots) in SHAPES.items():
        gu = [CUDA.prepare(quantize(torch.randn(2 * inter, hidden, device=dev, generator=gen) * 0.02, spec))
              for _ in range(n_exp)]
        dn = [CUDA.prepare(quantize(torch.randn(hidden, inter, device=dev, generator=gen) * 0.02, spec))
              for _ in range(n_exp)]
        step_bytes = {"gate_up": slots * gu[0].nbytes, "down": slots * dn[0].nbytes}
        sets = []
        for _ in range(16):
            ids = torch.tensor([r.sample(range(n_exp), slots)], device=dev)
            w = torch.rand(1, slots, device=dev)
            x = torch.randn(1, hidden, device=dev).to(torch.bfloat16)
            sets.append(CUDA.moe_steps(x, ids, w, gu, dn))
        # correctness of every plan against the default plan's output first
        plans = [(0, STAGE_AUTO)] + [(s, st) for st in (STAGE_CHUNK, STAGE_WHOLE) for s in (0, *tune_splits(st))] + \
            [(s, st) for st in (4, 5) for s in (0, *tune_splits(st))]
        ref = []
        for st in sets[:2]:
            for _, launch, *_ in st.launches:
                assert launch(0, STAGE_AUTO) == 0
            ref.append(st.y.float().clone())
        for plan in plans:
            for i, st in enumerate(sets[:2]):
                for _, launch, *_ in st.launches:
                    assert launch(*plan) == 0
                err = float((st.y.float() - ref[i]).norm() / ref[i].norm())
                if not err < 1e-2:
                    fails += 1
                    print(f"MISMATCH {name} plan {plan}: {err:.3g}")
        print(f"\n{name}: gate_up {step_bytes['gate_up'] / 1e6:.1f} MB, down {step_bytes['down'] / 1e6:.1f} MB")
        for k, step in enumerate(("gate_up", "down")):
            rows = []
            for plan in plans:
                fns = [lambda st=st, plan=plan: st.launches[k][1](*plan) for st in sets]
                t = time_calls(fns, reps=64, warmup=16)["us"]
                rows.append((t, plan))
            rows.sort()
            for t, (s, stg) in rows[:8]:
                gbs = step_bytes[step] / (t * 1e-6) / 1e9
                print(f"  {step:>7} splits={s} {STAGE_NAMES[stg]:>9}: {t:6.1f} us  {gbs:5.0f} GB/s  {100 * gbs / copy:5.1f}%")
            auto = [t for t, p in rows if p == (0, STAGE_AUTO)][0]
            wg = min((t, p) for t, p in rows if p[1] in (STAGE_CHUNK, STAGE_WHOLE))
            gv = min((t, p) for t, p in rows if p[1] in (4, 5))
            print(f"  {step:>7} launcher's own plan (auto): {auto:.1f} us; best wgemm {wg[0]:.1f} us "
                  f"{STAGE_NAMES[wg[1][1]]}/{wg[1][0]}; best GEMV {gv[0]:.1f} us {STAGE_NAMES[gv[1][1]]}/{gv[1][0]}")
        del gu, dn, sets
        torch.cuda.empty_cache()
    print(f"\nprobe_moe: {fails} mismatches")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "int4"))
