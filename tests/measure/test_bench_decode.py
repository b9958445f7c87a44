"""``ciuic-lab bench decode --device cpu``: its default plan, its rows and its errors (quick runs)."""

from __future__ import annotations

import pytest

from ciuic_lab.errors import RecipeError
from ciuic_lab.measure.bench_decode import DECODE_RECIPE, bench_decode
from ciuic_lab.recipe import FUSIONS, load


def test_default_plan_is_int4_g128_with_every_fusion():
    rec = load(DECODE_RECIPE)
    assert rec.name == "int4-g128-fused"
    assert {f for f, on in rec.fusions.items() if on} == set(FUSIONS)
    assert [r.to_dict() for r in rec.rules] == [r.to_dict() for r in load("int4-g128").rules]


@pytest.mark.slow
def test_quick_run_times_every_row_on_both_models():
    """The default (fused) plan on the embedded model and the small DeepSeek-V3-architecture one: fp32,
    the plan and bf16 for each, the plan on the Numba kernels, ratios taken in the same run."""
    out = bench_decode(model="tiny-deepseek-random", quick=True, new_tokens=3, rounds=1)
    assert out["recipe"] == "int4-g128-fused" and out["device"] == "cpu"
    models = {r["model"] for r in out["rows"]}
    assert len(models) == 2
    for m in models:
        rows = {r["variant"]: r for r in out["rows"] if r["model"] == m}
        assert set(rows) == {"torch fp32", "plan int4-g128-fused", "torch bf16"}
        for r in rows.values():
            assert r["tokens_per_s"] > 0 and r["speedup_vs_fp32"] > 0
        plan = rows["plan int4-g128-fused"]
        assert "numba" in plan["backends"], plan["backends"]


def test_a_bad_recipe_is_refused_before_anything_is_timed():
    with pytest.raises(RecipeError, match="unknown recipe"):
        bench_decode(model="tiny-deepseek-random", quick=True, recipe="int5-nonsense", large=False)
