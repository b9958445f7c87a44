"""quantize / dequantize: pure tensor maths, no modules, no models.

Weights are ``[..., N, K]`` (N output rows, K inputs; leading dims such as an expert bank's E are
carried through). Integer formats store

- ``codes``  uint8 ``[..., N, row_bytes(K, bits)]`` -- densely packed (see :mod:`.pack`);
- ``scales`` fp16  ``[..., N, G]`` (G = ceil(K / group); ``[..., 1, 1]`` for per-tensor);
- ``zeros``  uint8 ``[..., N, G]`` integer zero points for ``asym``; ``None`` for ``sym``, whose
  zero point is the constant ``2**(bits-1)``.

and dequantize as ``w = (q - z) * s``, one formula for both schemes. Scales are rounded *up* to fp16
so that the stored step still covers the group's range: every element of an asymmetric
round-to-nearest quantization lies within half a stored step of the original.

``fp8_e4m3`` stores e4m3 codes (as uint8 bytes) ``[..., N, K]`` and one fp32 scale per 128x128 block,
``[..., ceil(N/128), ceil(K/128)]`` (DeepSeek-V3's ``weight_scale_inv``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CiuicError
from .pack import pack, padded_len, row_bytes, unpack
from .spec import FP8_BLOCK, QuantSpec

FP16_MAX = 65504.0
FP8_MAX = 448.0
MSE_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5


@dataclass
class QTensor:
    """A quantized weight: what is stored, and how to read it back."""

    spec: QuantSpec
    shape: tuple[int, ...]
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    dtype: torch.dtype = torch.float32

    # ---------------------------------------------------------------- sizes
    @property
    def n(self) -> int:
        return self.shape[-2]

    @property
    def k(self) -> int:
        return self.shape[-1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, scales and zero points."""
        b = self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            b += self.zeros.numel() * self.zeros.element_size()
        return b

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    @property
    def group_size(self) -> int:
        return self.spec.group_size(self.k)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    # ---------------------------------------------------------------- views
    def group_scales(self) -> torch.Tensor:
        """Scales as ``[..., N, G]`` whatever the granularity (per-tensor expanded to one group per row)."""
        if self.spec.group == "tensor":
            return self.scales.expand(*self.shape[:-1], 1)
        return self.scales

    def group_zeros(self) -> torch.Tensor:
        """Zero points as uint8 ``[..., N, G]`` (the implicit ``2**(bits-1)`` for ``sym``)."""
        if self.zeros is None:
            return torch.full_like(self.group_scales(), 1 << (self.spec.bits - 1), dtype=torch.uint8)
        if self.spec.group == "tensor":
            return self.zeros.expand(*self.shape[:-1], 1)
        return self.zeros

    def codes_unpacked(self) -> torch.Tensor:
        """Integer codes ``[..., N, K]`` as uint8 (exact, for tests and repacking)."""
        if self.spec.is_fp8:
            return self.codes
        return unpack(self.codes, self.spec.bits, self.k)

    def __getitem__(self, idx: int) -> "QTensor":
        """Select along the first leading dim (one expert of a bank)."""
        if len(self.shape) < 3:
            raise CiuicError("only a quantized bank ([E, N, K]) can be indexed")
        return QTensor(
            self.spec,
            tuple(self.shape[1:]),
            self.codes[idx],
            self.scales[idx],
            None if self.zeros is None else self.zeros[idx],
            self.dtype,
        )

    def to(self, device) -> "QTensor":
        return QTensor(
            self.spec,
            self.shape,
            self.codes.to(device),
            self.scales.to(device),
            None if self.zeros is None else self.zeros.to(device),
            self.dtype,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        d = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            d["zeros"] = self.zeros
        return d


# -------------------------------------------------------------------------- helpers
def _fp16_scale_up(s: torch.Tensor) -> torch.Tensor:
    """Round fp32 scales up to the next representable fp16 (never down), and never to zero."""
    if torch.any(s > FP16_MAX):
        raise CiuicError(
            f"weights too large for fp16 scales (a group's step {float(s.max()):.3g} > {FP16_MAX}); "
            "accepted: weights whose range per group is below ~1.6e7"
        )
    s16 = s.to(torch.float16)
    low = s16.to(torch.float32) < s
    if torch.any(low):
        s16 = torch.where(low, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
    tiny = s16 == 0
    if torch.any(tiny):
        s16 = torch.where(tiny, torch.full_like(s16, 2.0**-24), s16)
    return s16


def _check_finite(w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise CiuicError(
            f"weight holds {bad} NaN/Inf value(s); quantization accepts finite weights only "
            "(fix or keep this site at bits 16)"
        )


def _grouped(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int, int]:
    """``[..., N, K]`` fp32 -> ``[..., N, G, g]`` padded with zeros, plus (g, G)."""
    k = w.shape[-1]
    if spec.group == "tensor":
        return w.reshape(*w.shape[:-2], 1, 1, -1), w.shape[-2] * k, 1
    g = spec.group_size(k)
    n_groups = (k + g - 1) // g
    if n_groups * g != k:
        w = torch.nn.functional.pad(w, (0, n_groups * g - k))
    return w.reshape(*w.shape[:-1], n_groups, g), g, n_groups


def _int_params(wg: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0):
    """Scales (fp16, rounded up) and zero points (float) for grouped weights ``[..., G, g]``."""
    qmax = (1 << spec.bits) - 1
    if spec.scheme == "asym":
        lo = torch.clamp(wg.amin(dim=-1), max=0.0) * shrink
        hi = torch.clamp(wg.amax(dim=-1), min=0.0) * shrink
        s = (hi - lo) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        s16 = _fp16_scale_up(s)
        z = torch.clamp(torch.round(-lo / s16.float()), 0, qmax)
    else:
        half = 1 << (spec.bits - 1)
        amax = wg.abs().amax(dim=-1) * shrink
        s = amax / (half - 1) if half > 1 else amax
        s = torch.where(s > 0, s, torch.ones_like(s))
        s16 = _fp16_scale_up(s)
        z = torch.full_like(s, float(half))
    return s16, z


def _int_codes(wg: torch.Tensor, s16: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = (1 << bits) - 1
    q = torch.round(wg / s16.float().unsqueeze(-1)) + z.unsqueeze(-1)
    return torch.clamp(q, 0, qmax)


def _mse_shrink(wg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-group clipping factor from MSE_GRID minimizing the group's squared error."""
    best_err = None
    best = torch.ones(wg.shape[:-1], dtype=torch.float32, device=wg.device)
    for a in MSE_GRID:
        s16, z = _int_params(wg, spec, a)
        q = _int_codes(wg, s16, z, spec.bits)
        err = ((q - z.unsqueeze(-1)) * s16.float().unsqueeze(-1) - wg).pow(2).sum(-1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, a), best)
    return best


def _weight_grid(wg: torch.Tensor, spec: QuantSpec):
    """Scales and zero points of grouped weights from the weights alone (``minmax`` or ``mse`` clipping)."""
    return _int_params(wg, spec, _mse_shrink(wg, spec) if spec.clip == "mse" else 1.0)


# -------------------------------------------------------------------------- API
def quantize(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Quantize a weight ``[..., N, K]`` (N output rows, K inputs) to ``spec``."""
    if spec.keep:
        raise CiuicError("bits 16 means keep the weight as loaded; there is nothing to quantize")
    if w.dim() < 2:
        w = w.reshape(1, -1)
    if spec.needs_calibration:
        what = "method 'gptq'" if spec.method == "gptq" else "clip 'output'"
        raise CiuicError(f"{what} needs calibration data: use ciuic_lab.quant.gptq.calibrated_quantize "
                         "(the transforms calibrate with ciuic_lab.search.prepare_calibrated)")
    dtype = w.dtype
    wf = w.detach().to(torch.float32)
    _check_finite(wf)
    shape = tuple(wf.shape)
    if spec.is_fp8:
        return _quantize_fp8(wf, spec, dtype)
    wg, g, n_groups = _grouped(wf, spec)
    s16, z = _weight_grid(wg, spec)
    q = _int_codes(wg, s16, z, spec.bits)
    k = shape[-1]
    codes = q.reshape(*shape[:-1], -1)[..., :k].to(torch.uint8)
    if spec.group == "tensor":
        codes = q.reshape(shape).to(torch.uint8)
    packed = pack(codes, spec.bits)
    zeros = z.to(torch.uint8) if spec.scheme == "asym" else None
    return QTensor(spec, shape, packed, s16, zeros, dtype)


def quantize_codes(w: torch.Tensor, spec: QuantSpec, scales: torch.Tensor, zeros: torch.Tensor | None):
    """Codes (unpacked, uint8 ``[..., N, K]``) of ``w`` on a given grid; used by GPTQ column updates."""
    wg, _, _ = _grouped(w.to(torch.float32), spec)
    z = zeros.float() if zeros is not None else torch.full_like(scales, float(1 << (spec.bits - 1)), dtype=torch.float32)
    q = _int_codes(wg, scales, z, spec.bits)
    return q.reshape(*w.shape[:-1], -1)[..., : w.shape[-1]].to(torch.uint8)


def dequantize(qt: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Back to a dense ``[..., N, K]`` tensor (``qt.dtype`` unless ``dtype`` is given)."""
    dtype = dtype or qt.dtype
    if qt.spec.is_fp8:
        return _dequantize_fp8(qt).to(dtype)
    k = qt.k
    q = unpack(qt.codes, qt.spec.bits, k).to(torch.float32)
    s = qt.group_scales().to(torch.float32)
    z = qt.group_zeros().to(torch.float32)
    n_groups = s.shape[-1]
    g = qt.spec.group_size(k) if qt.spec.group != "tensor" else k
    if qt.spec.group == "tensor":
        g = k
    pad = n_groups * g - k
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    qg = q.reshape(*q.shape[:-1], n_groups, g)
    w = (qg - z.unsqueeze(-1)) * s.unsqueeze(-1)
    return w.reshape(*q.shape[:-1], n_groups * g)[..., :k].to(dtype)


def _quantize_fp8(wf: torch.Tensor, spec: QuantSpec, dtype) -> QTensor:
    shape = tuple(wf.shape)
    n, k = shape[-2], shape[-1]
    bn, bk = (n + FP8_BLOCK - 1) // FP8_BLOCK, (k + FP8_BLOCK - 1) // FP8_BLOCK
    wp = torch.nn.functional.pad(wf, (0, bk * FP8_BLOCK - k, 0, bn * FP8_BLOCK - n))
    blocks = wp.reshape(*shape[:-2], bn, FP8_BLOCK, bk, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., bn, bk]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = blocks / scale[..., :, None, :, None]
    codes = scaled.reshape(wp.shape)[..., :n, :k].to(torch.float8_e4m3fn).view(torch.uint8)
    return QTensor(spec, shape, codes.contiguous(), scale.to(torch.float32), None, dtype)


def _dequantize_fp8(qt: QTensor) -> torch.Tensor:
    n, k = qt.n, qt.k
    w = qt.codes.view(torch.float8_e4m3fn).to(torch.float32)
    s = qt.scales.repeat_interleave(FP8_BLOCK, dim=-2).repeat_interleave(FP8_BLOCK, dim=-1)
    return w * s[..., :n, :k]


def concat_rows(qts: list[QTensor]) -> QTensor:
    """Stack quantized weights along N (output rows): exact, since codes, scales and zeros are per row.

    Raises ValueError when the parts cannot share one stacked weight (different specs, K, or a
    per-tensor / fp8-block granularity that spans rows).
    """
    first = qts[0]
    if any(q.spec != first.spec for q in qts):
        raise ValueError("their quantization specs differ")
    if any(q.k != first.k or len(q.shape) != 2 for q in qts):
        raise ValueError("their input widths differ")
    if first.spec.group == "tensor":
        raise ValueError("per-tensor scales cannot be stacked")
    if first.spec.is_fp8 and any(q.n % FP8_BLOCK for q in qts[:-1]):
        raise ValueError("fp8 128-row blocks would straddle the parts")
    zeros = None if first.zeros is None else torch.cat([q.zeros for q in qts], dim=-2)
    n = sum(q.n for q in qts)
    return QTensor(first.spec, (n, first.k), torch.cat([q.codes for q in qts], dim=-2),
                   torch.cat([q.scales for q in qts], dim=-2), zeros, first.dtype)


def expected_nbytes(shape: tuple[int, ...], spec: QuantSpec, dtype_bytes: int = 2) -> int:
    """Bytes a weight of ``shape`` takes under ``spec`` (without quantizing it)."""
    numel = math.prod(shape)
    if spec.keep:
        return numel * dtype_bytes
    lead = math.prod(shape[:-2]) if len(shape) > 2 else 1
    n, k = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[-1])
    if spec.is_fp8:
        return numel + lead * ((n + 127) // 128) * ((k + 127) // 128) * 4
    codes = lead * n * row_bytes(k, spec.bits)
    groups = 1 if spec.group == "tensor" else lead * n * ((k + spec.group_size(k) - 1) // spec.group_size(k))
    if spec.group == "tensor":
        groups = lead
    per_group = 2 + (1 if spec.scheme == "asym" else 0)
    return codes + groups * per_group


__all__ = ["QTensor", "concat_rows", "quantize", "dequantize", "quantize_codes", "expected_nbytes", "padded_len"]
