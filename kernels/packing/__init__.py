"""Sub-byte integer packing into int32 words (compressed-tensors ``pack-quantized`` layout)."""

from .reference import pack_int32, unpack_int32

__all__ = ["pack_int32", "unpack_int32"]
