"""W8A8 GEMM with per-token activation and per-channel (or per-tensor) weight scales."""

from __future__ import annotations

import torch

from .. import Impl
from ..dispatch import use_triton
from . import reference


def scaled_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                out_dtype: torch.dtype = torch.float32,
                impl: Impl | str = Impl.auto) -> torch.Tensor:
    fp8 = xq.dtype != torch.int8
    if use_triton(impl, xq.device, "scaled_gemm", fp8=fp8):
        from .triton_impl import scaled_gemm as kernel

        return kernel(xq, xs, wq, ws, out_dtype)
    return reference.scaled_gemm(xq, xs, wq, ws, out_dtype)


__all__ = ["scaled_gemm", "reference"]
