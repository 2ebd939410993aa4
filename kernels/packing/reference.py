"""Pure-torch spec of compressed-tensors' int32 packing (ct >= 0.17 dense layout).

Signed codes ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` are offset to unsigned ``u = q + 2^(b-1)``
and laid along ``dim`` LSB-first: element ``i`` occupies bits ``[i*b, i*b + b)`` of the
row's bit stream, 32 bits per int32 word; a ragged last word is zero-padded. For 4 and 8
bits this equals the pre-0.17 layout (values never straddle words).

On a little-endian host the words are built from bytes (two nibbles or one code per byte)
and reinterpreted as int32, which is the same bit stream without 64-bit arithmetic; the
shift-and-sum form below is the portable statement of the layout (and the big-endian path).
"""

from __future__ import annotations

import sys

import torch

LITTLE_ENDIAN = sys.byteorder == "little"


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit packing is supported, got {bits}")


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -x.shape[-1] % multiple
    if extra:
        x = torch.cat([x, x.new_zeros((*x.shape[:-1], extra))], dim=-1)
    return x.contiguous()


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack an int8 tensor of signed ``bits``-wide codes along ``dim`` into int32 words."""
    _check_bits(bits)
    per_word = 32 // bits
    x = q.movedim(dim, -1)
    if LITTLE_ENDIAN:
        if bits == 8:
            u = (x.view(torch.uint8) ^ 0x80)  # q + 128 (mod 256) for two's complement int8
            packed = _pad_last(u, 4).view(torch.int32)
        else:
            u = _pad_last((x + 8).view(torch.uint8), per_word)
            packed = (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous().view(torch.int32)
        return packed.movedim(-1, dim)
    u = _pad_last((x.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1), per_word)
    u = u.reshape(*u.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=q.device) * bits
    packed = (u << shifts).sum(dim=-1)
    # Two's-complement wrap of the 32-bit word into int32 (a set top bit means negative).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.movedim(-1, dim)


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words -> int8 signed codes, ``length`` long."""
    _check_bits(bits)
    per_word = 32 // bits
    x = packed.movedim(dim, -1).contiguous()
    if LITTLE_ENDIAN:
        b = x.view(torch.uint8)
        if bits == 8:
            return (b ^ 0x80).view(torch.int8)[..., :length].movedim(-1, dim)
        u = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*b.shape[:-1], -1)
        return (u[..., :length].view(torch.int8) - 8).movedim(-1, dim)
    x = x.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
    u = (x.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    u = u.reshape(*x.shape[:-1], -1)[..., :length]
    return (u - (1 << (bits - 1))).to(torch.int8).movedim(-1, dim)


def pack_int4_bytes(q: torch.Tensor) -> torch.Tensor:
    """The engine's int4 layout: ``[N, K]`` int8 codes in [-8, 7] -> ``[N, ceil(K/2)]`` uint8.

    Column ``2i`` goes in the low nibble of byte ``i`` and ``2i + 1`` in the high nibble, as
    two's-complement nibbles (a kernel sign-extends with two shifts); an odd K pads a zero.
    """
    u = _pad_last(q, 2).view(torch.uint8) & 0xF
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4_bytes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_bytes`: ``[N, ceil(K/2)]`` uint8 -> ``[N, K]`` int8."""
    low = (packed << 4).view(torch.int8) >> 4  # arithmetic shift sign-extends the nibble
    high = packed.view(torch.int8) >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :k].contiguous()
