"""Triton kernel for dynamic activation quantization (per token, or per token and group).

Structure: each program quantizes one row's run of whole groups, as DeepSeek-V3's
``act_quant_kernel`` (https://github.com/deepseek-ai/DeepSeek-V3/blob/main/inference/kernel.py)
and vLLM's ``per_token_group_quant_fp8``
(https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/layers/quantization/utils/fp8_utils.py)
do: amax over the group, ``scale = max(amax, eps) / qmax``, codes ``x / scale``. A group wider
than one register tile (per-token rows of a large hidden size) takes two passes over
``CHUNK``-wide slices: amax first, then quantize, so no power-of-two tile needs to hold K.

Bit-exact with :mod:`.reference`: both divisions are IEEE round-to-nearest (``div_rn``, not
Triton's default fp32 division nor a reciprocal multiply); int8 codes round half to even
with the 1.5 * 2**23 trick (exact for the clamped range, and the same on the GPU and in the
interpreter, which has no libdevice); fp8 codes are rounded to the fp8 grid in fp32 bit
arithmetic before the cast, because Triton 3.9's interpreter drops the exponent carry when
its own fp32 -> fp8 cast rounds up across a binade (126.5 -> 64 instead of 128 in e4m3).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..configs import launch_config
from ..numerics import ceil_div
from .reference import AMAX_EPS, qmax_of

# round-half-even of |v| < 2**22 in fp32: (v + 1.5 * 2**23) - 1.5 * 2**23
# (mantissa bits, smallest normal exponent) of each fp8 format
_FP8_GRID = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


@triton.jit
def _rint(v):
    """Round half to even, exactly, for |v| < 2^23. No magic-number add/subtract: the GPU
    compiler may fold ``(v + c) - c`` to ``v`` (seen on an H200: codes differed from the
    reference), and libdevice's rint does not exist in the interpreter."""
    f = tl.floor(v)
    d = v - f  # exact: v and floor(v) share the exponent range
    odd = (f.to(tl.int32) & 1) == 1
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _round_to_fp8_grid(v, DROP: tl.constexpr, HALF: tl.constexpr, KEEP: tl.constexpr,
                       SUB_MAGIC: tl.constexpr, MIN_NORMAL: tl.constexpr):
    """fp32 ``v`` (already clamped to the format's range) rounded half to even onto an fp8
    grid; the constants come from :func:`_fp8_grid`."""
    bits = v.to(tl.int32, bitcast=True)
    # normal range: round the fp32 mantissa to the fp8 width; a carry moves into the exponent
    normal = (bits + HALF + ((bits >> DROP) & 1)) & KEEP
    # subnormal range: fixed spacing SUB_MAGIC (a power of two, so the scaling is exact),
    # rounded half to even; keep the sign of zero
    mag = tl.abs(v)
    sub = (_rint(tl.math.div_rn(mag, SUB_MAGIC)) * SUB_MAGIC).to(tl.int32, bitcast=True) | \
        (bits & -2147483648)
    return tl.where(mag < MIN_NORMAL, sub, normal).to(tl.float32, bitcast=True)


@triton.jit
def _codes(x, scale, qmax, IS_INT: tl.constexpr, DROP: tl.constexpr, HALF: tl.constexpr,
           KEEP: tl.constexpr, SUB_MAGIC: tl.constexpr, MIN_NORMAL: tl.constexpr):
    v = tl.math.div_rn(x, scale)
    v = tl.clamp(v, -qmax, qmax)
    if IS_INT:
        # clamp-then-round equals the reference's round-then-clamp (integer bounds)
        v = _rint(v)
    else:
        v = _round_to_fp8_grid(v, DROP, HALF, KEEP, SUB_MAGIC, MIN_NORMAL)
    return v


def _fp8_grid(qdtype: torch.dtype) -> dict:
    """Constants of :func:`_round_to_fp8_grid` for ``qdtype`` (unused for int8)."""
    mant, min_exp = _FP8_GRID.get(qdtype, (2, -14))
    drop = 23 - mant
    return {"DROP": drop, "HALF": (1 << (drop - 1)) - 1, "KEEP": ~((1 << drop) - 1),
            "SUB_MAGIC": 2.0 ** (min_exp - mant), "MIN_NORMAL": 2.0 ** min_exp}


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, G, NG, stride_x, stride_q, qmax, eps,
                      BLOCK: tl.constexpr, GROUPS: tl.constexpr, ONE_PASS: tl.constexpr,
                      IS_INT: tl.constexpr, DROP: tl.constexpr, HALF: tl.constexpr,
                      KEEP: tl.constexpr, SUB_MAGIC: tl.constexpr, MIN_NORMAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    gmask = grp < NG
    first = grp * G  # first column of each group
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    code_ty = q_ptr.dtype.element_ty
    if ONE_PASS:
        cols = first[:, None] + offs[None, :]
        mask = gmask[:, None] & (offs[None, :] < G) & (cols < K)
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.math.div_rn(tl.maximum(amax, eps), qmax)
        scale_2d = tl.broadcast_to(scale[:, None], (GROUPS, BLOCK))
        q = _codes(x, scale_2d, qmax, IS_INT, DROP, HALF, KEEP, SUB_MAGIC, MIN_NORMAL)
        tl.store(q_row + cols, q.to(code_ty), mask=mask)
    else:
        amax = tl.zeros((GROUPS,), dtype=tl.float32)
        for start in range(0, G, BLOCK):
            cols = first[:, None] + start + offs[None, :]
            mask = gmask[:, None] & (start + offs[None, :] < G) & (cols < K)
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = tl.math.div_rn(tl.maximum(amax, eps), qmax)
        scale_2d = tl.broadcast_to(scale[:, None], (GROUPS, BLOCK))
        for start in range(0, G, BLOCK):
            cols = first[:, None] + start + offs[None, :]
            mask = gmask[:, None] & (start + offs[None, :] < G) & (cols < K)
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            q = _codes(x, scale_2d, qmax, IS_INT, DROP, HALF, KEEP, SUB_MAGIC, MIN_NORMAL)
            tl.store(q_row + cols, q.to(code_ty), mask=mask)
    tl.store(s_ptr + row * NG + grp, scale, mask=gmask)


def quantize_activation(x: torch.Tensor, group_size: int | None = None,
                        qdtype: torch.dtype = torch.float8_e4m3fn,
                        config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> codes ``[M, K]`` qdtype and fp32 scales ``[M, ceil(K / group)]``.

    ``config`` overrides the launch parameters from ``configs/act_quant.json``.
    """
    if x.dim() != 2:
        raise ValueError(f"activations must be 2-D [tokens, features], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"activations must be fp32, bf16 or fp16, got {x.dtype}")
    qmax = qmax_of(qdtype)
    m, k = x.shape
    g = k if group_size is None else int(group_size)
    if g <= 0:
        raise ValueError(f"group size must be positive, got {group_size}")
    ng = ceil_div(k, g)
    q = torch.empty((m, k), dtype=qdtype, device=x.device)
    scales = torch.empty((m, ng), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, scales
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = launch_config("act_quant", m, None, k)
    cfg.update(config or {})
    block = triton.next_power_of_2(g)
    one_pass = block <= cfg["ONE_PASS_MAX"]
    if one_pass:
        groups = min(triton.next_power_of_2(ng), max(1, cfg["TILE"] // block))
    else:
        block, groups = min(block, triton.next_power_of_2(cfg["CHUNK"])), 1
    grid = (m, triton.cdiv(ng, groups))
    _act_quant_kernel[grid](
        x, q, scales, k, g, ng, x.stride(0), q.stride(0), qmax, AMAX_EPS,
        BLOCK=block, GROUPS=groups, ONE_PASS=one_pass, IS_INT=qdtype == torch.int8,
        **_fp8_grid(qdtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return q, scales


__all__ = ["quantize_activation"]
