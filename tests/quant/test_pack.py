import pytest
import torch

from ciuic_lab.errors import CiuicError
from ciuic_lab.quant import pack, row_bytes, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 31, 128, 301])
def test_pack_unpack_identity(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 1 << bits, (3, 5, k), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, row_bytes(k, bits))
    assert torch.equal(unpack(packed, bits, k), codes)


def test_int4_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_int2_is_lowest_pair_first():
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [[0b00111001, 0xFF]]


def test_int3_packs_eight_codes_in_three_bytes():
    codes = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 5]], dtype=torch.uint8)
    # bits 0-2 = 7, bits 21-23 = 5 -> 0xA00007 little-endian
    assert pack(codes, 3).tolist() == [[0x07, 0x00, 0xA0]]
    assert row_bytes(8, 3) == 3 and row_bytes(9, 3) == 6


def test_rows_are_independent():
    codes = torch.randint(0, 16, (4, 13), dtype=torch.uint8)
    packed = pack(codes, 4)
    assert torch.equal(unpack(packed[2:3], 4, 13), codes[2:3])


def test_bad_inputs():
    with pytest.raises(CiuicError, match="uint8"):
        pack(torch.zeros(2, 8, dtype=torch.int32), 4)
    with pytest.raises(CiuicError, match="bytes"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)
