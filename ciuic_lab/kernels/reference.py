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
