"""Pure-torch spec of per-output-channel and per-tensor fp8 weight quantization.

Per channel (llm-compressor FP8_DYNAMIC, vLLM ``fp8_per_channel``): one scale per output row
``s_n = amax(|W[n, :]|) / FP8_MAX``. Per tensor (vLLM online ``fp8_per_tensor``): one scale
``amax(|W|) / FP8_MAX``. Scales multiply and are rounded to their storage dtype before use.
Zero rows (or an all-zero tensor) get scale 1. Work proceeds in row stripes (cache-sized).
"""

from __future__ import annotations

import torch

from ..numerics import FP8_MAX, _scratch_fp32, abs_max, stripe_rows, unit_scale_for_zero


def _quantize_rows(w, scale_of_rows, fp8_dtype):
    """Divide each stripe by its rows' scales (fp32, in place), clamp, cast to fp8."""
    fmax = FP8_MAX[fp8_dtype]
    n, k = w.shape
    q = torch.empty((n, k), dtype=fp8_dtype, device=w.device)
    if w.device.type == "meta":  # planning: shapes only
        return q
    for r0, r1 in stripe_rows(n, k):
        wf = _scratch_fp32((r1 - r0) * k, w.device).view(r1 - r0, k).copy_(w[r0:r1])
        q[r0:r1] = wf.div_(scale_of_rows(r0, r1)).clamp_(-fmax, fmax)
    return q


def quantize_fp8_per_channel(
    w: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` -> fp8 ``[N, K]`` and scale ``[N, 1]``."""
    amax = abs_max(w, dim=1, keepdim=True).float()
    scale = unit_scale_for_zero(amax, FP8_MAX[fp8_dtype], scale_dtype)
    scale_f = scale.float()
    return _quantize_rows(w, lambda r0, r1: scale_f[r0:r1], fp8_dtype), scale


def quantize_fp8_per_tensor(
    w: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` -> fp8 ``[N, K]`` and scale ``[1, 1]``."""
    amax = abs_max(w).float().reshape(1, 1)
    scale = unit_scale_for_zero(amax, FP8_MAX[fp8_dtype], scale_dtype)
    scale_f = scale.float()
    return _quantize_rows(w, lambda r0, r1: scale_f, fp8_dtype), scale


def dequantize_fp8_rowwise(
    q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``q * scale`` with scale ``[N, 1]`` or ``[1, 1]``, computed in fp32."""
    return (q.float() * scale.float()).to(out_dtype)


def quantize_act_per_token(
    x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn, eps: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8: ``[..., K]`` -> fp8 and fp32 scales ``[..., 1]``."""
    fmax = FP8_MAX[fp8_dtype]
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=eps) / fmax
    return (x.float() / scale).clamp(-fmax, fmax).to(fp8_dtype), scale
