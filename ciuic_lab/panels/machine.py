"""Machine: what this machine has, the kernel backends, and which backend each site runs on."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from ..session import Session
from .base import Panel, Scheduler, html_table


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return html.escape(", ".join(map(str, v))) or "&ndash;"
    if isinstance(v, dict):
        return html.escape(", ".join(f"{k}: {x}" for k, x in v.items())) or "&ndash;"
    return html.escape(str(v)) if v is not None else "&ndash;"


class MachinePanel(Panel):
    """This machine, the backends, and the backend each quantized site's module ran on last."""

    title = "Machine"

    def __init__(self, session: Session, scheduler: Scheduler | None = None):
        super().__init__(session, scheduler)
        self.info = widgets.HTML(value="")
        self.info.add_class("ciuic-machine")
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _: self.run(lambda: self.refresh("plan"), [self.refresh_button]))
        self.widget = widgets.VBox([widgets.HTML(f"<b>{self.title}</b>"), self.info, self.refresh_button,
                                    self.footer()])
        session.observe(self.refresh)
        self.refresh()

    def refresh(self, event: str = "plan") -> None:
        m = self.session.machine()
        machine = m["machine"]
        rows = [[html.escape(str(k)), _cell(v)] for k, v in machine.items()]
        rows += [["torch", html.escape(m["torch"])], ["torch threads", str(m["threads"])]]
        backends = [[html.escape(name), html.escape(b["device"]), "yes" if b["available"] else "no",
                     html.escape(str(b["reason"])), _cell(b["layouts"])] for name, b in m["backends"].items()]
        counts = ", ".join(f"{html.escape(k)}: {v}" for k, v in m["backend_counts"].items()) or \
            "nothing quantized: every site runs as loaded (torch)"
        sites = [[html.escape(owner), html.escape(b)] for owner, b in m["sites"].items()]
        self.info.value = (
            "<div style='font-size:13px'><b>This machine</b>" + html_table(["", ""], rows)
            + "<b>Kernel backends</b>" + html_table(["backend", "device", "available", "why", "layouts"], backends)
            + f"<b>Quantized modules by backend</b> (last forward): {counts}"
            + (f"<details><summary>per module ({len(sites)})</summary>" + html_table(["module", "backend"], sites)
               + "</details>" if sites else "") + "</div>")

    def close(self) -> None:
        self.session.unobserve(self.refresh)
        self.widget.close()
