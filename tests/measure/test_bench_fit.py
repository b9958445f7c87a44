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
