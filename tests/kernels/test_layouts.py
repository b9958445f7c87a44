"""Layouts: exact repacking both ways, against quant.pack's row-major bytes."""

import numpy as np
import pytest
import torch

from ciuic_lab.errors import KernelError
from ciuic_lab.kernels import layouts as L
from ciuic_lab.quant import pack, unpack


def _codes(n, k, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k", [(1, 8), (7, 37), (5, 200), (33, 129)])
def test_rowmajor_mirror_of_quant_pack(bits, n, k):
    q = _codes(n, k, bits, seed=bits * 100 + k)
    packed = pack(q, bits)
    assert np.array_equal(L.pack_rowmajor(q, bits), packed.numpy())
    assert np.array_equal(L.unpack_rowmajor(packed, bits, k), q.numpy())


@pytest.mark.parametrize("bits,word", [(2, 8), (2, 16), (2, 32), (3, 24), (4, 8), (4, 16), (4, 32), (8, 8)])
@pytest.mark.parametrize("rows", [1, 4, 3])
@pytest.mark.parametrize("lanes", [16, 8, 4])
def test_interleaved_round_trip_exact(bits, word, rows, lanes):
    rng = np.random.default_rng(bits * 31 + rows * 7 + lanes + word)
    n, k = int(rng.integers(1, 40)), int(rng.integers(1, 300))
    q = _codes(n, k, bits, seed=int(rng.integers(1 << 30)))
    packed = pack(q, bits)
    lay = f"interleaved{rows}"
    data = L.to_layout(packed, bits, k, lay, lanes, word)
    nb, nc = -(-n // rows), -(-k // L.chunk_codes(bits, lanes, word))
    assert data.shape == (nb, nc, rows, L.chunk_bytes(bits, lanes, word))
    assert data.dtype == np.uint8
    assert np.array_equal(L.from_layout(data, bits, n, k, lay, word), packed.numpy())
    assert np.array_equal(L.deinterleave(data, bits, n, k, word), q.numpy())


def test_wide_lane_words_little_endian():
    """A 32-bit int4 lane word holds codes l, VL+l, ..., 7*VL+l in its nibbles, low nibble first."""
    vl = 4
    q = torch.randint(0, 16, (1, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    data = L.interleave(q, 4, rows=1, lanes=vl, word=32)[0, 0, 0]
    words = data.view("<u4")
    for lane in range(vl):
        for t in range(8):
            assert (int(words[lane]) >> (4 * t)) & 15 == int(q[0, t * vl + lane])


def test_interleaved_lane_major_bit_positions():
    """Byte l of a chunk holds codes l, VL+l, ... at bit offsets 0, bits, ... (int4: low nibble = code l)."""
    vl = 4
    q = torch.arange(16, dtype=torch.uint8).reshape(2, 8) % 16  # rows 0..1, 8 codes = one int4 chunk at VL=4
    data = L.interleave(q, 4, rows=2, lanes=vl)  # [1 block, 1 chunk, 2 rows, 4 bytes]
    for r in range(2):
        for lane in range(vl):
            byte = int(data[0, 0, r, lane])
            assert byte & 0xF == int(q[r, lane])
            assert byte >> 4 == int(q[r, vl + lane])


def test_int3_planes():
    """int3: three planes; lane l's 24-bit word holds codes l + VL*t at bits 3t."""
    vl = 4
    q = torch.randint(0, 8, (1, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    data = L.interleave(q, 3, rows=1, lanes=vl)[0, 0, 0]
    for lane in range(vl):
        word = int(data[lane]) | int(data[vl + lane]) << 8 | int(data[2 * vl + lane]) << 16
        for t in range(8):
            assert (word >> (3 * t)) & 7 == int(q[0, t * vl + lane])


def test_padding_is_zero_codes():
    q = torch.full((3, 10), 15, dtype=torch.uint8)
    data = L.interleave(q, 4, rows=4, lanes=16)  # 1 block of 4 rows (one padded), 1 chunk of 32 codes
    back = L.deinterleave(data, 4, 4, 32)
    assert back[3].max() == 0 and back[:3, 10:].max() == 0 and back[:3, :10].min() == 15


def test_block_rows_round_trip():
    t = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    b = L.block_rows(t, 4)
    assert b.shape == (2, 3, 4)
    assert b[1, :, 3].tolist() == [0.0, 0.0, 0.0]
    assert np.array_equal(L.unblock_rows(b, 7), t)


def test_pick_lanes():
    """Widest vector first, then the widest lane word whose chunk divides the group."""
    assert L.pick_lanes(4, 128, 4096) == (16, 32)
    assert L.pick_lanes(2, 128, 4096) == (16, 16)
    assert L.pick_lanes(3, 128, 4096) == (16, 24)
    assert L.pick_lanes(8, 128, 4096) == (16, 8)
    assert L.pick_lanes(3, 64, 4096) == (8, 24)
    assert L.pick_lanes(2, 32, 4096) == (8, 8)
    assert L.pick_lanes(8, 4, 4096) == (4, 8)
    assert L.pick_lanes(3, 16, 4096) is None
    assert L.pick_lanes(4, 4096, 100) == (16, 32)  # one group per row


def test_names_and_errors():
    assert L.parse("rowmajor").kind == "rowmajor"
    assert L.parse("interleaved4").rows == 4
    for bad in ("blocked", "interleaved0", "interleaved9", "row-major"):
        with pytest.raises(KernelError, match="accepted"):
            L.parse(bad)
    with pytest.raises(KernelError, match="bits"):
        L.codes_per_lane(5)
    with pytest.raises(KernelError, match="lane words"):
        L.codes_per_lane(4, 24)
    with pytest.raises(KernelError, match="exceed"):
        L.interleave(np.full((2, 8), 16, np.uint8), 4, 1, 4)
    with pytest.raises(KernelError, match="uint8"):
        L.interleave(torch.zeros(2, 8, dtype=torch.int32), 4, 1, 4)
    with pytest.raises(KernelError, match="need"):
        L.unpack_rowmajor(np.zeros((2, 3), np.uint8), 4, 8)


def test_unpack_matches_quant_unpack_on_bank_rows():
    q = _codes(6, 77, 3, seed=9)
    assert np.array_equal(L.unpack_rowmajor(pack(q, 3), 3, 77), unpack(pack(q, 3), 3, 77).numpy())
