"""GPTQ: quantize a weight column by column, pushing each column's error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

Pure maths: given ``W [N, K]`` and ``H = X^T X [K, K]`` from calibration inputs, returns a
:class:`QTensor` in the very same format as round-to-nearest (same packing, fp16 scales rounded up,
integer zero points), so every kernel and export reads it unchanged. Group scales are computed when
the sweep reaches each group, from the already-updated weights.
"""

from __future__ import annotations

import torch

from ..errors import CiuicError
from .core import QTensor, _check_finite, _int_codes, _int_params, _mse_shrink
from .pack import pack
from .spec import QuantSpec


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                  block: int = 128) -> QTensor:
    """GPTQ-quantize ``w [N, K]`` with the input Hessian ``h [K, K]`` (sum of x x^T over calibration rows)."""
    if spec.keep or spec.is_fp8:
        raise CiuicError("GPTQ applies to integer formats of 2-8 bits")
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise CiuicError(f"GPTQ needs W [N, K] and H [K, K]; got W {tuple(w.shape)}, H {tuple(h.shape)}")
    dtype = w.dtype
    W = w.detach().to(torch.float64).clone()
    _check_finite(W)
    n, k = W.shape
    H = h.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        U = torch.linalg.cholesky(Hinv, upper=True)
    except RuntimeError as e:
        raise CiuicError(f"GPTQ: the calibration Hessian is not positive definite ({e}); use more calibration text") from None

    g = k if spec.group in ("channel", "tensor") else int(spec.group)
    n_groups = (k + g - 1) // g
    scales = torch.empty(n, n_groups, dtype=torch.float16)
    zeros = torch.empty(n, n_groups, dtype=torch.float32)
    codes = torch.empty(n, k, dtype=torch.float32)
    if spec.group == "tensor":
        wt = W.to(torch.float32).reshape(1, 1, -1)
        s16, z = _int_params(wt, spec, _mse_shrink(wt, spec) if spec.clip == "mse" else 1.0)
        scales[:], zeros[:] = s16.reshape(()), z.reshape(())
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = col // g
            if spec.group != "tensor" and col % g == 0:
                end = min(col + g, k)
                cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : end - col] if end > i2 else W1[:, i:i + end - col]
                cg = cur.to(torch.float32).unsqueeze(1)
                s16, z = _int_params(cg, spec, _mse_shrink(cg, spec) if spec.clip == "mse" else 1.0)
                scales[:, gi], zeros[:, gi] = s16[:, 0], z[:, 0]
            s = scales[:, gi].to(torch.float32)
            z = zeros[:, gi]
            q = _int_codes(W1[:, i].to(torch.float32).view(n, 1, 1), s.view(n, 1), z.view(n, 1), spec.bits).view(n)
            codes[:, col] = q
            deq = ((q - z) * s).to(torch.float64)
            err = (W1[:, i] - deq) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    packed = pack(codes.to(torch.uint8), spec.bits)
    if spec.group == "tensor":
        sc, zz = scales[:1, :1].clone(), zeros[:1, :1]
    else:
        sc, zz = scales, zeros
    zq = zz.to(torch.uint8) if spec.scheme == "asym" else None
    return QTensor(spec, (n, k), packed, sc, zq, dtype)
