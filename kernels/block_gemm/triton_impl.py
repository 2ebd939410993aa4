"""Triton kernel for the fp8 block-scaled GEMM (1 x 128 activation groups, 128 x 128 weights).

Structure of DeepSeek-V3's ``fp8_gemm_kernel``
(https://github.com/deepseek-ai/DeepSeek-V3/blob/main/inference/kernel.py) and vLLM's
``w8a8_block_fp8_matmul``
(https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/layers/quantization/utils/fp8_utils.py):
one K step per scale block (``BLOCK_K == bk``); each step's fp8 x fp8 ``tl.dot`` accumulates in
fp32 and is multiplied by ``xs[m, kb] * ws[n // bn, kb]`` before it joins the fp32 accumulator
(which also bounds the fp8 tensor-core accumulation to one block, as DeepSeek-V3 promotes).
Program order is the grouped ("super-grouping") order of the Triton matmul tutorial
(https://triton-lang.org/main/getting-started/tutorials/03-matrix-multiplication.html), and an
optional split over K (a second grid axis) gives decode-sized problems more programs.
Ragged M, N and K are masked with zero fill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..configs import launch_config
from ..triton_common import (
    k_tile_range, load_ab_tiles, reduce_splits, split_output, store_tile, tile_ids,
    tile_offsets,
)
from .reference import check_block_operands


@triton.jit
def _fp8_block_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                           stride_am, stride_asm, stride_bn, stride_bsn, stride_cs, stride_cm,
                           SCALE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rows_a = offs_m.to(tl.int64)[:, None] * stride_am
    rows_b = offs_n.to(tl.int64)[None, :] * stride_bn
    a_scales = as_ptr + offs_m * stride_asm
    b_scales = bs_ptr + (offs_n // SCALE_N) * stride_bsn
    kt_start, kt_end = k_tile_range(K, BLOCK_K, SPLIT_K, pid_k)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_start, kt_end):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        a, b = load_ab_tiles(a_ptr, b_ptr, rows_a, rows_b, mask_m, mask_n, offs_k, K)
        sa = tl.load(a_scales + kt, mask=mask_m, other=0.0)
        sb = tl.load(b_scales + kt, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
    store_tile(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, pid_k, stride_cs, stride_cm)


def fp8_block_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                   block: tuple[int, int] = (128, 128), out_dtype: torch.dtype = torch.float32,
                   config: dict | None = None) -> torch.Tensor:
    """``xq [M, K]`` fp8, ``xs [M, ceil(K/bk)]`` fp32, ``wq [N, K]`` fp8,
    ``ws [ceil(N/bn), ceil(K/bk)]`` fp32 -> ``[M, N]`` in ``out_dtype``.

    ``config`` overrides the launch parameters from ``configs/block_gemm.json``.
    """
    check_block_operands(xq, xs, wq, ws, block)
    bn, bk = (int(b) for b in block)
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"the Triton kernel steps K one scale block at a time and needs a "
                         f"power-of-two block K of at least 16, got {bk}")
    m, k = xq.shape
    n = wq.shape[0]
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=out_dtype, device=xq.device)
    xq = xq if xq.stride(1) == 1 else xq.contiguous()
    wq = wq if wq.stride(1) == 1 else wq.contiguous()
    xs = xs.float().contiguous()
    ws = ws.float().contiguous()
    cfg = launch_config("block_gemm", m, n, k)
    cfg.update(config or {})
    split = max(1, min(int(cfg["SPLIT_K"]), triton.cdiv(k, bk)))
    out = split_output(split, m, n, out_dtype, xq.device)
    bm, bn_tile = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn_tile), split)
    _fp8_block_gemm_kernel[grid](
        xq, xs, wq, ws, out, m, n, k,
        xq.stride(0), xs.stride(0), wq.stride(0), ws.stride(0),
        out.stride(0) if split > 1 else 0, out.stride(-2),
        SCALE_N=bn, BLOCK_M=bm, BLOCK_N=bn_tile, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        SPLIT_K=split, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return reduce_splits(out, split, out_dtype)


__all__ = ["fp8_block_gemm"]
