"""Widget panels over a :class:`~ciuic_lab.session.Session` (ipywidgets 8 + plotly ``FigureWidget``).

Panels are views: every number they show comes from the session, every edit goes to it.

- :class:`PrecisionMap` -- blocks x site kinds coloured by bits; select cells, set bits, scheme, group,
  layout and kernel; presets; live totals;
- :class:`FusionPanel` -- the recipe's fusion switches and KV-cache form, one layout for all sites;
- :class:`ComparePanel` -- text side by side with differing tokens highlighted, metrics with deltas,
  per-site error bars, time per op kind, history;
- :class:`InspectorPanel` -- one site's weights, its quantization grid, its error against bits;
- :class:`MachinePanel` -- this machine, the kernel backends, the backend of each site;
- :class:`Workbench` -- all of them in one layout.
"""

from .base import Panel, immediate
from .compare import ComparePanel
from .fusion import FusionPanel
from .inspector import InspectorPanel
from .machine import MachinePanel
from .precision import PrecisionMap
from .workbench import Workbench

__all__ = ["Workbench", "PrecisionMap", "FusionPanel", "ComparePanel", "InspectorPanel", "MachinePanel",
           "Panel", "immediate"]
