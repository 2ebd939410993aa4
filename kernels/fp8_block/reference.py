"""Pure-torch spec of block-scaled fp8 quantization.

The math is the one shared by DeepSeek-V3 (``inference/kernel.py``, ``README_WEIGHTS.md``),
transformers ``Fp8Quantize`` and LMDeploy ``quant_blocked_fp8``: for each (bn, bk) tile,
``s = amax / FP8_MAX`` and ``q = clamp(w / s)`` cast to fp8; the stored scale multiplies
(``w ~= q * s``). Ragged edge tiles take amax over their real elements only. All-zero
tiles get scale 1 (transformers' rule) so that dequantization stays exact.

The scale is rounded to its storage dtype *before* dividing, so the stored (q, s) pair
dequantizes to exactly what was quantized, whatever dtype a format stores scales in.
Work proceeds in row stripes of whole tiles so every pass stays in cache.
"""

from __future__ import annotations

import torch

from ..numerics import (
    FP8_MAX, block_amax, ceil_div, expand_blocks, padded_blocks, stripe_rows, unit_scale_for_zero,
)


def quantize_fp8_block(
    w: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight ``[N, K]`` to fp8 with one scale per (bn, bk) tile.

    Returns ``(q, scale)`` with ``q`` of shape ``[N, K]`` and ``scale`` of shape
    ``[ceil(N/bn), ceil(K/bk)]`` in ``scale_dtype``.
    """
    fmax = FP8_MAX[fp8_dtype]
    n, k = w.shape
    bn, bk = block
    q = torch.empty((n, k), dtype=fp8_dtype, device=w.device)
    scale = torch.empty((ceil_div(n, bn), ceil_div(k, bk)), dtype=scale_dtype, device=w.device)
    if w.device.type == "meta":  # planning: shapes only (meta ops cost ~50 us each in Python)
        return q, scale
    for r0, r1 in stripe_rows(n, k, bn):
        v = padded_blocks(w[r0:r1], block)  # our own fp32 copy: divided in place below
        s = unit_scale_for_zero(block_amax(v), fmax, scale_dtype)
        scale[r0 // bn: ceil_div(r1, bn)] = s
        v.div_(s.float()[:, None, :, None]).clamp_(-fmax, fmax)
        q[r0:r1] = v.reshape(v.shape[0] * bn, -1)[: r1 - r0, :k]
    return q, scale


def dequantize_fp8_block(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_block`: ``q * scale`` per tile, in fp32, then cast."""
    n, k = q.shape
    expected = (ceil_div(n, block[0]), ceil_div(k, block[1]))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale grid {tuple(scale.shape)} does not match weight {tuple(q.shape)} "
            f"with blocks {block}: expected {expected}"
        )
    return (q.float() * expand_blocks(scale.float(), block, (n, k))).to(out_dtype)


def quantize_act_per_token_group(
    x: torch.Tensor,
    group: int = 128,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic 1 x ``group`` activation quantization of ``x [..., K]`` with ``K % group == 0``
    (every peer kernel requires it); scales ``[..., K // group]``. The math is
    :func:`q.kernels.act_quant.reference.quantize_activation`'s (which also takes ragged K)."""
    from ..act_quant.reference import quantize_activation

    k = x.shape[-1]
    if k % group:
        raise ValueError(f"activation width {k} is not a multiple of the group size {group}")
    q, scale = quantize_activation(x.reshape(-1, k), group, fp8_dtype)
    return q.view(x.shape), scale.view(*x.shape[:-1], k // group)
