"""QuantizedTensor: the one in-memory representation every scheme, format and engine shares.

Convention (torchao's): ``x ~= (qdata - zero_point) * scale``, with ``scale`` broadcast over
blocks of ``block_size`` (same rank as ``qdata``). Per-tensor, per-channel, group-wise and
128x128 block scales are all just block sizes: ``(N, K)``, ``(1, K)``, ``(1, g)``,
``(128, 128)``. Scales always multiply. ``qdata`` holds unpacked codes (int4 values live in
int8); packing into words is a format's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from q.kernels.numerics import ceil_div, expand_blocks


@dataclass(frozen=True)
class QuantizedTensor:
    qdata: torch.Tensor
    scale: torch.Tensor
    block_size: tuple[int, ...]
    orig_dtype: torch.dtype
    bits: int = 8
    zero_point: torch.Tensor | None = None

    def __post_init__(self):
        if len(self.block_size) != self.qdata.dim():
            raise ValueError(
                f"block_size {self.block_size} must have the rank of qdata {self.shape}"
            )
        grid = tuple(ceil_div(s, b) for s, b in zip(self.qdata.shape, self.block_size))
        if tuple(self.scale.shape) != grid:
            raise ValueError(
                f"scale shape {tuple(self.scale.shape)} does not match the block grid {grid} "
                f"of a {self.shape} tensor with blocks {self.block_size}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qdata.shape)

    @property
    def qdtype(self) -> str:
        """Storage type name: ``float8_e4m3fn``, ``float8_e5m2``, ``int8`` or ``int4``."""
        if self.qdata.dtype == torch.int8 and self.bits == 4:
            return "int4"
        return str(self.qdata.dtype).removeprefix("torch.")

    @property
    def granularity(self) -> str:
        """``tensor``, ``channel``, ``group`` or ``block``, derived from ``block_size``."""
        if tuple(self.block_size) == self.shape:
            return "tensor"
        if len(self.block_size) == 2 and self.block_size[0] == 1:
            return "channel" if self.block_size[1] >= self.shape[1] else "group"
        return "block"

    def nbytes(self) -> int:
        """Bytes as stored: packed codes plus scales (and zero points)."""
        code_bytes = ceil_div(self.qdata.numel() * self.bits, 8)
        extra = self.scale.numel() * self.scale.element_size()
        if self.zero_point is not None:
            extra += self.zero_point.numel() * self.zero_point.element_size()
        return code_bytes + extra

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float tensor this represents, computed in fp32 and cast to ``dtype``."""
        values = self.qdata.float()
        if self.zero_point is not None:
            values = values - expand_blocks(self.zero_point.float(), self.block_size, self.shape)
        values = values * expand_blocks(self.scale.float(), self.block_size, self.shape)
        return values.to(dtype or self.orig_dtype)
