"""Dense bit packing of integer codes along the last dimension (row-major packed layout).

Each row is packed on its own, so rows (output channels) can be sliced without unpacking:

- the row's K codes are padded with zeros to a multiple of 8;
- each run of 8 codes becomes ``bits`` bytes: code ``i`` of the run occupies bits ``[i*bits, (i+1)*bits)``
  of a little-endian integer. For 4 bits that is "low nibble first", for 2 bits "lowest pair first",
  for 3 bits 8 codes in 3 bytes, for 8 bits plain bytes.

Kernels read this layout directly (the reference layout) or repack it into their own.
"""

from __future__ import annotations

import torch

from ..errors import CiuicError


def padded_len(k: int) -> int:
    return (k + 7) // 8 * 8


def row_bytes(k: int, bits: int) -> int:
    """Bytes one packed row of ``k`` codes takes."""
    return padded_len(k) * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., K]`` (each < 2**bits) into ``[..., row_bytes(K, bits)]`` uint8."""
    if codes.dtype != torch.uint8:
        raise CiuicError(f"pack expects uint8 codes, got {codes.dtype}")
    if not 1 <= bits <= 8:
        raise CiuicError(f"pack supports 1..8 bits, got {bits}")
    k = codes.shape[-1]
    kp = padded_len(k)
    if kp != k:
        codes = torch.nn.functional.pad(codes, (0, kp - k))
    if bits == 8:
        return codes.contiguous()
    lead = codes.shape[:-1]
    runs = codes.reshape(*lead, kp // 8, 8).to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (runs << shifts).sum(dim=-1)  # [..., kp/8], each < 2**(8*bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [..., kp/8, bits]
    return out.to(torch.uint8).reshape(*lead, kp // 8 * bits)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., row_bytes(k, bits)]`` uint8 back to ``[..., k]`` uint8 codes."""
    if packed.dtype != torch.uint8:
        raise CiuicError(f"unpack expects uint8 bytes, got {packed.dtype}")
    kp = padded_len(k)
    if packed.shape[-1] != kp * bits // 8:
        raise CiuicError(
            f"packed rows hold {packed.shape[-1]} bytes; {k} codes of {bits} bits need {kp * bits // 8}"
        )
    if bits == 8:
        return packed[..., :k]
    lead = packed.shape[:-1]
    by = packed.reshape(*lead, kp // 8, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (by << byte_shifts).sum(dim=-1)  # [..., kp/8]
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*lead, kp)[..., :k]
