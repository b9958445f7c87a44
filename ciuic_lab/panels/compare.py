"""Compare: baseline and current text side by side, a metrics table with deltas, per-site error bars
and time per op kind; any earlier state can be pinned next to the current one or brought back."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from ..session import Session, baseline_metrics, summarize
from .base import Panel, Scheduler, fmt, html_table

KIND_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6",
               "#9d755d", "#bab0ac", "#1f77b4", "#2ca02c"]

# (key, label, format, better) -- better: +1 higher is better, -1 lower is better, 0 neutral
ROWS = [
    ("kl", "KL(as loaded &#8214; now), mean", ".5f", -1),
    ("top1_agreement", "top-1 agreement", ".3f", +1),
    ("perplexity", "perplexity (held-out)", ".3f", -1),
    ("bits_per_weight", "bits per weight (all sites)", ".2f", -1),
    ("weight_mb", "weights (MB)", ".2f", -1),
    ("prefill_ms", "prefill (ms)", ".1f", -1),
    ("decode_ms", "decode (ms per token)", ".2f", -1),
    ("tokens_per_s", "decode tokens/s", ".1f", +1),
]


def _delta(now: Any, before: Any, spec: str, better: int, relative: bool = False) -> str:
    if not isinstance(now, (int, float)) or not isinstance(before, (int, float)):
        return "&ndash;"
    d = now - before
    if relative and before:
        text = f"{100 * d / before:+.1f}%"
    else:
        text = format(d, "+" + spec)
    if abs(d) < 1e-12 or better == 0:
        color = "#555"
    else:
        color = "#1a7f37" if (d > 0) == (better > 0) else "#b00020"
    return f'<span style="color:{color}">{text}</span>'


class ComparePanel(Panel):
    """What changed, against the model as loaded (and, pinned, against any earlier state)."""

    title = "Compare"

    def __init__(self, session: Session, scheduler: Scheduler | None = None):
        super().__init__(session, scheduler)
        self.pinned: int | None = None
        self.full_evalset = "standard"
        self.metrics = widgets.HTML(value="")
        self.metrics.add_class("ciuic-metrics")
        self.text = widgets.HTML(value="")
        self.text.add_class("ciuic-text")
        self.history = widgets.Dropdown(options=[], description="state", layout=widgets.Layout(width="360px"))
        self.pin_button = widgets.Button(description="Compare with", tooltip="add this state's numbers to the table")
        self.unpin_button = widgets.Button(description="Unpin", tooltip="remove the pinned column")
        self.restore_button = widgets.Button(description="Go back to it", tooltip="make that state current again")
        self.measure_button = widgets.Button(description="Measure speed", icon="clock-o",
                                             tooltip="time prefill and decode, as loaded and now")
        self.measure_button.add_class("ciuic-measure")
        self.full_button = widgets.Button(description="Full report", tooltip="the standard evaluation set: 8 prompts, "
                                                                             "2048 held-out tokens, with timing")
        self.full = widgets.HTML(value="")
        self.full.add_class("ciuic-full-report")

        self.errors_fig = go.FigureWidget(
            data=[go.Bar(x=[], y=[], marker=dict(color=[]), hovertext=[], hovertemplate="%{hovertext}<br>"
                                                                                        "error %{y:.4f}<extra></extra>")],
            layout=go.Layout(height=300, width=620, margin=dict(l=50, r=10, t=34, b=80),
                             title=dict(text="relative output error per quantized site", font=dict(size=13)),
                             yaxis=dict(type="log", title="||x(Wq-W)|| / ||xW||"), xaxis=dict(tickangle=-60)))
        self.ops_fig = go.FigureWidget(
            data=[go.Bar(name="as loaded", x=[], y=[], marker_color="#9e9e9e"),
                  go.Bar(name="now", x=[], y=[], marker_color="#4c78a8")],
            layout=go.Layout(height=300, width=560, barmode="group", margin=dict(l=50, r=10, t=34, b=80),
                             title=dict(text="time per op kind (ms per decode step) - press Measure speed",
                                        font=dict(size=13)), yaxis=dict(title="ms"), xaxis=dict(tickangle=-60)))

        self.pin_button.on_click(lambda _: self.pin(self.history.value))
        self.unpin_button.on_click(lambda _: self.pin(None))
        self.restore_button.on_click(lambda _: self.run(lambda: self.session.restore(self.history.value),
                                                        self._buttons()))
        self.measure_button.on_click(lambda _: self.measure())
        self.full_button.on_click(lambda _: self.full_report())

        hist = widgets.HBox([self.history, self.pin_button, self.unpin_button, self.restore_button],
                            layout=widgets.Layout(flex_flow="row wrap"))
        self.top = widgets.VBox([
            widgets.HTML(f"<b>{self.title}</b>"), self.metrics, widgets.HBox([self.measure_button, self.full_button]),
            self.full, hist, self.text, self.footer(),
        ], layout=widgets.Layout(width="640px"))
        self.charts = widgets.HBox([widgets.Box([self.errors_fig]), widgets.Box([self.ops_fig])],
                                   layout=widgets.Layout(flex_flow="row wrap"))
        self.widget = widgets.VBox([self.top, self.charts])
        self.widget.add_class("ciuic-compare")
        session.observe(self.refresh)
        self.refresh()

    def _buttons(self) -> list[widgets.Widget]:
        return [self.measure_button, self.full_button, self.restore_button, self.pin_button]

    # ------------------------------------------------------------------ actions
    def pin(self, index: int | None) -> None:
        """Show state ``index`` next to the current one (``None`` removes it)."""
        def job():
            if index is not None:
                self.session.entry(index)  # raises for a state no longer kept
            self.pinned = index
            self.refresh("plan")

        self.run(job)

    def measure(self) -> None:
        self.run(self.session.measure, self._buttons())

    def full_report(self) -> None:
        def show(rep: dict[str, Any]) -> None:
            lat, p = rep["latency_ms"], rep["perplexity"]
            rows = [
                ["KL, mean", "0", fmt(rep["kl"], ".5f")],
                ["top-1 agreement", "1.000", fmt(rep["top1_agreement"])],
                ["perplexity", fmt(p["before"]), f"{fmt(p['after'])} ({100 * p['change']:+.2f}%)"],
                [f"prefill {lat['prefill']['tokens']} tokens (ms)", fmt(lat["prefill"]["before"], ".1f"),
                 fmt(lat["prefill"]["after"], ".1f")],
                ["decode (ms per token)", fmt(lat["decode"]["before"], ".2f"), fmt(lat["decode"]["after"], ".2f")],
                ["same text", "", f"{rep['same_text']} of {len(rep['text']['prompts'])} prompts"],
            ]
            es = rep["evalset"]
            self.full.value = (f"<div style='margin:4px 0'><i>full report on the {es['name']} set "
                               f"({es['heldout_positions']} scored positions, {es['prompts']} prompts of "
                               f"{es['max_new_tokens']} tokens)</i>" + html_table(["", "as loaded", "now"], rows)
                               + "</div>")

        self.run(lambda: self.session.full_report(self.full_evalset), self._buttons(), then=show)

    # ------------------------------------------------------------------ drawing
    def refresh(self, event: str = "plan") -> None:
        s = self.session
        rep = s.report
        base, now = baseline_metrics(rep), summarize(rep)
        pinned = None
        if self.pinned is not None:
            try:
                pinned = s.entry(self.pinned)
            except Exception:  # noqa: BLE001 - the pinned state fell out of the history
                self.pinned = None
        header = ["", "as loaded", f"now (#{s.current.index})", "&Delta;"]
        if pinned is not None:
            header += [f"#{pinned.index}", "now &minus; #" + str(pinned.index)]
            old = pinned.metrics()
        rows = []
        for key, label, spec, better in ROWS:
            rel = key in ("perplexity", "weight_mb", "decode_ms", "prefill_ms", "tokens_per_s")
            row = [label, fmt(base[key], spec), f"<b>{fmt(now[key], spec)}</b>",
                   _delta(now[key], base[key], spec, better, relative=rel)]
            if pinned is not None:
                row += [fmt(old[key], spec), _delta(now[key], old[key], spec, better, relative=rel)]
            rows.append(row)
        n = len(rep["text"]["prompts"])
        rows.append(["same greedy text", f"{n} of {n}", f"<b>{now['same_text']} of {n}</b>", ""] +
                    (["", ""] if pinned is not None else []))
        note = "" if now["decode_ms"] is not None else \
            "<div style='color:#777;font-size:12px'>latency: press <i>Measure speed</i></div>"
        self.metrics.value = html_table(header, rows) + note
        self._draw_text()
        self._draw_history()
        self._draw_errors()
        self._draw_ops(rep.get("op_ms"))

    def _draw_history(self) -> None:
        s = self.session
        opts = []
        for e in reversed(s.history):
            m = e.metrics()
            opts.append((f"#{e.index} {e.label[:40]} (KL {fmt(m['kl'], '.4f', '-')}, "
                         f"{fmt(m['bits_per_weight'], '.2f', '-')} bpw)", e.index))
        keep = self.history.value
        self.history.options = opts
        if keep in [i for _, i in opts]:
            self.history.value = keep
        elif opts:
            self.history.value = opts[min(1, len(opts) - 1)][1]

    def _draw_text(self) -> None:
        parts = []
        for d in self.session.text_diff():
            div = d["first_divergence"]
            same = "identical" if div is None else f"differs from token {div}"
            before = "".join(_tok(t, hit, "#d6e4ff") for t, hit in zip(d["before"], d["differs_before"]))
            after = "".join(_tok(t, hit, "#ffd0d0") for t, hit in zip(d["after"], d["differs"]))
            prompt = f'<span style="color:#888">{_esc(d["prompt"])}</span>'
            parts.append(
                f'<div style="font-size:12px;color:#555;margin-top:6px">{_esc(d["prompt"][:40])!s} &middot; {same}</div>'
                '<div style="display:flex;gap:8px">'
                f'<div style="flex:1;min-width:0"><div style="font-size:11px;color:#777">as loaded</div>'
                f'<pre style="white-space:pre-wrap;margin:0;padding:4px;background:#fafafa;border:1px solid #eee">'
                f'{prompt}{before}</pre></div>'
                f'<div style="flex:1;min-width:0"><div style="font-size:11px;color:#777">now</div>'
                f'<pre style="white-space:pre-wrap;margin:0;padding:4px;background:#fafafa;border:1px solid #eee">'
                f'{prompt}{after}</pre></div></div>')
        self.text.value = "".join(parts)

    def _draw_errors(self) -> None:
        table = self.session.site_error_table()
        kinds: dict[str, str] = {}
        xs, ys, colors, hover = [], [], [], []
        for r in table:
            color = kinds.setdefault(r["kind"], KIND_COLORS[len(kinds) % len(KIND_COLORS)])
            block = "" if r["block"] is None else f"L{r['block']} "
            kind = r["kind"].split(".", 1)[-1] if r["expert"] is None else f"e{r['expert']}.{r['kind'].rsplit('.', 1)[-1]}"
            xs.append(f"{block}{kind}")
            ys.append(max(r["rel_error"], 1e-9))
            colors.append(color)
            hover.append(f"{r['site']}<br>{r['spec']} ({r['basis']})")
        with self.errors_fig.batch_update():
            bar = self.errors_fig.data[0]
            bar.x, bar.y, bar.hovertext = xs, ys, hover
            bar.marker.color = colors
            self.errors_fig.layout.xaxis.type = "category"
            self.errors_fig.layout.title.text = ("relative output error per quantized site" if xs
                                                 else "relative output error per quantized site (none quantized)")

    def _draw_ops(self, op: dict[str, Any] | None) -> None:
        before = (op or {}).get("before") or {}
        after = (op or {}).get("after") or {}
        kinds = list(dict.fromkeys(list(before) + list(after)))
        with self.ops_fig.batch_update():
            self.ops_fig.data[0].x, self.ops_fig.data[0].y = kinds, [before.get(k) for k in kinds]
            self.ops_fig.data[1].x, self.ops_fig.data[1].y = kinds, [after.get(k) for k in kinds]
            self.ops_fig.layout.title.text = ("time per op kind (ms per decode step)" if kinds else
                                              "time per op kind (ms per decode step) - press Measure speed")

    def close(self) -> None:
        self.session.unobserve(self.refresh)
        self.widget.close()


def _esc(s: str) -> str:
    return html.escape(s).replace("\n", "&#9166;\n")


def _tok(t: str, hit: bool, color: str) -> str:
    body = _esc(t)
    return f'<span style="background:{color};border-radius:2px">{body}</span>' if hit else body
