"""Quantizers that read calibration statistics: output-aware clipping and GPTQ.

Both take ``W [N, K]`` and the input Hessian ``H = sum x x^T [K, K]`` of the layer (calibration inputs)
and return a :class:`QTensor` in the very same format as round-to-nearest (same packing, fp16 scales
rounded up, integer zero points), so every kernel and export reads it unchanged.

- ``clip: "output"`` chooses each group's clipping range and zero point to minimize the *layer's
  output* error ``(W - Q) H (W - Q)^T`` instead of the weight error: first group by group with the
  group's own block of ``H``, then one coordinate pass per group with the whole row (the error a
  group leaves interacts with its neighbours' through the off-diagonal blocks of ``H``).
- ``method: "gptq"`` (Frantar et al., 2022) quantizes column by column, pushing each column's error
  onto the columns not yet quantized, weighted by the inverse Hessian. Group scales are fixed before
  the sweep (from the spec's clipping: ``minmax``, ``mse`` or ``output``) so that the columns can be
  visited in order of decreasing ``diag(H)`` ("act order": the inputs that matter most are quantized
  first, while the most columns are left to absorb their error).
"""

from __future__ import annotations

import torch

from ..errors import CiuicError
from .core import QTensor, _check_finite, _grouped, _int_codes, _int_params, _weight_grid, quantize_codes
from .pack import pack
from .spec import QuantSpec

OUTPUT_GRID = tuple(1.0 - 0.02 * i for i in range(36))  # clipping factors 1.0 .. 0.30
ZERO_STEPS = (-1, 0, 1)  # zero points tried around the rounded one


def _check(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, what: str) -> None:
    if spec.keep or spec.is_fp8:
        raise CiuicError(f"{what} applies to integer formats of 2-8 bits")
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise CiuicError(f"{what} needs W [N, K] and H [K, K]; got W {tuple(w.shape)}, H {tuple(h.shape)}")
    _check_finite(w)
    if not torch.isfinite(h).all():
        raise CiuicError(f"{what}: the calibration Hessian holds NaN/Inf; the calibration inputs overflowed")


def _normalized(h: torch.Tensor, k_pad: int) -> torch.Tensor:
    hf = h.detach().to(torch.float32)
    scale = torch.diagonal(hf).mean()
    hf = hf / scale if scale > 0 else torch.eye(hf.shape[0])
    pad = k_pad - hf.shape[0]
    return torch.nn.functional.pad(hf, (0, pad, 0, pad)) if pad else hf


def output_clip(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, passes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales (fp16, rounded up) and zero points (float) minimizing the output error ``d H d^T``.

    ``w [N, K]``, ``h [K, K]``; returns ``[N, G]`` each (``[1, 1]`` for per-tensor groups).
    """
    _check(w, h, spec, "clip 'output'")
    wf = w.detach().to(torch.float32)
    n, k = wf.shape
    qmax = (1 << spec.bits) - 1
    steps = ZERO_STEPS if spec.scheme == "asym" else (0,)
    if spec.group == "tensor":
        hf = _normalized(h, k)
        wt = _grouped(wf, spec)[0]  # [1, 1, N*K]
        best = None
        for a in OUTPUT_GRID:
            s16, z0 = _int_params(wt, spec, a)
            for dz in steps:
                z = (z0 + dz).clamp(0, qmax)
                d = ((_int_codes(wt, s16, z, spec.bits) - z[..., None]) * s16.float()[..., None] - wt).view(n, k)
                e = float(((d @ hf) * d).sum())
                if best is None or e < best[0]:
                    best = (e, s16, z)
        return best[1].reshape(1, 1), best[2].reshape(1, 1)

    wg, g, n_groups = _grouped(wf, spec)  # [N, G, g]
    hf = _normalized(h, n_groups * g)
    hb = torch.stack([hf[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(n_groups)])  # [G, g, g]

    def candidates(wj: torch.Tensor):
        """(scale, zero, error vector) of every grid point for grouped weights ``[..., g]``."""
        for a in OUTPUT_GRID:
            s16, z0 = _int_params(wj, spec, a)
            for dz in steps:
                z = (z0 + dz).clamp(0, qmax)
                d = (_int_codes(wj, s16, z, spec.bits) - z[..., None]) * s16.float()[..., None] - wj
                yield s16, z, d

    def keep_better(best, e, s16, z, d):
        if best is None:
            return [e, s16, z, d]
        m = e < best[0]
        return [torch.where(m, e, best[0]), torch.where(m, s16, best[1]), torch.where(m, z, best[2]),
                torch.where(m[..., None], d, best[3])]

    best = None  # group by group, each with its own block of H
    for s16, z, d in candidates(wg):
        best = keep_better(best, torch.einsum("ngi,gij,ngj->ng", d, hb, d), s16, z, d)
    _, scales, zeros, dev = best
    dev = dev.reshape(n, n_groups * g)
    for _ in range(passes if n_groups > 1 else 0):  # then the whole row: cross terms between groups
        for j in range(n_groups):
            sl = slice(j * g, (j + 1) * g)
            cross = dev @ hf[:, sl] - dev[:, sl] @ hf[sl, sl]  # [N, g]: what the other groups' errors couple to
            wj = wg[:, j]
            d0 = dev[:, sl]
            cur = [(d0 @ hb[j] * d0).sum(-1) + 2 * (d0 * cross).sum(-1), scales[:, j], zeros[:, j], d0]
            for s16, z, d in candidates(wj):
                cur = keep_better(cur, (d @ hb[j] * d).sum(-1) + 2 * (d * cross).sum(-1), s16, z, d)
            scales[:, j], zeros[:, j], dev[:, sl] = cur[1], cur[2], cur[3]
    return scales, zeros


def _static_params(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales and zero points for the spec's clipping, from the weight before any update."""
    if spec.clip == "output":
        return output_clip(w, h, spec)
    return _weight_grid(_grouped(w.detach().to(torch.float32), spec)[0], spec)


def _qtensor(spec: QuantSpec, w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> QTensor:
    zq = zeros.to(torch.uint8) if spec.scheme == "asym" else None
    return QTensor(spec, tuple(w.shape), pack(codes.to(torch.uint8), spec.bits), scales, zq, w.dtype)


def calibrated_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Quantize ``w [N, K]`` with the spec's calibrated method: GPTQ, or round-to-nearest on the
    output-aware clipping grid (``clip: "output"``)."""
    if spec.method == "gptq":
        return gptq_quantize(w, h, spec)
    if spec.clip != "output":
        raise CiuicError(f"{spec.label()} needs no calibration; use ciuic_lab.quant.quantize")
    scales, zeros = output_clip(w, h, spec)
    return _qtensor(spec, w, quantize_codes(w, spec, scales, zeros), scales, zeros)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                  block: int = 128, act_order: bool = True) -> QTensor:
    """GPTQ-quantize ``w [N, K]`` with the input Hessian ``h [K, K]`` (sum of x x^T over calibration rows)."""
    _check(w, h, spec, "GPTQ")
    n, k = w.shape
    scales, zeros = _static_params(w, h, spec)
    W = w.detach().to(torch.float64).clone()
    H = h.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:
        raise CiuicError(f"GPTQ: the calibration Hessian is not positive definite ({e}); use more calibration text") from None

    g = k if spec.group in ("channel", "tensor") else int(spec.group)
    col_group = (perm // g) if spec.group != "tensor" else torch.zeros(k, dtype=torch.long)
    s_cols = scales.to(torch.float32)[:, col_group] if spec.group != "tensor" else scales.to(torch.float32).expand(n, k)
    z_cols = zeros[:, col_group] if spec.group != "tensor" else zeros.expand(n, k)
    codes = torch.empty(n, k, dtype=torch.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            s, z = s_cols[:, c], z_cols[:, c]
            q = _int_codes(W1[:, i].to(torch.float32).view(n, 1, 1), s.view(n, 1), z.view(n, 1), spec.bits).view(n)
            codes[:, c] = q
            err = (W1[:, i] - ((q - z) * s).to(torch.float64)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return _qtensor(spec, w, out, scales, zeros)
