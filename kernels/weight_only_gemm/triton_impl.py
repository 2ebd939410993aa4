"""Triton kernel for the weight-only GEMM: int8, packed int4 or fp8 codes, float activations.

Structure of the Triton matmul tutorial
(https://triton-lang.org/main/getting-started/tutorials/03-matrix-multiplication.html: tiled
``tl.dot`` over K in the grouped program order), with the weight tile dequantized in registers
between its load and the dot, as mixed-input kernels such as vLLM's AWQ Triton GEMM
(https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/layers/quantization/awq_triton.py)
do. Each ``[BLOCK_N, BLOCK_K]`` tile of codes is loaded K-contiguous; int4 bytes are split
into sign-extended nibbles (two shifts each) and interleaved back to column order; fp8 codes
are decoded from their bits through fp16 (no fp8 type and no fp8 dot: this is the path for
GPUs without fp8 tensor cores, before sm_89). The dot runs in the activation dtype (bf16 x
bf16 on the GPU, fp32 "ieee" for fp32 activations) with an fp32 accumulator.

When a K tile lies inside one scale group (group size a multiple of ``BLOCK_K``, or one group
per row) the dot takes the exact integer codes minus zero point and the tile's per-channel scale
multiplies the fp32 partial product. Other group sizes gather a scale per element and fold it
into the tile before the dot. Small-M (decode) launches use narrow N tiles and, where the config
asks, a split over K with a deterministic reduction of the partial products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..configs import launch_config
from ..triton_common import (
    k_tile_range, reduce_splits, split_output, store_tile, tile_ids,
    tile_offsets,
)
from .reference import check_weight_only_operands

# fp8 weight codes reach the kernel as bytes: 1 = e4m3fn, 2 = e5m2
_FP8_CODES = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _fp8_bits_to_float(codes, FP8: tl.constexpr):
    """fp32 values of fp8 codes given as uint8 bytes (FP8 1: e4m3fn, 2: e5m2), through fp16
    bit patterns, so no fp8 type reaches the compiler (Triton has no e4m3 before sm_89).
    e5m2 is the top byte of an fp16; e4m3 moved into fp16's fields is the value times 2**-8,
    subnormals included. Every finite code is exact."""
    c = codes.to(tl.int8, bitcast=True).to(tl.int32)  # sign-extended
    if FP8 == 2:
        h = c << 8
    else:
        h = ((c << 7) & 0x3FFF) | (((c >> 7) & 1) << 15)
    w = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if FP8 == 1:
        w = w * 256.0
    return w


@triton.jit
def _weight_only_kernel(x_ptr, w_ptr, s_ptr, z_ptr, c_ptr, M, N, K, GS,
                        stride_xm, stride_wn, stride_sn, stride_zn, stride_cs, stride_cm,
                        BITS: tl.constexpr, FP8: tl.constexpr, HAS_ZERO: tl.constexpr,
                        TILE_SCALE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rows_x = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    rows_w = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    rows_s = s_ptr + offs_n.to(tl.int64) * stride_sn
    rows_z = z_ptr + offs_n.to(tl.int64) * stride_zn
    kt_start, kt_end = k_tile_range(K, BLOCK_K, SPLIT_K, pid_k)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_start, kt_end):
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(rows_x + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        x = x.to(DOT_DTYPE)
        if BITS == 4:
            # byte j holds column 2j (low nibble) and 2j + 1 (high nibble), two's complement
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            mask_b = mask_n[:, None] & (offs_b[None, :] < (K + 1) // 2)
            packed = tl.load(rows_w + offs_b[None, :], mask=mask_b, other=0)
            packed = packed.to(tl.int8, bitcast=True)
            low = (packed << 4) >> 4
            high = packed >> 4
            w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K)).to(tl.float32)
        elif FP8 != 0:
            codes = tl.load(rows_w + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                            other=0)
            w = _fp8_bits_to_float(codes, FP8)
        else:
            w = tl.load(rows_w + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                        other=0).to(tl.float32)
        if TILE_SCALE:
            # the whole K tile is one scale group: exact codes in the dot, scale after
            g = k0 // GS
            if HAS_ZERO:
                w -= tl.load(rows_z + g, mask=mask_n, other=0).to(tl.float32)[:, None]
            part = tl.dot(x, tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION)
            scale = tl.load(rows_s + g, mask=mask_n, other=0.0).to(tl.float32)
            acc += part * scale[None, :]
        else:
            g = offs_k // GS
            mask_g = mask_n[:, None] & mask_k[None, :]
            if HAS_ZERO:
                w -= tl.load(rows_z[:, None] + g[None, :], mask=mask_g, other=0).to(tl.float32)
            w *= tl.load(rows_s[:, None] + g[None, :], mask=mask_g, other=0.0).to(tl.float32)
            acc = tl.dot(x, tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    store_tile(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, pid_k, stride_cs, stride_cm)


def weight_only_gemm(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, group_size: int,
                     bits: int = 8, zero: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.float32,
                     config: dict | None = None) -> torch.Tensor:
    """``x [M, K]`` fp32/bf16/fp16; ``wq [N, K]`` int8 or fp8 (``bits=8``) or ``[N, ceil(K/2)]``
    uint8 packed int4 (``bits=4``); ``ws`` and ``zero`` (int8) ``[N, ceil(K / group_size)]``
    -> ``y = x @ ((w - zero) * ws)^T`` ``[M, N]`` in ``out_dtype``.

    ``config`` overrides the launch parameters from ``configs/weight_only_gemm.json``.
    """
    check_weight_only_operands(x, wq, ws, group_size, bits, zero)
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"activations must be fp32, bf16 or fp16, got {x.dtype}")
    if bits == 8 and wq.element_size() != 1:
        raise ValueError(f"8-bit weight codes must be int8 or fp8, got {wq.dtype}")
    m, k = x.shape
    n = wq.shape[0]
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=out_dtype, device=x.device)
    x = x if x.stride(1) == 1 else x.contiguous()
    wq = wq if wq.stride(1) == 1 else wq.contiguous()
    fp8 = _FP8_CODES.get(wq.dtype, 0)
    if fp8:
        wq = wq.view(torch.uint8)  # decoded from the bits in the kernel
    ws = ws if ws.stride(1) == 1 else ws.contiguous()
    if zero is not None and zero.stride(1) != 1:
        zero = zero.contiguous()
    cfg = launch_config("weight_only_gemm", m, n, k)
    cfg.update(config or {})
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    gs = int(group_size)
    if gs < bk and gs >= 32 and gs & (gs - 1) == 0:
        bk = gs  # a smaller power-of-two group: shrink the K tile to one group
    tile_scale = gs % bk == 0 or gs >= k
    split = max(1, min(int(cfg["SPLIT_K"]), triton.cdiv(k, bk)))
    out = split_output(split, m, n, out_dtype, x.device)
    # Triton 3.9's interpreter multiplies bf16 operands as their raw uint16 bits: on CPU
    # tensors (the interpreter) a bf16 dot runs in fp32, which is exact for bf16 products
    interpreted = x.device.type == "cpu" and x.dtype == torch.bfloat16
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    _weight_only_kernel[grid](
        x, wq, ws, ws if zero is None else zero, out, m, n, k, gs,
        x.stride(0), wq.stride(0), ws.stride(0), 0 if zero is None else zero.stride(0),
        out.stride(0) if split > 1 else 0, out.stride(-2),
        BITS=bits, FP8=fp8, HAS_ZERO=zero is not None, TILE_SCALE=tile_scale,
        PRECISION="ieee" if x.dtype == torch.float32 or interpreted else "tf32",
        DOT_DTYPE=tl.float32 if interpreted else _TL_DTYPES[x.dtype],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], SPLIT_K=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return reduce_splits(out, split, out_dtype)


__all__ = ["weight_only_gemm"]
