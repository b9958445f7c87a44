"""Weight inspector: one site's weights with the quantization grid drawn over them, and the error
against bits -- the picture that shows what quantization does.

Left: the histogram of one group of weights (the values that share one scale and zero point), the
grid of values that group can store (dotted lines), and where the weights land (orange bars: how many
weights each grid level receives). Right: the relative error of the whole weight at every bit width
for the chosen scheme and group, with the chosen width marked.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..session import Session
from .base import Panel, Scheduler, fmt

INSPECT_BITS = [2, 3, 4, 5, 6, 8]


class InspectorPanel(Panel):
    """One site's weight histogram, its quantization grid, and its error against bits."""

    title = "Weight inspector"

    def __init__(self, session: Session, scheduler: Scheduler | None = None, site: str | None = None):
        super().__init__(session, scheduler)
        names = [s.name for s in session.sites]
        first = site or next((s.name for s in session.sites if not s.keep_default), names[0])
        self.site = widgets.Dropdown(options=names, value=first, description="site",
                                     layout=widgets.Layout(width="520px"))
        self.bits = widgets.SelectionSlider(options=INSPECT_BITS, value=4, description="bits",
                                            continuous_update=False)
        self.scheme = widgets.ToggleButtons(options=["asym", "sym"], value="asym", description="scheme",
                                            style={"button_width": "60px"})
        self.group = widgets.Dropdown(options=[], description="group", layout=widgets.Layout(width="190px"))
        self.group_index = widgets.IntSlider(value=0, min=0, max=0, description="group #", continuous_update=False,
                                             layout=widgets.Layout(width="420px"))
        self.info = widgets.HTML(value="")
        self.info.add_class("ciuic-inspector-info")
        self.use_button = widgets.Button(description="Use for this site", tooltip="set this site to these bits, "
                                                                                 "scheme and group")
        self.data: dict[str, Any] | None = None
        self._quiet = False

        fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.1,
                            subplot_titles=("one group of weights and its grid", "error against bits"))
        self.fig = go.FigureWidget(fig)
        self.fig.add_bar(x=[], y=[], name="weights", marker_color="#9e9e9e", row=1, col=1)
        self.fig.add_bar(x=[], y=[], name="after quantization", marker_color="#f58518", row=1, col=1)
        self.fig.add_scatter(x=[], y=[], mode="lines", name="grid", line=dict(color="#333", width=1, dash="dot"),
                             hoverinfo="skip", row=1, col=1)
        self.fig.add_scatter(x=[], y=[], mode="lines+markers", name="error", line=dict(color="#4c78a8"),
                             row=1, col=2)
        self.fig.add_scatter(x=[], y=[], mode="markers", name="chosen", marker=dict(size=13, color="#e45756"),
                             row=1, col=2)
        self.fig.update_layout(height=330, width=900, barmode="overlay", margin=dict(l=50, r=10, t=40, b=40),
                               legend=dict(orientation="h", y=-0.18))
        self.fig.update_yaxes(title_text="weights", row=1, col=1)
        self.fig.update_yaxes(type="log", title_text="relative error", row=1, col=2)
        self.fig.update_xaxes(title_text="bits", row=1, col=2, dtick=1)
        self.fig.update_xaxes(title_text="weight value", row=1, col=1)

        self.site.observe(self._on_site, names="value")
        for w in (self.bits, self.scheme, self.group, self.group_index):
            w.observe(self._on_change, names="value")
        self.use_button.on_click(lambda _: self.use())
        self.widget = widgets.VBox([
            widgets.HTML(f"<b>{self.title}</b>"), self.site,
            widgets.HBox([self.bits, self.group]), self.scheme, self.group_index,
            widgets.Box([self.fig]), self.info, self.use_button, self.footer(),
        ])
        self.widget.add_class("ciuic-inspector")
        session.observe(self.refresh)
        self._set_groups()
        self.update()

    # ------------------------------------------------------------------ actions
    def show(self, site: str) -> None:
        """Inspect ``site`` (a name from ``session.sites``)."""
        if site in self.site.options:
            self.site.value = site

    def _on_site(self, _change: Any) -> None:
        self._set_groups()
        self.update()

    def _on_change(self, _change: Any) -> None:
        if not self._quiet:
            self.update()

    def _set_groups(self) -> None:
        choices = self.session.group_choices(self.site.value)
        keep = self.group.value
        self._quiet = True
        try:
            self.group.options = [(str(g), g) for g in choices]
            self.group.value = keep if keep in choices else (128 if 128 in choices else choices[0])
            self.group_index.value = 0
        finally:
            self._quiet = False

    def update(self) -> None:
        """Recompute the view (the session does the maths)."""
        def job():
            return self.session.inspect(self.site.value, bits=self.bits.value, scheme=self.scheme.value,
                                        group=self.group.value, group_index=self.group_index.value)

        self.run(job, [self.use_button], then=self._draw)

    def use(self) -> None:
        self.run(lambda: self.session.set(self.site.value, bits=self.bits.value, scheme=self.scheme.value,
                                          group=self.group.value), [self.use_button])

    # ------------------------------------------------------------------ drawing
    def _draw(self, d: dict[str, Any]) -> None:
        self.data = d
        self._quiet = True
        try:
            self.group_index.max = max(d["groups"] - 1, 0)
        finally:
            self._quiet = False
        counts, edges = d["group_hist"]["counts"], d["group_hist"]["edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        width = (edges[1] - edges[0]) if len(edges) > 1 else 1.0
        top = max(counts + d["level_counts"] + [1])
        gx, gy = [], []
        for v in d["grid"]:
            gx += [v, v, None]
            gy += [0, top, None]
        bits = sorted(int(b) for b in d["error_curve"])
        errs = [d["error_curve"][b]["rel_error"] for b in bits]
        chosen = d["spec"]["bits"]
        bar_w = (d["scale"] * 0.35) if d["zero"] is not None else width * 0.5
        with self.fig.batch_update():
            self.fig.data[0].x, self.fig.data[0].y, self.fig.data[0].width = centers, counts, width
            self.fig.data[1].x, self.fig.data[1].y, self.fig.data[1].width = d["levels"], d["level_counts"], bar_w
            self.fig.data[2].x, self.fig.data[2].y = gx, gy
            self.fig.data[3].x, self.fig.data[3].y = bits, errs
            self.fig.data[4].x = [chosen] if chosen in d["error_curve"] else []
            self.fig.data[4].y = [d["error_curve"][chosen]["rel_error"]] if chosen in d["error_curve"] else []
        zero = "" if d["zero"] is None else f", zero point <b>{d['zero']}</b>"
        self.info.value = (
            f"<code>{html.escape(d['site'])}</code> ({html.escape(d['kind'])}, {' x '.join(map(str, d['shape']))}) "
            f"&middot; now: <b>{html.escape(d['current'])}</b><br>"
            f"{html.escape(d['label'])}: group {d['group_index']} of {d['groups']} (row {d['row']}, "
            f"{d['group_size']} weights), step (scale) <b>{d['scale']:.4g}</b>{zero}, {len(d['grid'])} grid values; "
            f"error of this group {fmt(d['group_error'], '.4f')}, of the whole weight <b>{fmt(d['rel_error'], '.4f')}</b>; "
            f"{fmt(d['bits_per_weight'], '.3f')} bits per weight stored (scales and zero points included)")

    def refresh(self, event: str = "plan") -> None:
        if event == "plan" and self.data is not None:
            cur = self.session.plan.configs[self.data["site"]].spec.label()
            if cur != self.data["current"]:
                self.update()

    def close(self) -> None:
        self.session.unobserve(self.refresh)
        self.widget.close()
