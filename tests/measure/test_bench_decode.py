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


def test_prefill_bench_times_the_plan_against_the_model_as_loaded(capsys):
    """``bench prefill``: one row per model with the as-loaded time before and after the plan, the
    dtype asked for, the ratio in the same run; a GPU device is refused with what is accepted."""
    from ciuic_lab.cli import main
    from ciuic_lab.measure.bench_decode import bench_prefill

    out = bench_prefill(model="tiny-deepseek-random", quick=True, dtype="bf16", tokens=40)
    assert out["recipe"] == "int4-g128-fused" and out["tokens"] == 40 and len(out["rows"]) == 2
    for r in out["rows"]:
        assert r["dtype"] == "bfloat16"
        assert r["plan_ms"] > 0 and r["as_loaded_ms"] > 0 and r["as_loaded_again_ms"] > 0
        assert r["plan_time_vs_as_loaded"] == pytest.approx(
            r["plan_ms"] / ((r["as_loaded_ms"] + r["as_loaded_again_ms"]) / 2), rel=1e-2)
    assert main(["bench", "prefill", "--device", "cuda"]) != 0
    assert "bench prefill runs on the CPU" in capsys.readouterr().err
