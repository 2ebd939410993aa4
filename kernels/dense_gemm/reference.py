"""The dense GEMM in fp32: what every implementation approximates."""

from __future__ import annotations

import torch


def dense_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x [M, K]``, ``w [N, K]`` -> ``x w^T (+ bias)`` ``[M, N]``, computed in fp32."""
    y = x.float() @ w.float().t()
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype)
