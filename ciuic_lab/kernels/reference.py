"""The torch reference backend: dequantize, then ``F.linear``. Always available; the oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import QTensor, QuantSpec, dequantize


class TorchReference:
    name = "torch"
    device = "any"
    priority = 0
    layouts = ("rowmajor",)

    def available(self) -> tuple[bool, str]:
        return True, "always available (dequantize + torch matmul)"

    def supports(self, spec: QuantSpec, layout: str, batch: int) -> bool:
        return True  # keeps the row-major QTensor whatever layout faster backends use

    def prepare(self, qt: QTensor, layout: str = "rowmajor") -> QTensor:
        return qt

    def linear(self, x: torch.Tensor, prepared: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = dequantize(prepared, dtype=x.dtype)
        return F.linear(x, w, bias)


REFERENCE = TorchReference()


def moe_reference(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, gate_up: list[QTensor],
                  down: list[QTensor], act_dtype: torch.dtype) -> torch.Tensor:
    """The grouped MoE steps in float64, the oracle of the kernels' ``moe``: for each token t,
    ``sum_j wts[t, j] * down_e(silu(gate_e x_t) * up_e x_t)`` with ``e = ids[t, j]`` (an id outside
    the lists contributes nothing) and gate_up's rows the gate's then the up's. ``h`` is rounded to
    ``act_dtype`` between the two products, as the kernels hand it on."""
    out = torch.zeros(x.shape[0], down[0].shape[0], dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            if e < 0 or e >= len(gate_up):
                continue
            g, u = (x[t].double() @ dequantize(gate_up[e], torch.float64).to(x.device).T).chunk(2)
            h = (F.silu(g) * u).to(act_dtype).double()
            out[t] += float(wts[t, j]) * (h @ dequantize(down[e], torch.float64).to(x.device).T)
    return out
