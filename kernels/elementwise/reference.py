"""The oracle for the C++ RMSNorm: transformers' ``LlamaRMSNorm.forward``, op by op."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """``weight * (x / rms(x))`` in fp32, rounded to x's dtype before the weight; with
    ``residual``, normalizes ``x + residual`` and returns (normed, x + residual)."""
    if residual is not None:
        x = x + residual
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)

