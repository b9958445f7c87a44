"""Weight layouts the CPU kernels read, and exact repacking between them.

Every layout holds the same integer codes as :func:`ciuic_lab.quant.pack` (the *row-major packed*
layout, ``"rowmajor"``); they differ in where each code's bits sit in memory. Repacking is pure
numpy, exact both ways, and needs no compiler.

Vocabulary
----------
A kernel computes with vectors of ``VL`` fp32 lanes (``lanes``; 16 by default = one AVX-512 register,
two AVX2 registers, four NEON registers). Each lane reads one *lane word* of ``W`` bits (``word``:
8, 16 or 32 for int2/int4, 8 for int8, 24 for int3) holding ``P = W / bits`` codes
(``codes_per_lane``), code ``t`` at bits ``[t*bits, (t+1)*bits)``. Unpacking a lane word is a shift
per code: the ``t``-th vector of a chunk is ``(word >> t*bits) & mask`` in every lane, so wider
words mean fewer loads and zero-extensions per code, and on AVX-512 the mask and the int->float
convert fold into one 16-entry table lookup (see :mod:`.numba_cpu`). A *chunk* is the ``C = VL * P``
codes one vector load of ``CB = VL * W / 8`` bytes covers. Kernels never let a chunk straddle a
quantization group, so :func:`pick_lanes` takes the widest ``VL`` (16, 8, 4), then the widest ``W``,
whose chunk divides the group: int4 g128 -> 16 lanes x 32-bit words (128 codes, 64 bytes: one
cache line, one group); int2 g128 -> 16 x 16-bit; int3 g128 -> 16 x 24-bit.

``"rowmajor"``
    The reference packing: each row's codes densely packed, 8 codes in ``bits`` bytes. Read as lane
    words it needs no repacking (the packing is little-endian), but code ``t`` of lane ``j`` is element
    ``P*j + t`` of the row: the activation vector is de-interleaved once per call into ``P`` streams
    ``x_t[j] = x[P*j + t]`` (each padded by a cache line so the streams do not alias in L1), and every
    unpacked vector meets a contiguous slice of one stream. int3 lanes straddle bytes (3 bytes = 8
    codes), so the kernel gathers each lane's 3 bytes with one byte shuffle. Codes past the last whole
    chunk of a row are summed by a scalar tail.

``"interleaved<R>"`` (``interleaved1``, ``interleaved4``, ...)
    Designed for the vector width. Rows are taken in blocks of ``R`` (the last block padded with zero
    rows), each row padded with zero codes to a whole number of chunks, and stored as
    ``[N/R blocks][K/C chunks][R rows][CB bytes]``: the bytes of one chunk of the R rows of a block lie
    together, so a kernel working on a block streams memory strictly forward, one prefetch stream per
    thread, with R independent accumulators sharing each activation load. Inside a chunk the codes are
    *lane-major*: lane ``l``'s word holds codes ``l, VL + l, 2*VL + l, ...`` of the chunk, so the
    ``t``-th vector unpacked from a chunk is codes ``[t*VL, (t+1)*VL)``, one contiguous slice of the
    activations (no de-interleave, no shuffles, no scalar tail). int3 is stored as three byte *planes*
    of VL bytes each (plane ``p`` holds byte ``p`` of each lane's 24-bit word), so a lane's word is
    assembled from three vector loads instead of a gather. Scales and zero terms are stored
    ``[N/R][G][R]`` to match. What the layout buys is measured by ``ciuic-lab bench kernels``: about the
    same as row-major for one activation row, a large gain for batches (R rows share each activation
    load, which otherwise comes from L2 once per row).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import KernelError
from ..quant.pack import padded_len, row_bytes

ROWMAJOR = "rowmajor"
INTERLEAVED_ROWS = (1, 4)
LAYOUTS = (ROWMAJOR,) + tuple(f"interleaved{r}" for r in INTERLEAVED_ROWS)
LANE_CHOICES = (16, 8, 4)
BITS = (2, 3, 4, 8)
WORDS = {2: (32, 16, 8), 3: (24,), 4: (32, 16, 8), 8: (8,)}  # lane word widths, widest first

_NAME = re.compile(r"^interleaved(\d+)$")


@dataclass(frozen=True)
class Layout:
    """A parsed layout name: ``kind`` is ``"rowmajor"`` or ``"interleaved"``; ``rows`` is R (1 for rowmajor)."""

    name: str
    kind: str
    rows: int


def parse(name: str) -> Layout:
    """``"rowmajor"`` or ``"interleaved<R>"`` (R in 1..8) -> :class:`Layout`; KernelError otherwise."""
    if name == ROWMAJOR:
        return Layout(name, ROWMAJOR, 1)
    m = _NAME.match(str(name))
    if m and 1 <= int(m.group(1)) <= 8:
        return Layout(name, "interleaved", int(m.group(1)))
    raise KernelError(f"layout {name!r} is unknown; accepted: {', '.join(LAYOUTS)} (interleaved<R>, R in 1..8)")


def _word(bits: int, word: int | None) -> int:
    if bits not in BITS:
        raise KernelError(f"CPU layouts take int bits {', '.join(map(str, BITS))}; got {bits}")
    w = WORDS[bits][-1] if word is None else word
    if w not in WORDS[bits]:
        raise KernelError(f"int{bits} lane words are {', '.join(map(str, WORDS[bits]))} bits wide; got {word}")
    return w


def codes_per_lane(bits: int, word: int | None = None) -> int:
    """Codes one lane word unpacks into (``word`` bits; default: one byte, 24 bits for int3)."""
    return _word(bits, word) // bits


def chunk_codes(bits: int, lanes: int, word: int | None = None) -> int:
    return lanes * codes_per_lane(bits, word)


def chunk_bytes(bits: int, lanes: int, word: int | None = None) -> int:
    return lanes * _word(bits, word) // 8


def pick_lanes(bits: int, group: int, k: int) -> tuple[int, int] | None:
    """(lanes, word bits) for a weight: widest vector, then widest lane word, whose chunk divides the group.

    None when even 4 lanes of one-byte words do not fit the group. A single group per row
    (``channel``/``tensor`` or ``group >= k``) takes 16 lanes and the widest word.
    """
    if group >= k:
        return LANE_CHOICES[0], WORDS[bits][0]
    for vl in LANE_CHOICES:
        for w in WORDS[bits]:
            if group % chunk_codes(bits, vl, w) == 0:
                return vl, w
    return None


def _as_numpy_u8(codes) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        if codes.dtype != torch.uint8:
            raise KernelError(f"codes must be uint8, got {codes.dtype}")
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise KernelError(f"codes must be a 2-D uint8 array [N, K]; got {codes.dtype} with shape {codes.shape}")
    return codes


# ------------------------------------------------------------------------------ interleaved
def interleave(codes, bits: int, rows: int, lanes: int, word: int | None = None) -> np.ndarray:
    """Unpacked codes ``[N, K]`` (uint8, each < 2**bits) -> interleaved bytes ``[N/R, K/C, R, CB]``."""
    q = _as_numpy_u8(codes)
    if q.size and int(q.max()) >= (1 << bits):
        raise KernelError(f"codes exceed {bits} bits (max {int(q.max())}); accepted: 0..{(1 << bits) - 1}")
    w = _word(bits, word)
    n, k = q.shape
    p = codes_per_lane(bits, w)
    c = lanes * p
    nb = -(-n // rows)
    nc = -(-k // c)
    full = np.zeros((nb * rows, nc * c), dtype=np.uint8)
    full[:n, :k] = q
    a = full.reshape(nb, rows, nc, p, lanes)  # code index in chunk = t * VL + l
    lane_word = np.zeros((nb, rows, nc, lanes), dtype=np.uint32)
    for t in range(p):
        lane_word |= a[:, :, :, t, :].astype(np.uint32) << np.uint32(t * bits)
    wb = w // 8
    parts = np.stack([(lane_word >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(wb)], axis=-1)
    parts = parts.astype(np.uint8)  # [NB, R, NC, VL, wb]
    if bits == 3:  # byte planes: [.., wb, VL]
        parts = parts.transpose(0, 1, 2, 4, 3)
    out = parts.transpose(0, 2, 1, 3, 4)  # [NB, NC, R, ...]
    return np.ascontiguousarray(out).reshape(nb, nc, rows, lanes * wb)


def deinterleave(blocks: np.ndarray, bits: int, n: int, k: int, word: int | None = None) -> np.ndarray:
    """Inverse of :func:`interleave`: ``[N/R, K/C, R, CB]`` -> unpacked codes ``[n, k]`` (uint8)."""
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8 or blocks.ndim != 4:
        raise KernelError(f"interleaved codes must be a 4-D uint8 array; got {blocks.dtype} {blocks.shape}")
    w = _word(bits, word)
    wb = w // 8
    nb, nc, rows, cb = blocks.shape
    p = codes_per_lane(bits, w)
    lanes = cb // wb
    by = blocks.reshape(nb, nc, rows, *((wb, lanes) if bits == 3 else (lanes, wb))).astype(np.uint32)
    if bits == 3:
        by = by.transpose(0, 1, 2, 4, 3)
    lane_word = np.zeros((nb, nc, rows, lanes), dtype=np.uint32)
    for i in range(wb):
        lane_word |= by[..., i] << np.uint32(8 * i)
    mask = np.uint32((1 << bits) - 1)
    a = np.stack([(lane_word >> np.uint32(t * bits)) & mask for t in range(p)], axis=3).astype(np.uint8)
    full = a.transpose(0, 2, 1, 3, 4).reshape(nb * rows, nc * p * lanes)  # [NB, R, NC, P, VL]
    return np.ascontiguousarray(full[:n, :k])


def block_rows(t: np.ndarray, rows: int, fill: float = 0.0) -> np.ndarray:
    """Per-row, per-group values ``[N, G]`` -> ``[N/R, G, R]`` (padded rows get ``fill``)."""
    t = np.asarray(t)
    n, g = t.shape
    nb = -(-n // rows)
    full = np.full((nb * rows, g), fill, dtype=t.dtype)
    full[:n] = t
    return np.ascontiguousarray(full.reshape(nb, rows, g).transpose(0, 2, 1))


def unblock_rows(t: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`block_rows`."""
    nb, g, rows = t.shape
    return np.ascontiguousarray(t.transpose(0, 2, 1).reshape(nb * rows, g)[:n])


# ------------------------------------------------------------------------------ row-major
def unpack_rowmajor(packed, bits: int, k: int) -> np.ndarray:
    """Row-major packed bytes ``[N, row_bytes(k, bits)]`` -> codes ``[N, k]`` (numpy mirror of quant.unpack)."""
    by = _as_numpy_u8(packed)
    if by.shape[1] != row_bytes(k, bits):
        raise KernelError(f"packed rows hold {by.shape[1]} bytes; {k} codes of {bits} bits need {row_bytes(k, bits)}")
    if bits == 8:
        return by[:, :k].copy()
    n = by.shape[0]
    kp = padded_len(k)
    runs = by.reshape(n, kp // 8, bits).astype(np.uint64)
    word = np.zeros((n, kp // 8), dtype=np.uint64)
    for i in range(bits):
        word |= runs[:, :, i] << np.uint64(8 * i)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    codes = (word[:, :, None] >> shifts) & np.uint64((1 << bits) - 1)
    return np.ascontiguousarray(codes.astype(np.uint8).reshape(n, kp)[:, :k])


def pack_rowmajor(codes, bits: int) -> np.ndarray:
    """Codes ``[N, K]`` -> row-major packed bytes (numpy mirror of quant.pack)."""
    q = _as_numpy_u8(codes)
    n, k = q.shape
    kp = padded_len(k)
    if bits == 8:
        out = np.zeros((n, kp), dtype=np.uint8)
        out[:, :k] = q
        return out
    full = np.zeros((n, kp), dtype=np.uint64)
    full[:, :k] = q
    runs = full.reshape(n, kp // 8, 8)
    word = np.zeros((n, kp // 8), dtype=np.uint64)
    for i in range(8):
        word |= runs[:, :, i] << np.uint64(i * bits)
    out = np.stack([(word >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(bits)], axis=2)
    return np.ascontiguousarray(out.astype(np.uint8).reshape(n, kp // 8 * bits))


def to_layout(packed, bits: int, k: int, layout: str, lanes: int, word: int | None = None) -> np.ndarray:
    """Row-major packed codes -> the codes of ``layout`` (rowmajor: the same bytes, as numpy)."""
    lay = parse(layout)
    if lay.kind == ROWMAJOR:
        return np.ascontiguousarray(_as_numpy_u8(packed))
    return interleave(unpack_rowmajor(packed, bits, k), bits, lay.rows, lanes, word)


def from_layout(data: np.ndarray, bits: int, n: int, k: int, layout: str, word: int | None = None) -> np.ndarray:
    """Inverse of :func:`to_layout`: back to row-major packed bytes ``[n, row_bytes(k, bits)]``."""
    lay = parse(layout)
    if lay.kind == ROWMAJOR:
        return np.ascontiguousarray(data)
    return pack_rowmajor(deinterleave(data, bits, n, k, word), bits)


__all__ = [
    "LAYOUTS", "ROWMAJOR", "Layout", "parse", "codes_per_lane", "chunk_codes", "chunk_bytes", "pick_lanes",
    "interleave", "deinterleave", "block_rows", "unblock_rows", "unpack_rowmajor", "pack_rowmajor",
    "to_layout", "from_layout",
]
