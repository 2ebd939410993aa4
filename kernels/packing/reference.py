"""Pure-torch spec of compressed-tensors' int32 packing (ct >= 0.17 dense layout).

Signed codes ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` are offset to unsigned ``u = q + 2^(b-1)``
and laid along ``dim`` LSB-first: element ``i`` occupies bits ``[i*b, i*b + b)`` of the
row's bit stream, 32 bits per int32 word; a ragged last word is zero-padded. For 4 and 8
bits this equals the pre-0.17 layout (values never straddle words).
"""

from __future__ import annotations

import torch


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit packing is supported, got {bits}")


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack an int8 tensor of signed ``bits``-wide codes along ``dim`` into int32 words."""
    _check_bits(bits)
    per_word = 32 // bits
    x = q.movedim(dim, -1)
    length = x.shape[-1]
    words = -(-length // per_word)
    u = (x.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    if words * per_word != length:
        pad = u.new_zeros((*u.shape[:-1], words * per_word - length))
        u = torch.cat([u, pad], dim=-1)
    u = u.reshape(*u.shape[:-1], words, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=q.device) * bits
    packed = (u << shifts).sum(dim=-1)
    # Two's-complement wrap of the 32-bit word into int32 (a set top bit means negative).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.movedim(-1, dim)


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words -> int8 signed codes, ``length`` long."""
    _check_bits(bits)
    per_word = 32 // bits
    x = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
    u = (x.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    u = u.reshape(*x.shape[:-1], -1)[..., :length]
    return (u - (1 << (bits - 1))).to(torch.int8).movedim(-1, dim)
