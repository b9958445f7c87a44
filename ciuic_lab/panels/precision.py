"""Precision map: blocks x site kinds, coloured by bits; select cells, set bits, scheme, group, layout
and kernel; presets; live totals.

Cells are picked with the mouse (click one, or box-select several: the plotly ``on_click`` and
``on_selection`` callbacks of a marker layer drawn over the heatmap) or with plain controls (block
and kind drop-downs, a glob on site names or kinds), so every edit is possible without a pointer.
"""

from __future__ import annotations

import html
from typing import Any, Callable

import ipywidgets as widgets
import plotly.graph_objects as go

from ..session import CiuicError, Session
from .base import Panel, Scheduler, fmt

UNCHANGED = "unchanged"
ALL = "all"  # a drop-down value of its own: ipywidgets shows no label for a None value

#: bits -> colour; positions are (bits - 2) / 14 so that 16 (kept) sits at the end, in grey
BITS_COLORSCALE = [
    [0.0, "#c51b1b"], [1 / 14, "#f46d43"], [2 / 14, "#fdcf58"], [3 / 14, "#d9ef8b"],
    [4 / 14, "#91cf60"], [6 / 14, "#1a9850"], [10 / 14, "#8fb9a8"], [1.0, "#c8c8c8"],
]


class PrecisionMap(Panel):
    """Blocks x kinds, coloured by bits; set the selected sites' config."""

    title = "Precision map"

    def __init__(self, session: Session, scheduler: Scheduler | None = None):
        super().__init__(session, scheduler)
        opts = session.options()
        self._pick: list[str] | None = None
        self._pick_idx: set[int] = set()
        self._pick_label = ""
        self._cells: list[tuple[str, str, list[str]]] = []
        self._listeners: list[Callable[[list[str]], None]] = []

        self.experts = widgets.Checkbox(value=False, description="experts as rows", indent=False,
                                        layout=widgets.Layout(width="auto"))
        self.block = widgets.Dropdown(options=[("all blocks", ALL)] + [(f"block {b}", b) for b in session.blocks()],
                                      value=ALL, description="block", layout=widgets.Layout(width="190px"))
        self.kind = widgets.Dropdown(options=[("all kinds", ALL)] + [(k, k) for k in session.kinds()], value=ALL,
                                     description="kind", layout=widgets.Layout(width="250px"))
        self.glob = widgets.Text(value="", placeholder="site name or glob: attn.*, model.layers.1.mlp.experts.*",
                                 description="sites", continuous_update=False, layout=widgets.Layout(width="440px"))
        self.selection = widgets.HTML(value="")
        self.selection.add_class("ciuic-selection")
        self.kind.add_class("ciuic-kind")
        self.block.add_class("ciuic-block")
        self.glob.add_class("ciuic-glob")

        bits = [(str(b), b) for b in opts["bits"] if isinstance(b, int) and b != 16] + \
               [("fp8", "fp8_e4m3"), ("16 (keep)", 16), (UNCHANGED, UNCHANGED)]
        self.bits = widgets.Dropdown(options=bits, value=4, description="bits", layout=widgets.Layout(width="170px"))
        self.scheme = widgets.Dropdown(options=[UNCHANGED] + opts["schemes"], value=UNCHANGED, description="scheme",
                                       layout=widgets.Layout(width="190px"))
        self.group = widgets.Dropdown(options=[(UNCHANGED, UNCHANGED)] + [(str(g), g) for g in opts["groups"]],
                                      value=UNCHANGED, description="group", layout=widgets.Layout(width="190px"))
        self.layout_choice = widgets.Dropdown(options=[UNCHANGED] + opts["layouts"], value=UNCHANGED,
                                              description="layout", layout=widgets.Layout(width="220px"))
        self.kernel = widgets.Dropdown(options=[UNCHANGED] + opts["kernels"], value=UNCHANGED, description="kernel",
                                       layout=widgets.Layout(width="190px"))
        self.bits.add_class("ciuic-bits")
        self.apply_button = widgets.Button(description="Set selection", button_style="primary", icon="check",
                                           tooltip="apply bits, scheme, group, layout and kernel to the selected sites")
        self.apply_button.add_class("ciuic-apply")
        self.preset = widgets.Dropdown(options=opts["presets"], value="mixed" if "mixed" in opts["presets"] else None,
                                       description="preset", layout=widgets.Layout(width="220px"))
        self.preset_button = widgets.Button(description="Load preset", tooltip="resolve the preset on every site")
        self.reset_button = widgets.Button(description="As loaded", tooltip="nothing quantized")
        self.totals = widgets.HTML(value="")
        self.totals.add_class("ciuic-totals")

        self.fig = go.FigureWidget(
            data=[
                go.Heatmap(z=[[None]], x=["0"], y=["-"], colorscale=BITS_COLORSCALE, zmin=2, zmax=16, xgap=2, ygap=2,
                           texttemplate="%{text}", text=[[""]], hoverinfo="skip",
                           colorbar=dict(title="bits", tickvals=[2, 3, 4, 5, 6, 8, 16],
                                         ticktext=["2", "3", "4", "5", "6", "8", "keep"], thickness=12)),
                go.Scatter(x=[], y=[], mode="markers", hovertemplate="%{hovertext}<extra></extra>", hovertext=[],
                           marker=dict(symbol="square", size=22, color="rgba(0,0,0,0)",
                                       line=dict(width=0, color="#111")),
                           selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)),
                           showlegend=False),
            ],
            layout=go.Layout(margin=dict(l=130, r=10, t=28, b=30), height=480, width=560, dragmode="select",
                             title=dict(text="bits per site (click a cell, or drag a box)", font=dict(size=13)),
                             xaxis=dict(type="category", title="block", side="top"),
                             yaxis=dict(type="category", autorange="reversed"), clickmode="event"),
        )
        marker_layer = self.fig.data[1]
        marker_layer.on_click(self._on_click)
        marker_layer.on_selection(self._on_selection)

        for w in (self.block, self.kind, self.glob):
            w.observe(self._on_filter, names="value")
        self.experts.observe(lambda _: (self._clear_pick(), self.refresh()), names="value")
        self.apply_button.on_click(lambda _: self.apply())
        self.preset_button.on_click(lambda _: self.load_preset())
        self.reset_button.on_click(lambda _: self.run(self.session.reset, self._buttons()))

        edit = widgets.HBox([self.bits, self.scheme, self.group], layout=widgets.Layout(flex_flow="row wrap"))
        edit2 = widgets.HBox([self.layout_choice, self.kernel, self.apply_button],
                             layout=widgets.Layout(flex_flow="row wrap"))
        pick = widgets.HBox([self.block, self.kind, self.experts], layout=widgets.Layout(flex_flow="row wrap"))
        presets = widgets.HBox([self.preset, self.preset_button, self.reset_button])
        self.widget = widgets.VBox([
            widgets.HTML(f"<b>{self.title}</b>"), self.totals, widgets.Box([self.fig]), pick, self.glob,
            self.selection, edit, edit2, presets, self.footer(),
        ], layout=widgets.Layout(width="600px"))
        self.widget.add_class("ciuic-precision")
        session.observe(self.refresh)
        self.refresh()
        self._update_selection()

    # ------------------------------------------------------------------ selection
    def on_pick(self, callback: Callable[[list[str]], None]) -> None:
        """Call ``callback(site_names)`` whenever the selection changes."""
        self._listeners.append(callback)

    def _buttons(self) -> list[widgets.Widget]:
        return [self.apply_button, self.preset_button, self.reset_button]

    def _clear_pick(self) -> None:
        self._pick = None
        self._pick_idx = set()
        self._pick_label = ""
        self._highlight([])

    def _on_filter(self, _change: Any = None) -> None:
        self._clear_pick()
        self._update_selection()

    def selected(self) -> list[str]:
        """Site names the next "Set selection" changes (raises CiuicError for a glob that selects nothing)."""
        if self._pick is not None:
            return list(self._pick)
        target = self.glob.value.strip()
        kind = None if self.kind.value == ALL else self.kind.value
        block = None if self.block.value == ALL else self.block.value
        blocks = None if block is None else [block]
        if target:
            names = self.session.select(target, blocks)
            if kind is not None:
                names = [n for n in names if self.session.site(n).kind == kind]
                if not names:
                    raise CiuicError(f"{target!r} selects no site of kind {kind}")
            return names
        return self.session.select(kind or "*", blocks)

    def _update_selection(self) -> None:
        try:
            names = self.selected()
        except CiuicError as e:
            self.selection.value = f'<span style="color:#b00020">{html.escape(str(e))}</span>'
            return
        self.clear_status()
        what = self._pick_label or self._describe_filter()
        one = f": <code>{html.escape(names[0])}</code>" if len(names) == 1 else ""
        self.selection.value = f"selected: {what} &middot; <b>{len(names)}</b> site{'s' if len(names) != 1 else ''}{one}"
        for cb in self._listeners:
            cb(names)

    def _describe_filter(self) -> str:
        parts = []
        if self.glob.value.strip():
            parts.append(f"<code>{html.escape(self.glob.value.strip())}</code>")
        if self.kind.value != ALL:
            parts.append(html.escape(self.kind.value))
        parts.append("all blocks" if self.block.value == ALL else f"block {self.block.value}")
        if not self.glob.value.strip() and self.kind.value == ALL:
            parts.insert(0, "every quantizable site")
        return ", ".join(parts)

    def select_cells(self, cells: list[tuple[str, str]]) -> list[str]:
        """Pick cells by (row, column) labels as the map shows them, e.g. ``("attn.kv_b", "1")``."""
        index = {(r, c): i for i, (r, c, _) in enumerate(self._cells)}
        missing = [rc for rc in cells if rc not in index]
        if missing:
            raise CiuicError(f"no cell {missing[0]!r} in the map; rows are kinds, columns blocks")
        return self._pick_indices([index[rc] for rc in cells])

    def _pick_indices(self, indices: list[int]) -> list[str]:
        indices = [i for i in indices if 0 <= i < len(self._cells)]
        if not indices:
            return []
        names: list[str] = []
        for i in indices:
            names.extend(self._cells[i][2])
        self._pick = names
        self._pick_idx = set(indices)
        if len(indices) == 1:
            r, c, _ = self._cells[indices[0]]
            self._pick_label = f"cell {html.escape(r)} &times; {'block ' + c if c != '-' else 'no block'}"
        else:
            self._pick_label = f"{len(indices)} cells"
        self._highlight(indices)
        self._update_selection()
        return names

    def _on_click(self, trace, points, state) -> None:
        self._pick_indices(list(points.point_inds))

    def _on_selection(self, trace, points, selector) -> None:
        if points.point_inds:
            self._pick_indices(list(points.point_inds))

    def _highlight(self, indices: list[int]) -> None:
        layer = self.fig.data[1]
        widths = [0] * len(self._cells)
        for i in indices:
            if i < len(widths):
                widths[i] = 3
        with self.fig.batch_update():
            layer.marker.line.width = widths

    # ------------------------------------------------------------------ edits
    def fields(self) -> dict[str, Any]:
        out = {}
        for key, w in (("bits", self.bits), ("scheme", self.scheme), ("group", self.group),
                       ("layout", self.layout_choice), ("kernel", self.kernel)):
            if w.value != UNCHANGED:
                out[key] = w.value
        return out

    def apply(self) -> None:
        """Set the selected sites to the chosen bits, scheme, group, layout and kernel."""
        def job():
            fields = self.fields()
            if not fields:
                raise CiuicError("nothing to set: choose bits, scheme, group, layout or kernel (all are 'unchanged')")
            return self.session.set(self.selected(), **fields)

        self.run(job, self._buttons())

    def load_preset(self) -> None:
        self.run(lambda: self.session.preset(self.preset.value), self._buttons())

    # ------------------------------------------------------------------ drawing
    def refresh(self, event: str = "plan") -> None:
        if event not in ("plan",):
            return
        s = self.session
        g = s.grid(experts=self.experts.value)
        rows, cols = g["rows"], g["cols"]
        cells, xs, ys, hover = [], [], [], []
        for ri, r in enumerate(rows):
            for ci, c in enumerate(cols):
                names = g["sites"][ri][ci]
                if not names:
                    continue
                cells.append((r, c, names))
                xs.append(c)
                ys.append(r)
                one = names[0] if len(names) == 1 else f"{len(names)} sites"
                hover.append(f"{r} &middot; {'block ' + c if c != '-' else 'no block'}<br>{one}<br>bits: {g['text'][ri][ci]}")
        self._cells = cells
        with self.fig.batch_update():
            hm = self.fig.data[0]
            hm.x, hm.y, hm.z, hm.text = cols, rows, g["bits"], g["text"]
            layer = self.fig.data[1]
            layer.x, layer.y, layer.hovertext = xs, ys, hover
            layer.marker.line.width = [3 if i in self._pick_idx else 0 for i in range(len(xs))]
            self.fig.layout.height = max(260, 22 * len(rows) + 70)
        m, t = s.summary(), s.totals()
        q = m["quantized_bits_per_weight"]
        self.totals.value = (
            f"<b>{fmt(m['bits_per_weight'], '.2f')}</b> bits per weight"
            f"{' (quantized sites ' + fmt(q, '.2f') + ')' if q else ''} &middot; weights "
            f"{fmt(t['mb_before'], '.2f')} MB &rarr; <b>{fmt(m['weight_mb'], '.2f')} MB</b> &middot; "
            f"{t['quantized_sites']} of {t['sites']} sites quantized")

    def close(self) -> None:
        self.session.unobserve(self.refresh)
        self.widget.close()
