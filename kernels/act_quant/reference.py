"""Pure-torch spec of dynamic activation quantization (per token, or per token and group).

One fp32 scale per row and ``group_size`` columns (the whole row when ``group_size`` is
None): ``s = max(amax, eps) / qmax`` and ``q = x / s``, clamped (fp8) or rounded half to
even and clamped to +-127 (int8), as vLLM's ``per_token_group_quant_fp8`` /
``scaled_fp8_quant`` / ``scaled_int8_quant`` do. A ragged last group takes amax over its
real columns, which equals zero-padding ``K`` to a multiple of the group: that is how GEMMs
handle hidden sizes that are not a multiple of 128 (SmolLM2's 576).
"""

from __future__ import annotations

import torch

from ..numerics import FP8_MAX, INT_QMAX, ceil_div

# vLLM's floor on amax: an all-zero token gets a tiny scale, and codes 0, never NaN.
AMAX_EPS = 1e-10


def qmax_of(qdtype: torch.dtype) -> float:
    if qdtype == torch.int8:
        return float(INT_QMAX[8])
    if qdtype in FP8_MAX:
        return FP8_MAX[qdtype]
    raise ValueError(f"activations quantize to int8 or an fp8 dtype, not {qdtype}")


def quantize_activation(
    x: torch.Tensor,
    group_size: int | None = None,
    qdtype: torch.dtype = torch.float8_e4m3fn,
    eps: float = AMAX_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(codes [M, K] qdtype, scales [M, ceil(K / group)] fp32)``."""
    if x.dim() != 2:
        raise ValueError(f"activations must be 2-D [tokens, features], got {tuple(x.shape)}")
    qmax = qmax_of(qdtype)
    m, k = x.shape
    g = k if group_size is None else group_size
    groups = ceil_div(k, g)
    xf = x.float()
    if k % g:
        xf = torch.nn.functional.pad(xf, (0, groups * g - k))
    xg = xf.view(m, groups, g)
    amax = xg.abs().amax(dim=-1).clamp(min=eps)
    # tensor / tensor: IEEE division on every device (CUDA turns ``tensor / python_float``
    # into a multiply by the reciprocal, which rounds differently: seen on an H200)
    scale = amax / torch.full_like(amax, qmax)
    v = xg / scale.unsqueeze(-1)
    if qdtype == torch.int8:
        v = torch.round(v)
    q = v.clamp(-qmax, qmax).to(qdtype).view(m, groups * g)[:, :k]
    return q.contiguous(), scale
