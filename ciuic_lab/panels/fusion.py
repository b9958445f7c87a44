"""Fusion & layout: the recipe's switches as toggles, the KV-cache form, and one layout for every
quantized site."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from ..session import CiuicError, Session
from .base import Panel, Scheduler

DESCRIPTIONS = {
    "qkv_a": "one matmul for the query and key/value down-projections (q_a and kv_a read the same input)",
    "gate_up": "one matmul for the gate and up projections of each MLP and shared expert",
    "norm_fold": "fold the RMSNorm weights into the projection that follows them",
    "mla_absorb": "absorb kv_b into the query and output projections: attention runs in the latent space",
    "moe_grouped": "run the experts a layer selected in one grouped call instead of one after another",
}
KV_DESCRIPTIONS = {"expanded": "keys and values per head (as transformers stores them)",
                   "latent": "the compressed latent (MLA's small cache)"}


class FusionPanel(Panel):
    """Toggles for the recipe's fusion switches and the KV-cache form; a layout for all quantized sites."""

    title = "Fusion & layout"

    def __init__(self, session: Session, scheduler: Scheduler | None = None):
        super().__init__(session, scheduler)
        opts = session.options()
        self._quiet = False
        self.switches: dict[str, widgets.Checkbox] = {}
        rows = []
        for name in opts["fusions"]:
            box = widgets.Checkbox(value=False, description=name, indent=False, layout=widgets.Layout(width="140px"))
            box.add_class(f"ciuic-fusion-{name}")
            box.observe(self._on_switch, names="value")
            self.switches[name] = box
            rows.append(widgets.HBox([box, widgets.HTML(f"<span style='color:#555'>{DESCRIPTIONS.get(name, '')}</span>")]))
        self.kv_cache = widgets.ToggleButtons(options=opts["kv_cache"], value=opts["kv_cache"][0],
                                              description="KV cache", tooltips=[KV_DESCRIPTIONS.get(k, k)
                                                                                for k in opts["kv_cache"]])
        self.kv_cache.observe(self._on_switch, names="value")
        self.layout_choice = widgets.Dropdown(options=opts["layouts"], value=opts["layouts"][0], description="layout",
                                              layout=widgets.Layout(width="240px"))
        self.layout_button = widgets.Button(description="Use for all quantized sites",
                                            tooltip="store every quantized weight in this layout")
        self.layout_button.on_click(lambda _: self.relayout())
        self.state = widgets.HTML(value="")
        self.widget = widgets.VBox([
            widgets.HTML(f"<b>{self.title}</b>"), *rows, self.kv_cache,
            widgets.HTML("<b>Weight layout</b> <span style='color:#555'>(how the kernels read the packed codes; "
                         "per site in the precision map)</span>"),
            widgets.HBox([self.layout_choice, self.layout_button]), self.state, self.footer(),
        ])
        self.widget.add_class("ciuic-fusion")
        session.observe(self.refresh)
        self.refresh()

    def _on_switch(self, _change: Any) -> None:
        if self._quiet:
            return
        switches = {k: bool(b.value) for k, b in self.switches.items()}
        kv = self.kv_cache.value
        self.run(lambda: self.session.set_fusions(kv_cache=kv, **switches), list(self.switches.values()),
                 on_error=lambda: self.refresh("plan"))

    def relayout(self) -> None:
        def job():
            names = self.session.plan.quantized()
            if not names:
                raise CiuicError("no site is quantized yet: a layout applies to quantized weights")
            return self.session.set(names, layout=self.layout_choice.value)

        self.run(job, [self.layout_button])

    def refresh(self, event: str = "plan") -> None:
        """Show the session's switches (also after a refused change, so the toggles never lie)."""
        if event != "plan":
            return
        on = self.session.fusions()
        self._quiet = True
        try:
            for k, b in self.switches.items():
                b.value = bool(on.get(k))
            self.kv_cache.value = self.session.plan.recipe.kv_cache
        finally:
            self._quiet = False
        layouts: dict[str, int] = {}
        for n in self.session.plan.quantized():
            lay = self.session.plan.configs[n].layout
            layouts[lay] = layouts.get(lay, 0) + 1
        done = []
        for name, r in self.session.fusion_report().items():
            if not r.get("enabled"):
                continue
            line = f"<b>{html.escape(name)}</b>: applied in {r.get('applied', 0)} place(s)"
            if r.get("skipped"):
                line += "; not applied: " + html.escape("; ".join(r["skipped"][:3]))
            done.append(line)
        lay = ("quantized sites by layout: " + ", ".join(f"{k}: {v}" for k, v in layouts.items())
               if layouts else "no site quantized yet")
        self.state.value = "<br>".join(done + [lay])

    def close(self) -> None:
        self.session.unobserve(self.refresh)
        self.widget.close()
