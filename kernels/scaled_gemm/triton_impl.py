"""Triton kernel for the row/column-scaled W8A8 GEMM (fp8 or int8 codes).

Structure of the Triton matmul tutorial
(https://triton-lang.org/main/getting-started/tutorials/03-matrix-multiplication.html: tiled
``tl.dot`` over K, grouped program order) with the scaled epilogue of vLLM's
``triton_scaled_mm``
(https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/layers/quantization/compressed_tensors/triton_scaled_mm.py):
``y = (acc * xs[m]) * ws[n]``. int8 codes accumulate exactly in int32 (``out_dtype=tl.int32``),
fp8 codes in fp32, with the fp8 tensor-core accumulator promoted to full fp32 every
``FP8_PROMOTE_K`` elements on sm_90 (DeepSeek-V3's interval). A per-tensor weight scale
``[1, 1]`` is read with stride 0. An optional split over K writes raw partial accumulators and
applies the same epilogue after the (exact, for int32) reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..configs import launch_config
from ..triton_common import (
    k_tile_range, load_ab_tiles, split_output, store_tile, tile_ids, tile_offsets,
)
from .reference import check_scaled_operands


@triton.jit
def _scaled_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                        stride_am, stride_asm, stride_bn, stride_bsn, stride_cs, stride_cm,
                        IS_INT: tl.constexpr, PROMOTE_K: tl.constexpr, EPILOGUE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rows_a = offs_m.to(tl.int64)[:, None] * stride_am
    rows_b = offs_n.to(tl.int64)[None, :] * stride_bn
    kt_start, kt_end = k_tile_range(K, BLOCK_K, SPLIT_K, pid_k)
    if IS_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_start, kt_end):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        a, b = load_ab_tiles(a_ptr, b_ptr, rows_a, rows_b, mask_m, mask_n, offs_k, K)
        if IS_INT:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        elif PROMOTE_K > 0:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=PROMOTE_K)
        else:
            acc = tl.dot(a, b, acc)
    if EPILOGUE:
        sa = tl.load(as_ptr + offs_m * stride_asm, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptr + offs_n * stride_bsn, mask=mask_n, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        store_tile(c_ptr, y, offs_m, offs_n, mask_m, mask_n, pid_k, stride_cs, stride_cm)
    else:  # raw partials (int32 or fp32): the host applies the epilogue after the sum
        store_tile(c_ptr, acc, offs_m, offs_n, mask_m, mask_n, pid_k, stride_cs, stride_cm)


def scaled_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                out_dtype: torch.dtype = torch.float32,
                config: dict | None = None) -> torch.Tensor:
    """``xq [M, K]`` fp8 or int8, ``xs [M, 1]`` fp32, ``wq [N, K]`` (same dtype),
    ``ws [N, 1] | [1, 1]`` fp32 -> ``[M, N]`` in ``out_dtype``.

    ``config`` overrides the launch parameters from ``configs/scaled_gemm.json``.
    """
    check_scaled_operands(xq, xs, wq, ws)
    is_int = xq.dtype == torch.int8
    if not is_int and xq.element_size() != 1:
        raise ValueError(f"scaled GEMM codes must be int8 or fp8, got {xq.dtype}")
    m, k = xq.shape
    n = wq.shape[0]
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=out_dtype, device=xq.device)
    xq = xq if xq.stride(1) == 1 else xq.contiguous()
    wq = wq if wq.stride(1) == 1 else wq.contiguous()
    xs = xs.float()
    ws = ws.float()
    cfg = launch_config("scaled_gemm", m, n, k)
    cfg.update(config or {})
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    split = max(1, min(int(cfg["SPLIT_K"]), triton.cdiv(k, bk)))
    out = split_output(split, m, n, out_dtype, xq.device,
                       acc_dtype=torch.int32 if is_int else torch.float32)
    promote = 0 if is_int else min(int(cfg.get("FP8_PROMOTE_K", 0)), bk)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    _scaled_gemm_kernel[grid](
        xq, xs, wq, ws, out, m, n, k,
        xq.stride(0), xs.stride(0), wq.stride(0), ws.stride(0) if ws.shape[0] == n else 0,
        out.stride(0) if split > 1 else 0, out.stride(-2),
        IS_INT=is_int, PROMOTE_K=promote, EPILOGUE=split == 1, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], SPLIT_K=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split == 1:
        return out
    # the kernel's epilogue, in its order, after an exact int64 (or fp32) sum of the partials
    acc = out.sum(0, dtype=torch.int64 if is_int else torch.float32)
    return (acc.float() * xs * ws.reshape(1, -1)).to(out_dtype)


__all__ = ["scaled_gemm"]
