"""Numba CPU kernels for weight-only quantized linears: int8, int4, int3 and int2, group-wise scales.

What runs
---------
``y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g(k)]) * s[n, g(k)]`` for fp32 activations (bf16/fp16 are
cast at the boundary) and integer codes ``q`` in one of the layouts of :mod:`.layouts`. Three paths:

- **GEMV** (one activation row: the decode step). Per row and group the kernel accumulates
  ``D_g = sum q*x`` in vector registers and folds the group in once, ``tot += s_g * D_g``; the zero
  point never enters the inner loop: ``-z_g*s_g`` times the group's activation sum ``X_g`` (computed
  once per call and shared by every row) is added per row at the end. Rows of an interleaved block
  share each activation load; four accumulators per row keep FMA latency off the critical path.
- **small-batch GEMM** (2..32 rows). Each unpacked vector is dequantized once in registers and used
  for a tile of up to 8 activation rows (8..16 accumulators live); ``rows per pass`` of an interleaved
  block share each activation load.
- **prefill** (more than 32 rows): dequantize to fp32 in parallel and hand the product to torch's GEMM,
  which is compute-bound there and better at it.

The inner loop
--------------
Per 64-byte chunk of int4 g128 codes (one cache line, one group, 16 lanes x 32-bit words) the GEMV
loop is, on AVX-512: one ``vmovdqu64 zmm`` load of the codes, then per code position ``t`` a
``vpsrld zmm`` (shift the lane words), a ``vpermps zmm`` (16-entry table lookup: it reads only the low
4 bits of each index, so it masks and converts in one shuffle-port uop) and a ``vfmadd231ps zmm, [x]``
against a contiguous activation slice; the GEMM tile looks up in a table of dequantized values
``(j - z) * s`` built per group with one FMA, so the lookups are weights. Other CPUs (AVX2, NEON) get
the same loop with ``and`` + int->float convert instead of the lookup; int8 is zero-extend + convert.
A software prefetch runs ~2 KiB ahead of the codes: without it a thread waits on DRAM latency at a
third of the rate it computes from L2. ``inspect_asm`` on the compiled driver shows all of this (the
tests check that the FMAs are packed and, on AVX-512, that the lookups are there).

How the SIMD is written
-----------------------
Numba's own typing widens every integer operation on bytes to 64 bits, so a loop written over
``uint8`` arrays vectorizes at a quarter of the width at best (measured: 2-3x slower). The inner
loops are therefore emitted as LLVM IR through one ``@intrinsic`` (:func:`_tile`) with explicit
``<16 x i32>`` / ``<16 x float>`` vectors. The IR is target-neutral except for the AVX-512 lookup,
which is used only when Numba's target has AVX-512F: LLVM lowers a 16-lane vector to one zmm register
on AVX-512, two ymm on AVX2 and four q registers on NEON. The shape of a loop (bits, layout, lanes,
lane word, chunks per group, rows, batch tile, lookup or not) is a compile-time string passed as a
literal, so each weight configuration gets its own fully specialized loop (a group's chunks
unrolled), compiled once per configuration and kept in Numba's on-disk cache (``cache=True``;
``NUMBA_CACHE_DIR`` defaults to a per-user directory). Calls go straight to the compiled entry point,
so the Python cost of a call is about ten microseconds.

Parallelism: ``prange`` over rows (row-major) or row blocks (interleaved), with the thread count capped
at the CPUs this process may use (affinity and cgroup quota, see :mod:`.compat`).
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ..errors import KernelError
from ..quant import QTensor, QuantSpec
from . import layouts as L
from .registry import register


# ------------------------------------------------------------------------------ environment
def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for cand in (os.path.join(base, "ciuic_lab", "numba"),
                 os.path.join(tempfile.gettempdir(), f"ciuic_lab-numba-{os.getuid() if hasattr(os, 'getuid') else 0}")):
        try:
            os.makedirs(cand, exist_ok=True)
            if os.access(cand, os.W_OK):
                return cand
        except OSError:
            continue
    return ""


if not os.environ.get("NUMBA_CACHE_DIR"):
    _dir = _default_cache_dir()
    if _dir:
        os.environ["NUMBA_CACHE_DIR"] = _dir

try:  # numba is a dependency, but the backend must still import (and say why) without it
    import numba
    from llvmlite import ir
    from numba import literally, njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
    from numba.typed import List as TypedList

    if not numba.config.CACHE_DIR and os.environ.get("NUMBA_CACHE_DIR"):
        numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]  # numba was imported before us
    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - exercised only where numba is missing or broken
    numba = None
    _IMPORT_ERROR = f"numba is not importable: {exc}"

    def njit(*a, **k):
        return (lambda f: f) if not (a and callable(a[0])) else a[0]

    def intrinsic(f):
        return f

    prange = range

    def literally(x):
        return x


MAX_GEMM_ROWS = 32  # above this, dequantize + torch GEMM (prefill)
TILES = (8, 4, 2, 1)  # activation rows per GEMM tile
BITS = L.BITS


# ------------------------------------------------------------------------------ IR emission
@dataclass(frozen=True)
class _Conf:
    """Compile-time shape of one tile kernel; spelled as a short string literal."""

    mode: str  # "v": GEMV with per-group accumulators; "d": dequantize in registers (GEMM tiles)
    bits: int
    kind: str  # "rm" row-major packed, "il" interleaved
    rows: int  # R rows per block (1 for row-major)
    lanes: int  # VL
    cpg: int  # chunks per full group (0: a single group per row, length known at run time)
    mt: int  # activation rows per tile
    rp: int = 1  # rows of the block per pass ("d" mode)
    word: int = 8  # bits of one lane word (L.WORDS)
    lut: int = 0  # 1: unpack through a 16-entry register table (AVX-512 vpermps)

    @property
    def p(self) -> int:
        return L.codes_per_lane(self.bits, self.word)

    @property
    def cb(self) -> int:
        return L.chunk_bytes(self.bits, self.lanes, self.word)

    def key(self) -> str:
        return (f"{self.mode}.{self.bits}.{self.kind}{self.rows}.{self.lanes}.{self.cpg}.{self.mt}.{self.rp}."
                f"{self.word}.{self.lut}")

    @classmethod
    def parse(cls, s: str) -> "_Conf":
        m = re.fullmatch(r"([vd])\.(\d)\.(rm|il)(\d+)" + r"\.(\d+)" * 6, s)
        if not m:
            raise KernelError(f"bad kernel configuration {s!r}")
        return cls(m.group(1), int(m.group(2)), m.group(3), *(int(m.group(i)) for i in range(4, 11)))


# dims[] slots handed to the tile kernel (int64, loop-invariant)
D_G, D_GFULL, D_LAST, D_CSTRIDE, D_XSTREAM, D_XROW, D_OROW = range(7)
N_DIMS = 7

_NA_V = 4  # accumulators per row in GEMV mode
PREFETCH_BYTES = 2048  # how far ahead of the codes being read to prefetch (1-8 KiB measured alike)
PREFETCH_LOCALITY = 3  # prefetcht0
LINE = 64


def _i64(v):
    return ir.Constant(ir.IntType(64), v)


def _vec(ty, n):
    return ir.VectorType(ty, n)


def _splat(builder, val, n):
    undef = ir.Constant(_vec(val.type, n), ir.Undefined)
    v = builder.insert_element(undef, val, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, undef, ir.Constant(_vec(ir.IntType(32), n), [0] * n))


def _vfma(builder, a, b, c):
    n = a.type.count
    fnty = ir.FunctionType(a.type, [a.type] * 3)
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.v{n}f32")
    return builder.call(fn, [a, b, c])


def _vload(builder, base, off, vty):
    return builder.load(builder.bitcast(builder.gep(base, [off]), vty.as_pointer()), align=1)


def _prefetch(builder, base, off):
    """Software prefetch (read, keep in all cache levels): the hardware streamer alone leaves a thread
    that consumes 4-8 GB/s of packed codes waiting on DRAM latency; prefetching ~2 KiB ahead lets the
    kernel run at its L2-resident speed."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0")
    addr = builder.bitcast(builder.gep(base, [builder.add(off, _i64(PREFETCH_BYTES))]), i8p)
    builder.call(fn, [addr, ir.Constant(i32, 0), ir.Constant(i32, PREFETCH_LOCALITY), ir.Constant(i32, 1)])


def _hsum(builder, v):
    n = v.type.count
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(_vec(ir.IntType(32), h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(_vec(ir.IntType(32), h), list(range(h, n))))
        v = builder.fadd(lo, hi, flags=("fast",))
        n = h
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


def _permvar(builder, table, idx):
    """AVX-512 ``vpermps``: lane i of the result is ``table[idx[i] & 15]`` (one shuffle-port uop)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(table.type, [table.type, idx.type]),
                                        "llvm.x86.avx512.permvar.sf.512")
    return builder.call(fn, [table, idx])


def _lane_words(builder, cf: _Conf, cptr, off):
    """One chunk of one row -> ``<VL x i32>`` lane words (int3: assembled 24-bit words)."""
    vl = cf.lanes
    i32v = _vec(ir.IntType(32), vl)
    if cf.bits == 3:
        if cf.kind == "rm":  # 8 codes per 3 bytes: gather each lane's 3 bytes with one shuffle
            raw = _vload(builder, cptr, off, _vec(ir.IntType(8), 3 * vl))
            zero = ir.Constant(_vec(ir.IntType(8), 3 * vl), None)
            mask = []
            for lane in range(vl):
                mask += [3 * lane, 3 * lane + 1, 3 * lane + 2, 3 * vl]
            return builder.bitcast(
                builder.shuffle_vector(raw, zero, ir.Constant(_vec(ir.IntType(32), 4 * vl), mask)), i32v)
        planes = [builder.zext(_vload(builder, cptr, builder.add(off, _i64(i * vl)), _vec(ir.IntType(8), vl)),
                               i32v) for i in range(3)]
        return builder.or_(planes[0], builder.or_(builder.shl(planes[1], ir.Constant(i32v, [8] * vl)),
                                                  builder.shl(planes[2], ir.Constant(i32v, [16] * vl))))
    raw = _vload(builder, cptr, off, _vec(ir.IntType(cf.word), vl))
    return raw if cf.word == 32 else builder.zext(raw, i32v)


def _unpack(builder, cf: _Conf, cptr, off, table=None):
    """Load one chunk of one row at byte offset ``off`` -> ``P`` fp32 vectors (vector t: code t of each lane).

    With ``table`` (a ``<16 x float>``; LUT kernels) each code is looked up instead of masked and
    converted: ``vpermps`` reads only the low 4 bits of each index, so a shifted lane word needs no AND,
    and a table of dequantized values ``(j - z) * s`` yields weights directly.
    """
    vl, bits, p = cf.lanes, cf.bits, cf.p
    f32v = _vec(ir.FloatType(), vl)
    if bits == 8:
        return [builder.uitofp(_vload(builder, cptr, off, _vec(ir.IntType(8), vl)), f32v)]
    if cf.word == 8 and table is None:  # byte lanes: mask and shift bytes, widen once in the convert
        i8v = _vec(ir.IntType(8), vl)
        raw = _vload(builder, cptr, off, i8v)
        mask = ir.Constant(i8v, [(1 << bits) - 1] * vl)
        out = []
        for t in range(p):
            v = raw if t == 0 else builder.lshr(raw, ir.Constant(i8v, [t * bits] * vl))
            if t != p - 1:
                v = builder.and_(v, mask)
            out.append(builder.uitofp(v, f32v))
        return out
    i32v = _vec(ir.IntType(32), vl)
    word = _lane_words(builder, cf, cptr, off)
    mask = ir.Constant(i32v, [(1 << bits) - 1] * vl)
    out = []
    for t in range(p):
        v = word if t == 0 else builder.lshr(word, ir.Constant(i32v, [t * bits] * vl))
        if table is not None:
            out.append(_permvar(builder, table, v))
        else:
            if t != p - 1 or cf.word == 24:
                v = builder.and_(v, mask)
            out.append(builder.sitofp(v, f32v))
    return out


def _emit_chunk_loop(builder, c0, count_const, count_rt, body):
    """Run ``body(c, u)`` for chunks ``c0 .. c0+count``; ``u`` is the unroll slot (accumulator choice)."""
    if count_const:
        if count_const <= 8:
            for u in range(count_const):
                body(builder.add(c0, _i64(u)), u)
            return
        unroll = 4 if count_const % 4 == 0 else (2 if count_const % 2 == 0 else 1)
        with cgutils.for_range(builder, _i64(count_const // unroll)) as loop:
            base = builder.add(c0, builder.mul(loop.index, _i64(unroll)))
            for u in range(unroll):
                body(builder.add(base, _i64(u)), u)
        return
    pairs = builder.lshr(count_rt, _i64(1))
    with cgutils.for_range(builder, pairs) as loop:
        base = builder.add(c0, builder.mul(loop.index, _i64(2)))
        body(base, 0)
        body(builder.add(base, _i64(1)), 1)
    odd = builder.icmp_unsigned("!=", builder.and_(count_rt, _i64(1)), _i64(0))
    with builder.if_then(odd):
        body(builder.add(c0, builder.sub(count_rt, _i64(1))), 0)


def _emit_tile(context, builder, sig, args, cf: _Conf) -> None:
    codes_t, s_t, b_t, xs_t, out_t, dims_t = sig.args[:6]

    def ptr(i):
        return cgutils.create_struct_proxy(sig.args[i])(context, builder, value=args[i]).data

    cptr, sptr, bptr, xptr, optr, dptr = (ptr(i) for i in range(6))
    blk, m0 = args[6], args[7]
    dims = [builder.load(builder.gep(dptr, [_i64(i)])) for i in range(N_DIMS)]
    n_groups, g_full, last = dims[D_G], dims[D_GFULL], dims[D_LAST]
    cstride, xstream, xrow, orow = dims[D_CSTRIDE], dims[D_XSTREAM], dims[D_XROW], dims[D_OROW]
    vl, p, R, cb = cf.lanes, cf.p, cf.rows, cf.cb
    f32v = _vec(ir.FloatType(), vl)
    zero = ir.Constant(f32v, [0.0] * vl)
    cbase = builder.mul(blk, cstride)

    def chunk_off(c, r):
        if cf.kind == "rm":
            return builder.add(cbase, builder.mul(c, _i64(cb)))
        return builder.add(cbase, builder.mul(builder.add(builder.mul(c, _i64(R)), _i64(r)), _i64(cb)))

    def x_off(m, t, c):
        row = builder.mul(builder.add(m0, _i64(m)), xrow)
        if cf.kind == "rm":
            return builder.add(row, builder.add(builder.mul(_i64(t), xstream), builder.mul(c, _i64(vl))))
        return builder.add(row, builder.add(builder.mul(c, _i64(vl * p)), _i64(t * vl)))

    def sb_index(g, r):  # scales / zero terms: [N, G] row-major, [N/R, G, R] interleaved
        return builder.add(builder.mul(builder.add(builder.mul(blk, n_groups), g), _i64(R)), _i64(r))

    def out_store(m, r, val):
        idx = builder.add(builder.mul(builder.add(m0, _i64(m)), orow),
                          builder.add(builder.mul(blk, _i64(R)), _i64(r)))
        builder.store(val, builder.gep(optr, [idx]))

    block_cb = cb * (R if cf.kind == "il" else 1)  # bytes of one chunk across the rows read together
    per_line = max(1, LINE // block_cb)

    def _prefetch_chunk(c, u):
        if u % per_line:
            return
        base = chunk_off(c, 0)
        for i in range(0, block_cb, LINE):
            _prefetch(builder, cptr, builder.add(base, _i64(i)))

    def groups(run_group):
        if cf.cpg:  # whole groups: a compile-time number of chunks each
            with cgutils.for_range(builder, g_full) as gl:
                g = gl.index
                run_group(g, builder.mul(g, _i64(cf.cpg)), cf.cpg, None)
        has_last = builder.icmp_unsigned("!=", last, _i64(0))
        with builder.if_then(has_last):
            run_group(g_full, builder.mul(g_full, _i64(cf.cpg)), 0, last)

    mask = (1 << cf.bits) - 1
    code_table = ir.Constant(f32v, [float(j & mask) for j in range(vl)]) if cf.lut else None
    if cf.mode == "v":
        tot = [cgutils.alloca_once_value(builder, zero) for _ in range(R)]
        acc = [[cgutils.alloca_once(builder, f32v) for _ in range(_NA_V)] for _ in range(R)]

        def run_group(g, c0, cnt, cnt_rt):
            for r in range(R):
                for a in acc[r]:
                    builder.store(zero, a)

            def body(c, u):
                _prefetch_chunk(c, u)
                xv = [_vload(builder, xptr, x_off(0, t, c), f32v) for t in range(p)]
                for r in range(R):
                    qs = _unpack(builder, cf, cptr, chunk_off(c, r), code_table)
                    for t in range(p):
                        a = acc[r][(u * p + t) % _NA_V]
                        builder.store(_vfma(builder, qs[t], xv[t], builder.load(a)), a)

            _emit_chunk_loop(builder, c0, cnt, cnt_rt, body)
            for r in range(R):
                s = builder.load(builder.gep(sptr, [sb_index(g, r)]))
                vals = [builder.load(a) for a in acc[r]]
                ssum = builder.fadd(builder.fadd(vals[0], vals[1], flags=("fast",)),
                                    builder.fadd(vals[2], vals[3], flags=("fast",)), flags=("fast",))
                builder.store(_vfma(builder, _splat(builder, s, vl), ssum, builder.load(tot[r])), tot[r])

        groups(run_group)
        for r in range(R):
            out_store(0, r, _hsum(builder, builder.load(tot[r])))
        return

    # "d": dequantize each unpacked vector once (w = q*s + b), use it for MT activation rows; RP rows of
    # the block per pass share every activation load
    mt, rp = cf.mt, cf.rp
    na = max(1, 4 // (mt * rp))
    for r0 in range(0, R, rp):
        rs = list(range(r0, r0 + rp))
        acc = {(r, m): [cgutils.alloca_once_value(builder, zero) for _ in range(na)] for r in rs for m in range(mt)}

        def run_group(g, c0, cnt, cnt_rt, rs=rs, acc=acc):
            sv = {r: _splat(builder, builder.load(builder.gep(sptr, [sb_index(g, r)])), vl) for r in rs}
            bv = {r: _splat(builder, builder.load(builder.gep(bptr, [sb_index(g, r)])), vl) for r in rs}

            tables = {r: _vfma(builder, code_table, sv[r], bv[r]) for r in rs} if cf.lut else {}

            def body(c, u):
                if rs[0] == 0:
                    _prefetch_chunk(c, u)
                if cf.lut:  # the table holds (j - z) * s: lookups are dequantized weights
                    ws = {r: _unpack(builder, cf, cptr, chunk_off(c, r), tables[r]) for r in rs}
                else:
                    qs = {r: _unpack(builder, cf, cptr, chunk_off(c, r)) for r in rs}
                    ws = {r: [_vfma(builder, q, sv[r], bv[r]) for q in qs[r]] for r in rs}
                for t in range(p):
                    w = {r: ws[r][t] for r in rs}
                    for m in range(mt):
                        xv = _vload(builder, xptr, x_off(m, t, c), f32v)
                        for r in rs:
                            a = acc[(r, m)][(u * p + t) % na]
                            builder.store(_vfma(builder, w[r], xv, builder.load(a)), a)

            _emit_chunk_loop(builder, c0, cnt, cnt_rt, body)

        groups(run_group)
        for r in rs:
            for m in range(mt):
                v = builder.load(acc[(r, m)][0])
                for a in acc[(r, m)][1:]:
                    v = builder.fadd(v, builder.load(a), flags=("fast",))
                out_store(m, r, _hsum(builder, v))


@intrinsic
def _tile(typingctx, codes, s, b, xs, out, dims, blk, m0, cfg):
    """One block of rows (and one tile of activation rows): see :func:`_emit_tile`."""
    if not isinstance(cfg, types.StringLiteral):
        return None
    cf = _Conf.parse(cfg.literal_value)
    sig = types.void(codes, s, b, xs, out, dims, blk, m0, cfg)

    def codegen(context, builder, signature, args):
        _emit_tile(context, builder, signature, args, cf)
        return context.get_dummy_value()

    return sig, codegen


# ------------------------------------------------------------------------------ drivers
@njit(inline="always")
def _code_at(row, k, bits):
    pos = k * bits
    i = pos >> 3
    sh = pos & 7
    v = np.int64(row[i])
    if sh + bits > 8:
        v |= np.int64(row[i + 1]) << 8
    return (v >> sh) & ((1 << bits) - 1)


@njit(fastmath=True, cache=True)
def _prep_x(x, kind, p, xlen, gs, n_groups, kvec):
    """Activations in the kernel's order, and per-group sums over the vector-processed part.

    Row-major: ``xs[m, t, j] = x[m, p*j + t]`` (p streams of ``xlen``). Interleaved: ``xs[m, :K]`` padded
    with zeros to ``xlen``. ``xsum[m, g]`` sums ``x[m, k]`` for ``k < kvec`` in group ``g``.
    """
    m_rows, k = x.shape
    if kind == 0:
        xs = np.zeros((m_rows, p, xlen), np.float32)
        for m in range(m_rows):
            for kk in range(k):
                xs[m, kk % p, kk // p] = x[m, kk]
    else:
        xs = np.zeros((m_rows, 1, xlen), np.float32)
        for m in range(m_rows):
            for kk in range(k):
                xs[m, 0, kk] = x[m, kk]
    xsum = np.zeros((m_rows, n_groups), np.float32)
    for m in range(m_rows):
        for kk in range(min(k, kvec)):
            xsum[m, kk // gs] += x[m, kk]
    return xs, xsum


@njit(parallel=True, fastmath=True, cache=True)
def _linear(codes, s, b, x, y, dims, meta, c_v, c_8, c_4, c_2, c_1):
    """y[:, :NB*R] = x @ W.T for one weight; ``meta`` as :meth:`NumbaPrepared.meta`; ``c_*`` are the
    kernel configurations (literals). The activations are put in the kernel's order here, in the same
    call: a quantized linear of a small model costs a few microseconds, and a second call into Numba
    (its argument checks) was a third of that."""
    c_v = literally(c_v)
    c_8 = literally(c_8)
    c_4 = literally(c_4)
    c_2 = literally(c_2)
    c_1 = literally(c_1)
    xs, xsum = _prep_x(x, meta[0], meta[1], meta[2], meta[3], meta[4], meta[5])
    rows = meta[6]
    bits = meta[7]
    tail0 = meta[8]
    nb = codes.shape[0]
    m_rows = y.shape[0]
    n_groups = xsum.shape[1]
    k = x.shape[1]
    for ib in prange(nb):
        if m_rows == 1:
            _tile(codes, s, b, xs, y, dims, ib, 0, c_v)
            for r in range(rows):
                acc = np.float32(0.0)
                for g in range(n_groups):
                    acc += b[ib, g * rows + r] * xsum[0, g]
                y[0, ib * rows + r] += acc
        else:
            m0 = 0
            while m0 < m_rows:
                left = m_rows - m0
                if left >= 8:
                    _tile(codes, s, b, xs, y, dims, ib, m0, c_8)
                    m0 += 8
                elif left >= 4:
                    _tile(codes, s, b, xs, y, dims, ib, m0, c_4)
                    m0 += 4
                elif left >= 2:
                    _tile(codes, s, b, xs, y, dims, ib, m0, c_2)
                    m0 += 2
                else:
                    _tile(codes, s, b, xs, y, dims, ib, m0, c_1)
                    m0 += 1
        if tail0 < k:  # row-major only: codes past the last whole chunk, all in the last group
            sv = s[ib, n_groups - 1]
            bv = b[ib, n_groups - 1]
            row = codes[ib]
            for kk in range(tail0, k):
                w = np.float32(_code_at(row, kk, bits)) * sv + bv
                for m in range(m_rows):
                    y[m, ib] += w * x[m, kk]


@njit(inline="always")
def _dequant_row(row, srow, brow, orow, k, bits, gs):
    """One row-major row into ``orow``, group by group: int8, int4 and int2 a byte at a time with
    their shifts spelled out, over slices indexed from 0 (so Numba can drop its negative-index checks
    and the loop vectorizes: 6-10x faster than code by code; the prefill path dequantizes every weight
    it meets); int3 and a partial last byte code by code."""
    per = 8 // bits if bits != 3 else 0  # codes per byte
    for g in range((k + gs - 1) // gs):
        k0 = g * gs
        k1 = min(k, k0 + gs)
        sv = srow[g]
        bv = brow[g]
        kb = k0
        if per > 0:  # k0 is a whole number of bytes in (groups are whole chunks)
            nb = (k1 - k0) // per
            r = row[k0 // per:k0 // per + nb]
            o = orow[k0:k0 + nb * per]
            if bits == 8:
                for i in range(nb):
                    o[i] = np.float32(r[i]) * sv + bv
            elif bits == 4:
                for i in range(nb):
                    v = r[i]
                    o[2 * i] = np.float32(v & 15) * sv + bv
                    o[2 * i + 1] = np.float32(v >> 4) * sv + bv
            else:
                for i in range(nb):
                    v = r[i]
                    o[4 * i] = np.float32(v & 3) * sv + bv
                    o[4 * i + 1] = np.float32((v >> 2) & 3) * sv + bv
                    o[4 * i + 2] = np.float32((v >> 4) & 3) * sv + bv
                    o[4 * i + 3] = np.float32(v >> 6) * sv + bv
            kb = k0 + nb * per
        for kk in range(kb, k1):
            orow[kk] = np.float32(_code_at(row, kk, bits)) * sv + bv


@njit(inline="always")
def _dequant_il_row(blkc, s, b, ib, r, orow, k, rows, bits, lanes, p, cb, gs, wb, words):
    """Row ``r`` of interleaved block ``ib`` into ``orow``, chunk by chunk: its lanes' words once, then
    code t of every lane (a contiguous run). ``words``: scratch of ``lanes`` int64."""
    mask = (1 << bits) - 1
    chunk = lanes * p
    for c in range((k + chunk - 1) // chunk):
        base = (c * rows + r) * cb
        for lane in range(lanes):
            w = np.int64(0)
            if bits == 3:  # byte planes
                w = (np.int64(blkc[base + lane]) | (np.int64(blkc[base + lanes + lane]) << 8)
                     | (np.int64(blkc[base + 2 * lanes + lane]) << 16))
            else:
                for i in range(wb):
                    w |= np.int64(blkc[base + lane * wb + i]) << (8 * i)
            words[lane] = w
        k0 = c * chunk
        g = k0 // gs  # a chunk never straddles a group
        sv = s[ib, g * rows + r]
        bv = b[ib, g * rows + r]
        if k0 + chunk <= k:
            o = orow[k0:k0 + chunk]
            for t in range(p):
                ot = o[t * lanes:(t + 1) * lanes]
                for lane in range(lanes):
                    ot[lane] = np.float32((words[lane] >> (t * bits)) & mask) * sv + bv
        else:  # the row's last chunk, padded past k
            for t in range(p):
                for lane in range(lanes):
                    kk = k0 + t * lanes + lane
                    if kk < k:
                        orow[kk] = np.float32((words[lane] >> (t * bits)) & mask) * sv + bv


@njit(inline="always")
def _dequant_any_row(codes, s, b, n_, orow, kind, rows, bits, lanes, p, cb, gs, wb):
    """Row ``n_`` of the weight, in any layout, into fp32 ``orow``."""
    k = orow.shape[0]
    if kind == 0:
        _dequant_row(codes[n_], s[n_], b[n_], orow, k, bits, gs)
    else:
        _dequant_il_row(codes[n_ // rows], s, b, n_ // rows, n_ % rows, orow, k, rows, bits, lanes, p, cb,
                        gs, wb, np.empty(lanes, np.int64))


@njit(parallel=True, fastmath=True, cache=True)
def _dequant(codes, s, b, out, kind, rows, bits, lanes, p, cb, gs, wb):
    """Dense fp32 weight ``out[N, K]`` from any layout (the prefill path)."""
    for n_ in prange(out.shape[0]):
        _dequant_any_row(codes, s, b, n_, out[n_], kind, rows, bits, lanes, p, cb, gs, wb)


@njit(parallel=True, fastmath=True, cache=True)
def _dequant_bf16(codes, s, b, out, kind, rows, bits, lanes, p, cb, gs, wb):
    """:func:`_dequant` rounded to bf16 in the same pass: ``out[N, K]`` holds bf16 bit patterns
    (uint16). Each row is computed in fp32 into a scratch row (in L1) and rounded to nearest even, as
    torch rounds fp32 to bf16; a separate conversion of the fp32 weight cost twice the dequantization."""
    n, k = out.shape
    for n_ in prange(n):
        tmp = np.empty(k, np.float32)
        _dequant_any_row(codes, s, b, n_, tmp, kind, rows, bits, lanes, p, cb, gs, wb)
        u = tmp.view(np.uint32)
        o = out[n_]
        for i in range(k):
            v = u[i]
            o[i] = np.uint16((v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(inline="always")
def _prep_x_into(x, kind, p, xlen, gs, kvec, xs, xsum):
    """:func:`_prep_x` for one activation row ``x[0]`` into preallocated ``xs[0]``/``xsum[0]``."""
    k = x.shape[1]
    xs[0, :, :] = 0.0
    xsum[0, :] = 0.0
    if kind == 0:
        for kk in range(k):
            xs[0, kk % p, kk // p] = x[0, kk]
    else:
        for kk in range(k):
            xs[0, 0, kk] = x[0, kk]
    for kk in range(min(k, kvec)):
        xsum[0, kk // gs] += x[0, kk]


@njit(inline="always")
def _gemv_rows(codes, s, b, xs, xsum, x, y, dims, rows, bits, tail0, ib0, ib1, c_v):
    """Row blocks ``ib0 .. ib1`` of one GEMV (one activation row) into ``y[0]``."""
    n_groups = xsum.shape[1]
    k = x.shape[1]
    for ib in range(ib0, ib1):
        _tile(codes, s, b, xs, y, dims, ib, 0, c_v)
        for r in range(rows):
            acc = np.float32(0.0)
            for g in range(n_groups):
                acc += b[ib, g * rows + r] * xsum[0, g]
            y[0, ib * rows + r] += acc
        if tail0 < k:
            sv = s[ib, n_groups - 1]
            bv = b[ib, n_groups - 1]
            row = codes[ib]
            for kk in range(tail0, k):
                y[0, ib] += (np.float32(_code_at(row, kk, bits)) * sv + bv) * x[0, kk]


MOE_BLOCKS = 32  # row blocks per work item of the MoE kernel


@njit(parallel=True, fastmath=True, cache=True)
def _moe_decode(x, idx, wts, gu_codes, gu_s, gu_b, dn_codes, dn_s, dn_b, gu_dims, dn_dims,
                gu_meta, dn_meta, inter, out, c_gu, c_dn):
    """Selected experts of one layer: every (token, slot) pair is a GEMV through gate_up, SiLU*up, and a
    GEMV through down; the weighted sum goes to ``out``. Work items are (pair, 32 row blocks), so all
    threads stream every expert matrix together whatever the number of pairs.

    ``*_meta`` = (kind, p, xlen, group, n_groups, kvec, rows, bits, tail0, n_padded).
    """
    c_gu = literally(c_gu)
    c_dn = literally(c_dn)
    t_rows, top = idx.shape
    n_pairs = t_rows * top
    n_exp = len(gu_codes)
    gu_nb = gu_codes[0].shape[0]
    dn_nb = dn_codes[0].shape[0]
    h = np.zeros((n_pairs, 1, gu_meta[9]), np.float32)
    o = np.zeros((n_pairs, 1, dn_meta[9]), np.float32)
    a = np.zeros((n_pairs, 1, inter), np.float32)
    xs_gu = np.zeros((t_rows, 1, gu_meta[1], gu_meta[2]), np.float32)
    xsum_gu = np.zeros((t_rows, 1, gu_meta[4]), np.float32)
    xs_dn = np.zeros((n_pairs, 1, dn_meta[1], dn_meta[2]), np.float32)
    xsum_dn = np.zeros((n_pairs, 1, dn_meta[4]), np.float32)
    for t in prange(t_rows):
        _prep_x_into(x[t:t + 1], gu_meta[0], gu_meta[1], gu_meta[2], gu_meta[3], gu_meta[5], xs_gu[t], xsum_gu[t])
    items = (gu_nb + MOE_BLOCKS - 1) // MOE_BLOCKS
    for it in prange(n_pairs * items):
        pr = it // items
        t = pr // top
        e = idx[t, pr % top]
        if e < 0 or e >= n_exp:
            continue
        ib0 = (it % items) * MOE_BLOCKS
        _gemv_rows(gu_codes[e], gu_s[e], gu_b[e], xs_gu[t], xsum_gu[t], x[t:t + 1], h[pr], gu_dims, gu_meta[6],
                   gu_meta[7], gu_meta[8], ib0, min(ib0 + MOE_BLOCKS, gu_nb), c_gu)
    for pr in prange(n_pairs):
        for i in range(inter):
            gte = h[pr, 0, i]
            a[pr, 0, i] = gte / (np.float32(1.0) + np.exp(-gte)) * h[pr, 0, inter + i]
        _prep_x_into(a[pr], dn_meta[0], dn_meta[1], dn_meta[2], dn_meta[3], dn_meta[5], xs_dn[pr], xsum_dn[pr])
    items = (dn_nb + MOE_BLOCKS - 1) // MOE_BLOCKS
    for it in prange(n_pairs * items):
        pr = it // items
        t = pr // top
        e = idx[t, pr % top]
        if e < 0 or e >= n_exp:
            continue
        ib0 = (it % items) * MOE_BLOCKS
        _gemv_rows(dn_codes[e], dn_s[e], dn_b[e], xs_dn[pr], xsum_dn[pr], a[pr], o[pr], dn_dims, dn_meta[6],
                   dn_meta[7], dn_meta[8], ib0, min(ib0 + MOE_BLOCKS, dn_nb), c_dn)
    k_out = out.shape[1]
    for t in prange(t_rows):
        for j in range(top):
            e = idx[t, j]
            if e < 0 or e >= n_exp:
                continue
            wv = wts[t, j]
            pr = t * top + j
            for i in range(k_out):
                out[t, i] += wv * o[pr, 0, i]


# ------------------------------------------------------------------------------ compiled entry points
_ENTRY: dict = {}
_ENTRY_LOCK = threading.Lock()


def _entry(dispatcher, args: tuple, literals: tuple):
    """The compiled entry point of ``dispatcher`` for ``args`` followed by the string ``literals``.

    Compiles (or loads from the on-disk cache) without running; later calls go straight to the
    machine code and skip Numba's argument typing, which for literal-specialized functions costs
    milliseconds per call.
    """
    argtys = tuple(numba.typeof(a) for a in args) + tuple(types.literal(s) for s in literals)
    key = (dispatcher.py_func.__name__, argtys)
    ep = _ENTRY.get(key)
    if ep is None:
        with _ENTRY_LOCK:
            ep = _ENTRY.get(key)
            if ep is None:
                dispatcher.compile(argtys)
                ep = dispatcher.overloads[argtys].entry_point
                _ENTRY[key] = ep
    return ep


# ------------------------------------------------------------------------------ prepared weights
@dataclass
class NumbaPrepared:
    """A quantized weight laid out for these kernels (made once, at apply time)."""

    spec: QuantSpec
    layout: str
    n: int
    k: int
    bits: int
    kind: int  # 0 row-major, 1 interleaved
    rows: int
    lanes: int
    word: int  # bits of one lane word
    group: int
    n_groups: int
    cpg: int
    codes: np.ndarray  # 2-D: [N, row_bytes] or [N/R, K/C * R * CB]
    s: np.ndarray  # fp32 [N/R, G*R]
    b: np.ndarray  # fp32 [N/R, G*R], -zero * scale
    dims: np.ndarray  # int64 [N_DIMS]
    xlen: int
    kvec: int  # codes per row handled by the vector loop
    tail0: int  # first code of the scalar tail (== k when there is none)
    confs: tuple[str, ...] = field(default=())
    source_nbytes: int = 0
    entry: object = field(default=None, repr=False, compare=False)  # compiled driver, set on first call

    @property
    def n_padded(self) -> int:
        return self.codes.shape[0] * self.rows

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.s.nbytes + self.b.nbytes

    @cached_property
    def meta(self) -> np.ndarray:
        """The kernels' scalars as one int64 array, made once: (kind, p, xlen, group, n_groups, kvec,
        rows, bits, tail0, n_padded)."""
        return np.array([self.kind, L.codes_per_lane(self.bits, self.word), self.xlen, self.group, self.n_groups,
                         self.kvec,
                         self.rows, self.bits, self.tail0, self.n_padded], dtype=np.int64)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[N, K]``, computed in fp32 and rounded once to ``dtype`` (the prefill path; fp32 is
        also what the tests compare against)."""
        _threads()
        bf16 = dtype == torch.bfloat16
        out = np.empty((self.n, self.k), np.uint16 if bf16 else np.float32)
        args = (self.codes, self.s, self.b, out, self.kind, self.rows, self.bits, self.lanes,
                L.codes_per_lane(self.bits, self.word), L.chunk_bytes(self.bits, self.lanes, self.word), self.group,
                self.word // 8)
        if bf16:
            _dequant_bf16(*args)
            return torch.from_numpy(out).view(torch.bfloat16)
        _dequant(*args)
        w = torch.from_numpy(out)
        return w if dtype == torch.float32 else w.to(dtype)


USE_LUT = os.environ.get("CIUIC_NUMBA_LUT", "1") != "0"  # table-lookup unpack where AVX-512 has vpermps
_AVX512: bool | None = None


def _target_has_avx512() -> bool:
    """Whether Numba compiles for a CPU with AVX-512F (its target features, else the host's)."""
    global _AVX512
    if _AVX512 is None:
        feats = ""
        try:
            from numba.core.registry import cpu_target

            feats = cpu_target.target_context.codegen()._tm_features
        except Exception:
            try:
                import llvmlite.binding as ll

                feats = ll.get_host_cpu_features().flatten()
            except Exception:
                feats = ""
        _AVX512 = "+avx512f" in feats.split(",")
    return _AVX512


ACC_BUDGET = 16  # vector accumulators a GEMM tile may keep live (AVX-512 has 32 registers)


def _rows_per_pass(rows: int, mt: int) -> int:
    """Rows of a block that share each activation load in a GEMM tile of ``mt`` rows."""
    rp = rows
    while rp > 1 and (rows % rp or rp * mt > ACC_BUDGET):
        rp -= 1
    return rp


def _stream_len(n: int) -> int:
    """Length of one activation stream: whole cache lines plus one, so that the P streams (and the batch
    rows) of a call do not all start on the same L1 set (a 2 KiB stride would alias them)."""
    return -(-n // 16) * 16 + 16


def _spec_ok(spec: QuantSpec) -> bool:
    return (not spec.keep) and spec.format == "int" and spec.bits in BITS


def prepare(qt: QTensor, layout: str = L.ROWMAJOR) -> NumbaPrepared:
    """Lay ``qt`` out for the kernels (row-major: no copy of the codes)."""
    if not isinstance(qt, QTensor):
        raise KernelError(f"prepare expects a QTensor, got {type(qt).__name__}")
    if not _spec_ok(qt.spec):
        raise KernelError(f"the numba backend takes int formats with bits {', '.join(map(str, BITS))}; "
                          f"got {qt.spec.label()}")
    if len(qt.shape) != 2:
        raise KernelError(f"prepare expects one weight [N, K]; got shape {tuple(qt.shape)} (index a bank first)")
    if qt.codes.device.type != "cpu":
        raise KernelError(f"the numba backend runs on the CPU; the weight is on {qt.codes.device}")
    lay = L.parse(layout)
    n, k, bits = qt.n, qt.k, qt.spec.bits
    gs = min(qt.group_size, k)
    n_groups = -(-k // gs)
    pick = L.pick_lanes(bits, gs, k)
    if pick is None:
        raise KernelError(f"group size {gs} is not a multiple of {L.chunk_codes(bits, 4)} codes; the numba "
                          f"backend takes int{bits} groups that are multiples of {L.chunk_codes(bits, 4)}")
    lanes, word = pick
    p = L.codes_per_lane(bits, word)
    chunk = lanes * p
    lut = int(USE_LUT and lanes == 16 and bits in (2, 3, 4) and _target_has_avx512())
    cpg = gs // chunk if n_groups > 1 else 0
    scales = qt.group_scales().to(torch.float32).reshape(n, -1)
    zeros = qt.group_zeros().to(torch.float32).reshape(n, -1)
    if scales.shape[1] != n_groups:  # per-tensor: one value for every row
        scales = scales.expand(n, n_groups)
        zeros = zeros.expand(n, n_groups)
    s = scales.contiguous().numpy()
    b = (-zeros * scales).contiguous().numpy()
    if lay.kind == L.ROWMAJOR:
        rows = 1
        codes = np.ascontiguousarray(qt.codes.detach().numpy())
        nfull = k // chunk
        kvec = nfull * chunk
        xlen = _stream_len(-(-k // p))
        cstride = codes.shape[1]
        kind = 0
        s2, b2 = np.ascontiguousarray(s), np.ascontiguousarray(b)
    else:
        rows = lay.rows
        blocks = L.to_layout(qt.codes, bits, k, layout, lanes, word)  # [NB, NC, R, CB]
        nfull = blocks.shape[1]
        codes = blocks.reshape(blocks.shape[0], -1)
        kvec = k
        xlen = _stream_len(nfull * chunk)
        cstride = codes.shape[1]
        kind = 1
        s2 = L.block_rows(s, rows).reshape(codes.shape[0], -1)
        b2 = L.block_rows(b, rows).reshape(codes.shape[0], -1)
    if n_groups > 1:
        g_full = min(n_groups, nfull // cpg)
        last = nfull - g_full * cpg
    else:
        g_full, last = 0, nfull
    dims = np.zeros(N_DIMS, np.int64)
    dims[D_G], dims[D_GFULL], dims[D_LAST] = n_groups, g_full, last
    dims[D_CSTRIDE], dims[D_XSTREAM] = cstride, xlen
    dims[D_XROW] = p * xlen if kind == 0 else xlen
    dims[D_OROW] = codes.shape[0] * rows
    kind_s = "rm" if kind == 0 else "il"
    confs = (_Conf("v", bits, kind_s, rows, lanes, cpg, 1, 1, word, lut).key(),) + tuple(
        _Conf("d", bits, kind_s, rows, lanes, cpg, mt, _rows_per_pass(rows, mt), word, lut).key() for mt in TILES)
    return NumbaPrepared(qt.spec, layout, n, k, bits, kind, rows, lanes, word, gs, n_groups, cpg, codes,
                         np.ascontiguousarray(s2, dtype=np.float32), np.ascontiguousarray(b2, dtype=np.float32),
                         dims, xlen, kvec, k if kind == 1 else kvec, confs, qt.nbytes)


# ------------------------------------------------------------------------------ threads
_THREADS: int | None = None
_THREAD_STATE = threading.local()  # numba's thread count is per calling thread


def _threads() -> int:
    """Cap Numba's threads at the CPUs this process may use (affinity, cgroup quota)."""
    global _THREADS
    if _THREADS is None:
        from .compat import usable_cpus

        _THREADS = max(1, min(usable_cpus(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_THREAD_STATE, "n", None) != _THREADS:
        numba.set_num_threads(_THREADS)
        _THREAD_STATE.n = _THREADS
    return _THREADS


def set_threads(n: int | None) -> int:
    """Use ``n`` threads for the kernels (``None``: back to the usable CPUs); returns the count in force."""
    global _THREADS
    if numba is None:
        raise KernelError(f"the numba backend is not available here: {_IMPORT_ERROR}")
    top = numba.config.NUMBA_NUM_THREADS
    if n is not None and not 1 <= int(n) <= top:
        raise KernelError(f"threads must be between 1 and {top} (numba's pool); got {n}")
    _THREADS = None if n is None else int(n)
    _THREAD_STATE.n = None
    return _threads()


# ------------------------------------------------------------------------------ the backend
BF16_GEMM_MACS = 1 << 23  # below this many multiply-adds, oneDNN's bf16 GEMM cost more than fp32's
_BF16_GEMM: bool | None = None  # whether oneDNN has a bf16 GEMM here (asked once)


def gemm_dtype(dtype: torch.dtype, macs: int | None = None) -> torch.dtype:
    """The dtype the prefill path's GEMM runs in for activations of ``dtype`` (a product of ``macs``
    multiply-adds): bf16 stays bf16 where oneDNN has a bf16 GEMM (AVX-512 BF16 or AMX: 2.5-4.7x
    fp32's speed on a 2-core Sapphire Rapids at 256 rows), as torch's own bf16 linear does, unless the
    product is small (33-64 rows of a 512x128 weight: 10-17 us slower than fp32, a fixed cost of
    the bf16 call); everything else runs in fp32."""
    global _BF16_GEMM
    if dtype != torch.bfloat16 or (macs is not None and macs < BF16_GEMM_MACS):
        return torch.float32
    if _BF16_GEMM is None:
        try:
            _BF16_GEMM = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _BF16_GEMM = False
    return torch.bfloat16 if _BF16_GEMM else torch.float32


def _check_x(x: torch.Tensor, k: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise KernelError(f"activations must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise KernelError(f"the numba backend runs on the CPU; activations are on {x.device}")
    if x.dim() != 2 or x.shape[1] != k:
        raise KernelError(f"activations must be [M, {k}]; got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise KernelError(f"activations must be float32, bfloat16 or float16; got {x.dtype}")
    if not x.is_contiguous():
        raise KernelError("activations must be contiguous (call .contiguous() first)")


class NumbaCPU:
    """Weight-only quantized linears on the CPU, in Numba; see the module docstring."""

    name = "numba"
    device = "cpu"
    priority = 10
    layouts = L.LAYOUTS

    def __init__(self):
        self._avail: tuple[bool, str] | None = None
        self._moe_cache: OrderedDict = OrderedDict()

    # -- registry protocol
    def available(self) -> tuple[bool, str]:
        if self._avail is None:
            if numba is None:
                self._avail = (False, _IMPORT_ERROR)
            else:
                self._avail = (True, f"numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads max, "
                                     f"cache {numba.config.CACHE_DIR or 'beside the sources'}")
        return self._avail

    def supports(self, spec: QuantSpec, layout: str, batch: int) -> bool:
        if not _spec_ok(spec) or layout not in self.layouts or batch < 1:
            return False
        if isinstance(spec.group, int):
            # the group must be a whole number of 4-lane chunks (larger-than-row groups are one group)
            return spec.group % L.chunk_codes(spec.bits, 4) == 0
        return True

    def prepare(self, qt: QTensor, layout: str = L.ROWMAJOR) -> NumbaPrepared:
        return prepare(qt, layout)

    def linear(self, x: torch.Tensor, prepared: NumbaPrepared, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(prepared, NumbaPrepared):
            raise KernelError(f"the numba backend takes weights made by its prepare(); got {type(prepared).__name__}")
        _check_x(x, prepared.k)
        if bias is not None and (bias.shape != (prepared.n,) or bias.device.type != "cpu"):
            raise KernelError(f"bias must be a CPU tensor of shape ({prepared.n},); got {tuple(bias.shape)} "
                              f"on {bias.device}")
        dtype = x.dtype
        if x.shape[0] > MAX_GEMM_ROWS:  # prefill: the dense weight through torch's GEMM
            return self._dense(x, prepared, dtype, bias).to(dtype)
        x32 = x if dtype == torch.float32 else x.to(torch.float32)  # (contiguous, as x is)
        y = self._run(x32, prepared)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y if dtype == torch.float32 else y.to(dtype)

    # -- internals
    def _run(self, x32: torch.Tensor, pw: NumbaPrepared) -> torch.Tensor:
        _threads()
        xn = x32.numpy()
        y = np.empty((xn.shape[0], pw.n_padded), np.float32)
        if pw.entry is None:
            pw.entry = _entry(_linear, (pw.codes, pw.s, pw.b, xn, y, pw.dims, pw.meta), pw.confs)
        pw.entry(pw.codes, pw.s, pw.b, xn, y, pw.dims, pw.meta, *pw.confs)
        out = torch.from_numpy(y)
        return out[:, : pw.n].contiguous() if pw.n_padded != pw.n else out

    def moe(self, x, top_k_index, top_k_weights, gate_up, down):
        """DeepseekV3Experts maths over the selected experts of one layer, in one call where it pays."""
        if any(p is None or not isinstance(p, NumbaPrepared) for p in list(gate_up) + list(down)):
            return NotImplemented
        g0, d0 = gate_up[0], down[0]
        if any(p.confs != g0.confs or p.n != g0.n or p.k != g0.k for p in gate_up) or any(
                p.confs != d0.confs or p.n != d0.n or p.k != d0.k for p in down):
            return NotImplemented
        _check_x(x, g0.k)
        if g0.n % 2 or d0.k * 2 != g0.n or d0.n != g0.k:
            raise KernelError(f"gate_up must be [2I, K] and down [K, I]; got [{g0.n}, {g0.k}] and [{d0.n}, {d0.k}]")
        if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0]:
            raise KernelError(f"top_k_index and top_k_weights must both be [T, k] with T = {x.shape[0]}; got "
                              f"{tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}")
        dtype = x.dtype
        t_rows, top = top_k_index.shape
        if t_rows * top > 4 * MAX_GEMM_ROWS:  # prefill: one batched product per expert
            return self._moe_loop(x, top_k_index, top_k_weights, gate_up, down)
        _threads()
        bank = self._bank(gate_up, down)
        x32 = x.to(torch.float32).contiguous().numpy()
        idx = top_k_index.to(torch.int64).contiguous().numpy()
        wts = top_k_weights.to(torch.float32).contiguous().numpy()
        out = np.zeros((t_rows, g0.k), np.float32)
        lists, eps = bank
        args = (x32, idx, wts, *lists, g0.dims, d0.dims, g0.meta, d0.meta, d0.k, out)
        lits = (g0.confs[0], d0.confs[0])
        ep = eps.get("decode")
        if ep is None:
            ep = eps["decode"] = _entry(_moe_decode, args, lits)
        ep(*args, *lits)
        return torch.from_numpy(out).to(dtype)

    def _moe_loop(self, x, idx, wts, gate_up, down):
        """Prefill: the (token, expert) pairs sorted by expert, gathered once, and one product per
        expert over its contiguous segment: the dense weight through torch's GEMM above
        MAX_GEMM_ROWS rows (in bf16 where that GEMM is fast), the tile kernels below. Each pair's
        output is weighted and summed per token in fp32."""
        n_e = len(gate_up)
        gd = gemm_dtype(x.dtype)
        top = idx.shape[1]
        flat = idx.reshape(-1).to(torch.int64)
        flat = torch.where((flat >= 0) & (flat < n_e), flat, n_e)  # ids outside the lists: a last, skipped segment
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n_e + 1).tolist()
        valid = len(order) - counts[n_e]
        order = order[:valid]
        tok = order // top
        xs = x.to(gd)[tok]
        out = torch.empty(valid, down[0].n, dtype=gd)
        start = 0
        for e in range(n_e):
            c = counts[e]
            if c:
                gate, up = self._product(xs[start:start + c], gate_up[e], x.dtype, gd).chunk(2, dim=-1)
                out[start:start + c] = self._product(torch.nn.functional.silu(gate) * up, down[e], x.dtype, gd)
                start += c
        final = torch.zeros(x.shape, dtype=torch.float32)
        final.index_add_(0, tok, out.to(torch.float32) * wts.reshape(-1)[order].to(torch.float32)[:, None])
        return final.to(x.dtype)

    def _product(self, x: torch.Tensor, pw: NumbaPrepared, act: torch.dtype, gd: torch.dtype) -> torch.Tensor:
        """``x @ W.T`` for one expert's segment ``x`` (in ``gd``, checked by the caller), returned in
        ``gd``; ``act``: the layer's activation dtype."""
        if x.shape[0] > MAX_GEMM_ROWS:
            return self._dense(x, pw, act).to(gd)
        y = self._run(x.to(torch.float32).contiguous(), pw)
        return y if gd == torch.float32 else y.to(gd)

    @staticmethod
    def _dense(x: torch.Tensor, pw: NumbaPrepared, act: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The prefill product: the weight dequantized for torch's GEMM, in :func:`gemm_dtype` for
        activations of ``act`` (the result stays in that dtype)."""
        g = gemm_dtype(act, x.shape[0] * pw.n * pw.k)
        return torch.nn.functional.linear(x.to(g), pw.dequantize(g), None if bias is None else bias.to(g))

    def _bank(self, gate_up, down):
        key = tuple(id(p) for p in gate_up) + (None,) + tuple(id(p) for p in down)
        hit = self._moe_cache.get(key)
        if hit is not None:
            self._moe_cache.move_to_end(key)
            return hit[0], hit[2]
        lists = []
        for group in (gate_up, down):
            for attr in ("codes", "s", "b"):
                tl = TypedList()
                for p in group:
                    tl.append(getattr(p, attr))
                lists.append(tl)
        eps: dict = {}
        # The entry holds the banks' arrays but not the prepared weights: when any of them dies (the
        # plan moved on, the session's cache evicted it) the entry goes too, so this cache never keeps
        # quantized weights alive beyond their owners.
        self._moe_cache[key] = (tuple(lists), None, eps)
        for p in {id(p): p for p in list(gate_up) + list(down)}.values():
            weakref.finalize(p, self._moe_cache.pop, key, None)
        while len(self._moe_cache) > 64:
            self._moe_cache.popitem(last=False)
        return tuple(lists), eps


NUMBA = NumbaCPU()
register(NUMBA)

__all__ = ["NUMBA", "NumbaCPU", "NumbaPrepared", "prepare", "set_threads", "MAX_GEMM_ROWS"]
