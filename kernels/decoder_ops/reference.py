"""The elementwise ops of a Llama-style decoder layer, in plain torch, exactly as transformers
computes them (``LlamaRMSNorm``, ``apply_rotary_pos_emb``, the residual adds) and the
engine's KV-cache write: the oracle of :mod:`.cpp_impl`.

Shapes: activations are ``[N, width]`` rows (the engine's packed tokens); ``cos``/``sin`` are
``[N, head_dim]`` as the model's rotary module returns them (both halves equal).
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """``weight * norm(x)``; with ``residual``, ``(norm(residual + x), residual + x)``."""
    if residual is not None:
        x = residual + x
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation, as transformers' LlamaMLP computes it: SiLU rounded to
    the activations' dtype, then the product rounded again."""
    return torch.nn.functional.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [N, H * d]``, ``k [N, kvH * d]`` -> both rotated (new tensors)."""
    def rot(x):
        x = x.reshape(x.shape[0], -1, head_dim)
        c, s = cos[:, None], sin[:, None]
        return ((x * c) + (rotate_half(x) * s)).flatten(1)
    return rot(q), rot(k)


def write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Token ``i``'s keys and values (``k``/``v`` ``[N, kvH * d]`` or ``[N, kvH, d]``) into
    slot ``slots[i]`` of one layer's cache: keys ``[blocks, kvH, d, bs]``, values
    ``[blocks, kvH, bs, dv]``. The engine's attention writes the cache with this for
    transformers' forward (any model, any device); q's own forward with the C++ kernel."""
    kv_heads, dim, bs = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    k_cache[slots // bs, :, :, slots % bs] = k.reshape(-1, kv_heads, dim).to(k_cache.dtype)
    v_cache[slots // bs, :, slots % bs] = v.reshape(-1, kv_heads, v_cache.shape[-1]).to(
        v_cache.dtype)
