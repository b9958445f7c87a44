"""What every panel shares: a Session, a scheduler, one status line and a progress bar.

A panel is a plain class holding widgets and a :class:`~ciuic_lab.session.Session`; its ``widget``
is what Jupyter displays. Event handlers never compute anything themselves: they hand a *job* (a
call into the session) to the scheduler through :meth:`Panel.run`, which disables the panel's
buttons while the job runs, shows a progress bar when it takes longer than a moment, and turns any
error into one line in the panel instead of a traceback in a log.

The scheduler is injectable: any ``callable(job)`` that runs ``job()`` now or later. The default
runs it at once, which is what tests and a busy kernel want; a front end that prefers to keep the
kernel free can pass one that runs jobs on a worker thread.
"""

from __future__ import annotations

import html
import time
from typing import Any, Callable, Iterable

import ipywidgets as widgets

from ..session import CiuicError, Session

Job = Callable[[], Any]
Scheduler = Callable[[Job], None]

#: seconds after which a running job shows its progress bar
PROGRESS_AFTER_S = 0.3


def immediate(job: Job) -> None:
    """The default scheduler: run the job now, in the caller's thread."""
    job()


def one_line(e: BaseException) -> str:
    """An exception as one readable line (user errors as they are; others named as internal)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, CiuicError):
        return text or type(e).__name__
    return f"internal error: {type(e).__name__}{': ' + text if text else ''}"


class Panel:
    """Base of the workbench panels."""

    title = "panel"

    def __init__(self, session: Session, scheduler: Scheduler | None = None):
        if not isinstance(session, Session):
            raise CiuicError(f"a panel needs a ciuic_lab Session, got {type(session).__name__}")
        self.session = session
        self.scheduler: Scheduler = scheduler or immediate
        self.status = widgets.HTML(value="", layout=widgets.Layout(min_height="1.6em"))
        self.status.add_class("ciuic-status")
        self.progress = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                              layout=widgets.Layout(width="60%", display="none"))
        self.progress_label = widgets.Label(value="", layout=widgets.Layout(display="none"))
        self.busy = False
        self.last_error: str | None = None

    # ------------------------------------------------------------------ status line
    def show_error(self, message: str) -> None:
        self.last_error = message
        self.status.value = (f'<span style="color:#b00020;font-weight:600">&#9888; {html.escape(message)}</span>')

    def show_info(self, message: str) -> None:
        self.status.value = f'<span style="color:#555">{html.escape(message)}</span>'

    def clear_status(self) -> None:
        self.last_error = None
        self.status.value = ""

    def footer(self) -> widgets.Widget:
        return widgets.VBox([widgets.HBox([self.progress, self.progress_label]), self.status])

    # ------------------------------------------------------------------ jobs
    def run(self, job: Job, controls: Iterable[widgets.Widget] = (), then: Callable[[Any], None] | None = None,
            on_error: Callable[[], None] | None = None, ok: str | None = None) -> None:
        """Run ``job`` through the scheduler with ``controls`` disabled; errors become the status line."""

        def task() -> None:
            ctl = [c for c in controls if not c.disabled]
            for c in ctl:
                c.disabled = True
            self.busy = True
            self.clear_status()
            started = time.perf_counter()
            previous = self.session.progress

            def progress(fraction: float, message: str) -> None:
                if time.perf_counter() - started < PROGRESS_AFTER_S and fraction < 1.0:
                    return
                if self.progress.layout.display == "none":
                    self.progress.layout.display = ""
                    self.progress_label.layout.display = ""
                self.progress.value = fraction
                self.progress_label.value = message

            self.session.progress = progress
            try:
                result = job()
            except Exception as e:  # noqa: BLE001 - every error is shown as one line, the state is unchanged
                self.show_error(one_line(e))
                if on_error is not None:
                    on_error()
                return
            else:
                if then is not None:
                    try:
                        then(result)
                    except Exception as e:  # noqa: BLE001
                        self.show_error(one_line(e))
                        return
                if ok:
                    self.show_info(ok)
            finally:
                self.session.progress = previous
                self.progress.layout.display = "none"
                self.progress_label.layout.display = "none"
                self.busy = False
                for c in ctl:
                    c.disabled = False

        self.scheduler(task)

    # ------------------------------------------------------------------ display
    widget: widgets.Widget

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def refresh(self, event: str = "plan") -> None:
        """Redraw from the session (called after every change)."""


def html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A small HTML table (cells are already escaped or trusted markup)."""
    th = "".join(f'<th style="text-align:{"left" if i == 0 else "right"};padding:2px 8px">{h}</th>'
                 for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td style="text-align:{"left" if i == 0 else "right"};padding:2px 8px">{c}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{cls}" style="border-collapse:collapse;font-size:13px"><tr>{th}</tr>{body}</table>'


def fmt(x: Any, spec: str = ".3f", none: str = "&ndash;") -> str:
    if x is None:
        return none
    if isinstance(x, float) and x != x:
        return none
    return format(x, spec)
