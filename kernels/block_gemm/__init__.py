"""fp8 GEMM with 128x128 weight blocks and 1x128 activation groups."""

from __future__ import annotations

import torch

from .. import Impl
from ..dispatch import use_triton
from . import reference


def fp8_block_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                   block: tuple[int, int] = (128, 128), out_dtype: torch.dtype = torch.float32,
                   impl: Impl | str = Impl.auto) -> torch.Tensor:
    if use_triton(impl, xq.device, "fp8_block_gemm", fp8=True):
        from .triton_impl import fp8_block_gemm as kernel

        return kernel(xq, xs, wq, ws, block, out_dtype)
    return reference.fp8_block_gemm(xq, xs, wq, ws, block, out_dtype)


__all__ = ["fp8_block_gemm", "reference"]
