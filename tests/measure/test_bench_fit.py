"""The launch-cost fit of the GPU kernel benchmark (pure arithmetic; runs without a GPU)."""

from __future__ import annotations

import random

import pytest

from ciuic_lab.measure.bench_cuda import fit_line


def test_fit_recovers_fixed_cost_and_rate_from_noisy_points():
    rng = random.Random(5)
    fixed, rate = rng.uniform(1, 8), rng.uniform(500, 4000)  # us, GB/s
    sizes = sorted(rng.sample(range(10_000_000, 300_000_000), 5))
    pts = [(b, fixed + b / rate / 1e3 + rng.gauss(0, 0.01)) for b in sizes]
    f, r = fit_line(pts)
    assert f == pytest.approx(fixed, abs=0.1)
    assert r == pytest.approx(rate, rel=0.01)


def test_fit_refuses_a_single_size():
    with pytest.raises(ValueError, match="two or more distinct sizes"):
        fit_line([(1e6, 3.0), (1e6, 3.1)])


def test_isolated_ceiling_is_the_streaming_time_over_floor_plus_streaming_time():
    from ciuic_lab.measure.bench_cuda import isolated_ceiling_pct

    # int4 g128 7168->18432 (69.2 MB) at 3022 GB/s streams in 22.9 us; a 3.9 us empty launch: 85.44%
    assert isolated_ceiling_pct(69_156_864, 3022.0, 3.9) == pytest.approx(85.44, abs=0.01)
    assert isolated_ceiling_pct(69_156_864, 3022.0, 0.0) == pytest.approx(100.0)
    # the ceiling rises with the bytes a launch moves: a fixed floor weighs less on a larger weight
    small, large = (isolated_ceiling_pct(b, 3000.0, 4.0) for b in (10_000_000, 300_000_000))
    assert small < large < 100.0
