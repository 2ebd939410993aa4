"""Pure-torch spec of per-output-channel and per-tensor fp8 weight quantization.

Per channel (llm-compressor FP8_DYNAMIC, vLLM ``fp8_per_channel``): one scale per output row
``s_n = amax(|W[n, :]|) / FP8_MAX``. Per tensor (vLLM online ``fp8_per_tensor``): one scale
``amax(|W|) / FP8_MAX``. Scales multiply and are rounded to their storage dtype before use.
Zero rows (or an all-zero tensor) get scale 1.
"""

from __future__ import annotations

import torch

from ..numerics import FP8_MAX


def _quantize_with_amax(w, amax, fp8_dtype, scale_dtype):
    fmax = FP8_MAX[fp8_dtype]
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / fmax).to(scale_dtype)
    q = (w.float() / scale.float()).clamp_(-fmax, fmax).to(fp8_dtype)
    return q, scale


def quantize_fp8_per_channel(
    w: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` -> fp8 ``[N, K]`` and scale ``[N, 1]``."""
    amax = w.float().abs().amax(dim=1, keepdim=True)
    return _quantize_with_amax(w, amax, fp8_dtype, scale_dtype)


def quantize_fp8_per_tensor(
    w: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` -> fp8 ``[N, K]`` and scale ``[1, 1]``."""
    amax = w.float().abs().amax().reshape(1, 1)
    return _quantize_with_amax(w, amax, fp8_dtype, scale_dtype)


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
