"""The Workbench: every panel over one Session, in one layout.

    from ciuic_lab.panels import Workbench
    wb = Workbench()          # tiny-deepseek (or tiny-deepseek-random where the trained one is absent)
    wb                        # display it; wb.session is the controller behind it
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from ..session import CiuicError, Session
from .base import Panel, Scheduler
from .compare import ComparePanel
from .fusion import FusionPanel
from .inspector import InspectorPanel
from .machine import MachinePanel
from .precision import PrecisionMap


class Workbench(Panel):
    """Precision map, compare, weight inspector, fusion & layout and machine panels over one Session.

    ``model``: anything :class:`~ciuic_lab.session.Session` takes (``None``: the default embedded model),
    or pass ``session=`` to put the panels over an existing one. ``scheduler``: how panel jobs run
    (default: at once). Other keyword arguments go to the Session (``evalset``, ``cache_bytes``...).
    """

    title = "Ciuic Lab"

    def __init__(self, model: Any = None, tokenizer: Any = None, *, session: Session | None = None,
                 scheduler: Scheduler | None = None, **session_options: Any):
        if session is None:
            session = Session(model, tokenizer, **session_options)
        elif model is not None or session_options:
            raise CiuicError("give either a model (and Session options) or session=, not both")
        super().__init__(session, scheduler)
        sched = self.scheduler
        self.precision = PrecisionMap(session, sched)
        self.compare = ComparePanel(session, sched)
        self.inspector = InspectorPanel(session, sched)
        self.fusion = FusionPanel(session, sched)
        self.machine = MachinePanel(session, sched)
        self.precision.on_pick(self._follow)

        self.undo_button = widgets.Button(description="Undo", icon="undo", layout=widgets.Layout(width="90px"))
        self.redo_button = widgets.Button(description="Redo", icon="repeat", layout=widgets.Layout(width="90px"))
        self.undo_button.add_class("ciuic-undo")
        self.redo_button.add_class("ciuic-redo")
        self.recipe_path = widgets.Text(value="workbench-recipe.json", description="recipe file",
                                        layout=widgets.Layout(width="330px"))
        self.export_button = widgets.Button(description="Export recipe", icon="download",
                                            tooltip="write the current plan as a recipe (JSON)")
        self.undo_button.on_click(lambda _: self.run(session.undo, self._buttons()))
        self.redo_button.on_click(lambda _: self.run(session.redo, self._buttons()))
        self.export_button.on_click(lambda _: self.export())
        self.header = widgets.HTML(value="")

        self.tabs = widgets.Tab(children=[self.compare.charts, self.inspector.widget, self.fusion.widget,
                                          self.machine.widget])
        for i, name in enumerate(("Errors & time", "Weight inspector", "Fusion & layout", "Machine")):
            self.tabs.set_title(i, name)
        bar = widgets.HBox([self.undo_button, self.redo_button, self.recipe_path, self.export_button],
                           layout=widgets.Layout(flex_flow="row wrap", align_items="center"))
        main = widgets.HBox([self.precision.widget, self.compare.top],
                            layout=widgets.Layout(flex_flow="row wrap", align_items="flex-start"))
        self.widget = widgets.VBox([self.header, bar, self.footer(), main, self.tabs])
        self.widget.add_class("ciuic-workbench")
        session.observe(self.refresh)
        self.refresh()

    def _buttons(self) -> list[widgets.Widget]:
        return [self.undo_button, self.redo_button, self.export_button]

    def _follow(self, names: list[str]) -> None:
        if len(names) >= 1 and self.precision._pick is not None:
            self.inspector.show(names[0])

    def export(self) -> None:
        path = self.recipe_path.value.strip()

        def job():
            if not path:
                raise CiuicError("give a file name for the recipe, e.g. my-plan.json")
            return self.session.recipe(path)

        self.run(job, self._buttons(), ok=f"recipe written to {path}")

    def refresh(self, event: str = "plan") -> None:
        s = self.session
        params = sum(x.params for x in s.sites)
        notes = "".join(f"<div style='color:#8a5300;font-size:12px'>{html.escape(n)}</div>" for n in s.loaded.notes)
        self.header.value = (
            f"<div style='font-size:16px'><b>{self.title}</b> &middot; <code>{html.escape(s.name)}</code> "
            f"({html.escape(s.loaded.family)}, {params / 1e6:.2f} M weights in {len(s.sites)} sites) &middot; "
            f"state #{s.current.index}: {html.escape(s.current.label)}</div>{notes}")
        self.undo_button.disabled = not s.can_undo
        self.redo_button.disabled = not s.can_redo

    def close(self) -> None:
        for p in (self.precision, self.compare, self.inspector, self.fusion, self.machine):
            p.close()
        self.session.unobserve(self.refresh)
        self.widget.close()
