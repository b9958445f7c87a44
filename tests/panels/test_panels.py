"""Widget logic without a browser: set widget values, press buttons, assert the Session's plan and metrics."""

import warnings

import pytest
from plotly.callbacks import Points

from ciuic_lab.panels import ComparePanel, FusionPanel, InspectorPanel, MachinePanel, PrecisionMap, Workbench
from ciuic_lab.panels import base as panel_base
from ciuic_lab.session import CiuicError, Session

KV_B = "model.layers.1.self_attn.kv_b_proj"


@pytest.fixture(scope="module")
def wb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench = Workbench("tiny-deepseek-random", evalset="tiny")
    bench.compare.full_evalset = "tiny"
    return bench


@pytest.fixture
def clean(wb):
    wb.session.reset()
    pm = wb.precision
    pm.glob.value, pm.kind.value, pm.block.value = "", "all", "all"
    pm.bits.value, pm.scheme.value, pm.group.value = 4, "unchanged", "unchanged"
    pm.layout_choice.value, pm.kernel.value = "unchanged", "unchanged"
    pm._clear_pick()
    for p in (pm, wb.compare, wb.inspector, wb.fusion, wb):
        p.clear_status()
    return wb


def _status(panel):
    return panel.status.value


def test_figure_widgets_build_and_the_layout_composes(clean):
    wb = clean
    assert "ciuic-workbench" in wb.widget._dom_classes
    assert type(wb.precision.fig).__name__ == "FigureWidget" and len(wb.precision.fig.data) == 2
    assert wb.precision.fig.data[0].type == "heatmap"
    bundle = wb._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_glob_and_bits_then_set_changes_that_site_and_the_metrics(clean):
    wb = clean
    pm, s = wb.precision, wb.session
    table_before, totals_before = wb.compare.metrics.value, pm.totals.value
    pm.glob.value = KV_B
    assert "<b>1</b> site" in pm.selection.value
    pm.bits.value = 2
    pm.group.value = 64
    pm.apply_button.click()
    assert _status(pm) == "" and pm.last_error is None
    spec = s.plan.configs[KV_B].spec
    assert (spec.bits, spec.group) == (2, 64) and s.plan.quantized() == [KV_B]
    assert s.report["kl"] > 0
    assert wb.compare.metrics.value != table_before and pm.totals.value != totals_before
    hm = pm.fig.data[0]
    r, c = list(hm.y).index("attn.kv_b"), list(hm.x).index("1")
    assert hm.z[r][c] == 2 and hm.text[r][c] == "2"
    assert not wb.undo_button.disabled and wb.redo_button.disabled
    wb.undo_button.click()
    assert s.plan.quantized() == [] and not wb.redo_button.disabled
    wb.redo_button.click()
    assert s.plan.quantized() == [KV_B]


def test_kind_and_block_dropdowns_select_without_a_mouse(clean):
    pm, s = clean.precision, clean.session
    pm.kind.value = "moe.expert.down"
    pm.block.value = 2
    assert pm.selected() == s.select("moe.expert.down", blocks=[2]) and "<b>8</b> sites" in pm.selection.value
    pm.bits.value = 3
    pm.apply_button.click()
    assert set(s.plan.quantized()) == set(s.select("moe.expert.down", blocks=[2]))


def test_click_and_box_select_pick_cells(clean):
    pm, s = clean.precision, clean.session
    cells = pm._cells
    i = next(k for k, (r, c, _) in enumerate(cells) if (r, c) == ("attn.q_a", "0"))
    pm._on_click(pm.fig.data[1], Points(point_inds=[i]), None)
    assert pm.selected() == ["model.layers.0.self_attn.q_a_proj"]
    assert pm.fig.data[1].marker.line.width[i] == 3
    j = next(k for k, (r, c, _) in enumerate(cells) if (r, c) == ("attn.o", "2"))
    pm._on_selection(pm.fig.data[1], Points(point_inds=[i, j]), None)
    assert pm.selected() == ["model.layers.0.self_attn.q_a_proj", "model.layers.2.self_attn.o_proj"]
    pm.bits.value = 8
    pm.scheme.value = "sym"
    pm.apply_button.click()
    assert set(s.plan.quantized()) == {"model.layers.0.self_attn.q_a_proj", "model.layers.2.self_attn.o_proj"}
    assert s.plan.configs["model.layers.2.self_attn.o_proj"].spec.scheme == "sym"
    # the pick survives the redraw after the change; a filter change clears it
    assert pm.selected() == ["model.layers.0.self_attn.q_a_proj", "model.layers.2.self_attn.o_proj"]
    pm.kind.value = "attn.kv_b"
    assert len(pm.selected()) == 3
    pm.select_cells([("head", "-")])
    assert pm.selected() == ["lm_head"]
    with pytest.raises(CiuicError, match="no cell"):
        pm.select_cells([("attn.q_a", "9")])


def test_experts_as_rows(clean):
    pm = clean.precision
    pm.experts.value = True
    try:
        assert "moe.expert.gate_up[5]" in list(pm.fig.data[0].y)
        names = pm.select_cells([("moe.expert.gate_up[5]", "1")])
        assert names == ["model.layers.1.mlp.experts.gate_up_proj[5]"]
        pm.bits.value = 2
        pm.apply_button.click()
        assert clean.session.plan.quantized() == names
    finally:
        pm.experts.value = False


@pytest.mark.parametrize("setup, match", [
    (lambda pm: setattr(pm.glob, "value", "nothing.matches*"), "selects no site"),
    (lambda pm: (setattr(pm.glob, "value", KV_B), setattr(pm.group, "value", 256)), "group 256 does not divide"),
    (lambda pm: (setattr(pm.glob, "value", KV_B), setattr(pm.bits, "value", "unchanged")), "nothing to set"),
])
def test_errors_are_one_line_in_the_panel_and_change_nothing(clean, setup, match):
    pm, s = clean.precision, clean.session
    before, index = s.plan, s.current.index
    setup(pm)
    pm.apply_button.click()
    assert match in pm.last_error and "Traceback" not in pm.status.value and "\n" not in pm.last_error
    assert "&#9888;" in pm.status.value
    assert s.plan is before and s.current.index == index
    assert not pm.apply_button.disabled  # buttons come back after a failure


def test_internal_errors_are_shown_too(clean, monkeypatch):
    pm, s = clean.precision, clean.session

    def boom(*a, **k):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(s, "set", boom)
    pm.glob.value = KV_B
    pm.apply_button.click()
    assert pm.last_error == "internal error: RuntimeError: kernel exploded"


def test_presets_and_reset(clean):
    pm, s = clean.precision, clean.session
    pm.preset.value = "int8"
    pm.preset_button.click()
    assert s.current.label == "preset int8" and len(s.plan.quantized()) == len(s.select("*"))
    assert "8.1" in pm.totals.value or "quantized sites 8" in pm.totals.value
    pm.reset_button.click()
    assert s.plan.quantized() == []


def test_compare_panel_text_history_pin_restore_measure(clean):
    wb = clean
    cp, s = wb.compare, wb.session
    s.preset("int2-g64")
    first = s.current.index
    s.set(KV_B, bits=8)
    assert "int2" not in cp.metrics.value
    assert "as loaded" in cp.text.value and "now" in cp.text.value
    if s.report["first_divergence"][0] is not None:
        assert "#ffd0d0" in cp.text.value  # differing tokens are highlighted
    cp.history.value = first
    cp.pin_button.click()
    assert f"#{first}" in cp.metrics.value and cp.pinned == first
    cp.unpin_button.click()
    assert cp.pinned is None
    cp.history.value = first
    cp.restore_button.click()
    assert s.plan.configs[KV_B].spec.bits == 2 and s.current.label == f"back to #{first}"
    assert len(cp.errors_fig.data[0].x) == len(s.plan.quantized())
    cp.measure_button.click()
    assert cp.last_error is None and s.summary()["decode_ms"] > 0
    assert "press <i>Measure speed</i>" not in cp.metrics.value
    assert len(cp.ops_fig.data[0].x) > 1
    cp.full_button.click()
    assert "full report on the tiny set" in cp.full.value


def test_fusion_panel_toggles_and_resyncs_on_error(clean, monkeypatch):
    fp, s = clean.fusion, clean.session
    fp.switches["gate_up"].value = True
    assert s.fusions()["gate_up"] and s.plan.recipe.fusions == {"gate_up": True}
    fp.kv_cache.value = "latent"
    assert s.plan.recipe.kv_cache == "latent"

    def refuse(**kw):
        raise CiuicError("fusion mla_absorb needs kv_cache latent")

    monkeypatch.setattr(s, "set_fusions", refuse)
    fp.switches["mla_absorb"].value = True
    assert fp.last_error == "fusion mla_absorb needs kv_cache latent"
    assert fp.switches["mla_absorb"].value is False  # the toggle shows the session's state again
    monkeypatch.undo()
    s.set(KV_B, bits=4)
    fp.layout_choice.value = fp.layout_choice.options[-1]
    fp.layout_button.click()
    assert fp.last_error is None and s.plan.configs[KV_B].layout == fp.layout_choice.options[-1]


def test_inspector_follows_its_controls_and_uses_the_choice(clean):
    ip, s = clean.inspector, clean.session
    ip.show(KV_B)
    assert ip.data["site"] == KV_B and ip.group.options
    ip.bits.value = 3
    assert ip.data["spec"]["bits"] == 3 and len(ip.fig.data[2].x) == 3 * 8  # 8 grid lines
    ip.group.value = 64
    ip.group_index.value = 7
    assert ip.data["group_index"] == 7 and ip.data["group_size"] == 64
    assert ip.group_index.max == ip.data["groups"] - 1
    ip.scheme.value = "sym"
    assert ip.data["zero"] == 4
    ip.use_button.click()
    spec = s.plan.configs[KV_B].spec
    assert (spec.bits, spec.group, spec.scheme) == (3, 64, "sym")
    assert "now: <b>int3 g64 sym</b>" in ip.info.value


def test_selecting_a_cell_shows_it_in_the_inspector(clean):
    pm, ip = clean.precision, clean.inspector
    pm.select_cells([("attn.o", "2")])
    assert ip.site.value == "model.layers.2.self_attn.o_proj"


def test_machine_panel_lists_backends_and_sites(clean):
    mp, s = clean.machine, clean.session
    s.set(KV_B, bits=4)
    assert "Kernel backends" in mp.info.value and "torch" in mp.info.value
    assert "model.layers.1.self_attn.kv_b_proj" in mp.info.value


def test_export_recipe(clean, tmp_path):
    wb = clean
    wb.session.set(KV_B, bits=3)
    wb.recipe_path.value = str(tmp_path / "plan.json")
    wb.export_button.click()
    assert (tmp_path / "plan.json").exists() and "recipe written" in wb.status.value
    wb.recipe_path.value = str(tmp_path / "nope" / "plan.json")
    wb.export_button.click()
    assert "does not exist" in wb.last_error


def test_scheduler_is_injectable_and_buttons_wait_for_the_job():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = Session("tiny-deepseek-random", evalset="tiny")
    jobs = []
    pm = PrecisionMap(s, scheduler=jobs.append)
    pm.glob.value = KV_B
    pm.bits.value = 3
    pm.apply_button.click()
    assert len(jobs) == 1 and s.plan.quantized() == []  # nothing ran yet
    jobs.pop()()
    assert s.plan.quantized() == [KV_B]
    pm.close()


def test_progress_bar_shows_during_slow_jobs(clean, monkeypatch):
    monkeypatch.setattr(panel_base, "PROGRESS_AFTER_S", 0.0)
    pm, s = clean.precision, clean.session
    seen = []

    def slow():
        s._note(0.5, "halfway")
        seen.append((pm.progress.layout.display, pm.progress.value, pm.progress_label.value, pm.apply_button.disabled))

    pm.run(slow, [pm.apply_button])
    assert seen == [("", 0.5, "halfway", True)]
    assert pm.progress.layout.display == "none" and not pm.apply_button.disabled


def test_standalone_panels(clean):
    s = clean.session
    panels = [ComparePanel(s), FusionPanel(s), InspectorPanel(s, site=KV_B), MachinePanel(s)]
    for p in panels:
        assert p.widget is not None
        p.close()
    with pytest.raises(CiuicError, match="needs a ciuic_lab Session"):
        ComparePanel("not a session")
