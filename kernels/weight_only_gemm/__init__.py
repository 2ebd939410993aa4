"""Weight-only GEMM (int8, int4, or fp8 codes) with dequantization inside the kernel."""

from __future__ import annotations

import torch

from .. import Impl
from ..dispatch import use_triton
from . import reference


def weight_only_gemm(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, group_size: int,
                     bits: int = 8, zero: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.float32,
                     impl: Impl | str = Impl.auto) -> torch.Tensor:
    if use_triton(impl, x.device, "weight_only_gemm", fp8=False):
        from .triton_impl import weight_only_gemm as kernel

        return kernel(x, wq, ws, group_size, bits, zero, out_dtype)
    return reference.weight_only_gemm(x, wq, ws, group_size, bits, zero, out_dtype)


__all__ = ["weight_only_gemm", "reference"]
