"""The kernel registry: for (device, format, layout, batch) pick the fastest available backend.

A *backend* computes ``y = x @ dequantize(W).T (+ bias)`` for a quantized weight. Backends register
themselves here; the torch reference backend is always registered and is the oracle every other
backend is tested against, and the fallback when no faster one takes a case.

Protocol of a backend (duck-typed, see :class:`Backend`):

- ``name``: ``"torch"``, ``"numba"``, ``"cuda"``; ``device``: ``"cpu"`` or ``"cuda"``; ``priority``:
  higher wins when several take the same case (measured: the benchmark sets the defaults);
- ``layouts``: the weight layouts it reads (``"rowmajor"`` is the packed layout of ``quant.pack``);
- ``available() -> (bool, reason)``: never raises, never compiles at import;
- ``supports(spec, layout, batch) -> bool``;
- ``prepare(qt, layout) -> prepared``: repack once, at apply time (may return ``qt`` itself);
- ``linear(x2d, prepared, bias) -> y2d``: ``x2d`` is ``[M, K]`` in the activation dtype;
- optional ``grouped(x2d, prepared_list, expert_ids, ...)`` for MoE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import KernelError
from ..quant import QTensor, QuantSpec

LAYOUTS = ("rowmajor",)  # backends add theirs through register()


class Backend(Protocol):
    name: str
    device: str
    priority: int
    layouts: tuple[str, ...]

    def available(self) -> tuple[bool, str]: ...

    def supports(self, spec: QuantSpec, layout: str, batch: int) -> bool: ...

    def prepare(self, qt: QTensor, layout: str) -> Any: ...

    def linear(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor: ...


@dataclass
class Registry:
    backends: dict[str, Backend] = field(default_factory=dict)
    # automatic choices made so far: (device, spec, layout, batch, CIUIC_BACKENDS) -> (availability of the
    # device's backends when chosen, backend). A quantized linear asks on every call, so the choice is
    # looked up rather than made again (which took 4-11 us a call, as much as a small layer's kernel).
    _picks: dict[tuple, tuple[tuple[bool, ...], Backend]] = field(default_factory=dict, repr=False)

    def register(self, backend: Backend) -> None:
        self.backends[backend.name] = backend
        self._picks.clear()

    def get(self, name: str) -> Backend:
        if name not in self.backends:
            raise KernelError(f"kernel backend {name!r} is unknown; known: {', '.join(sorted(self.backends))}")
        return self.backends[name]

    def layouts(self) -> tuple[str, ...]:
        out: list[str] = []
        for b in self.backends.values():
            for lay in b.layouts:
                if lay not in out:
                    out.append(lay)
        return tuple(out)

    def status(self) -> dict[str, dict[str, Any]]:
        """Every backend, whether it is available here, and why not."""
        out = {}
        for name, b in self.backends.items():
            ok, why = b.available()
            out[name] = {"device": b.device, "available": ok, "reason": why, "layouts": list(b.layouts)}
        return out

    def allowed(self, name: str) -> bool:
        """``CIUIC_BACKENDS=torch,numba`` limits automatic choice to those (the reference is always allowed)."""
        only = os.environ.get("CIUIC_BACKENDS")
        return name == "torch" or not only or name in {x.strip() for x in only.split(",")}

    def candidates(self, device: str, spec: QuantSpec, layout: str, batch: int) -> list[Backend]:
        """Backends that take this case, best first; the torch reference is always last."""
        dev = torch.device(device).type
        found = []
        for b in self.backends.values():
            if not self.allowed(b.name):
                continue
            if b.device != dev and b.name != "torch":
                continue
            if not b.available()[0] or not b.supports(spec, layout, batch):
                continue
            found.append(b)
        found.sort(key=lambda b: -b.priority)
        return found

    def pick(self, device: str, spec: QuantSpec, layout: str = "rowmajor", batch: int = 1,
             kernel: str = "auto") -> Backend:
        """The backend for one case. ``kernel`` names one explicitly, or ``auto``."""
        if kernel != "auto":
            b = self.get(kernel)
            ok, why = b.available()
            if not ok:
                raise KernelError(f"kernel backend {kernel!r} is not available here: {why}")
            if not b.supports(spec, layout, batch):
                raise KernelError(
                    f"kernel backend {kernel!r} does not take {spec.label()} in layout {layout!r}; "
                    f"its layouts: {', '.join(b.layouts)}"
                )
            return b
        dev = device if device in ("cpu", "cuda") else torch.device(device).type
        # a backend can become unavailable (a failed build) or available: the choice holds while the
        # availability of the device's backends is what it was
        avail = tuple(b.available()[0] for b in self.backends.values() if b.device == dev)
        key = (dev, spec, layout, batch, os.environ.get("CIUIC_BACKENDS"))
        hit = self._picks.get(key)
        if hit is not None and hit[0] == avail:
            return hit[1]
        cands = self.candidates(dev, spec, layout, batch)
        if not cands:
            raise KernelError(f"no kernel backend takes {spec.label()} in layout {layout!r} on {device}")
        if len(self._picks) >= 4096:  # batches of every prompt length: keep it bounded
            self._picks.clear()
        self._picks[key] = (avail, cands[0])
        return cands[0]


REGISTRY = Registry()


def register(backend: Backend) -> None:
    REGISTRY.register(backend)
