"""Fused MoE in Triton: one grouped GEMM launch per projection over every expert.

The shape of vLLM's ``fused_moe`` Triton kernel
(https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/layers/fused_moe/fused_moe.py)
and its ``moe_align_block_size``, written for q's weight layouts:

- :func:`align` sorts the (token, slot) pairs by expert and pads each expert's run to a
  multiple of ``BLOCK_M`` with a sentinel, so each ``BLOCK_M`` tile of rows belongs to one
  expert (``block_expert``). It is sized for the worst case (every expert padding a whole
  tile) so no count goes back to the host; tiles past the end have expert -1 and return.
- :func:`_moe_gemm_kernel` computes a ``[BLOCK_M, BLOCK_N]`` tile: it reads its rows'
  activations by pair (the first projection reads token ``pair // top_k``, the second its
  own row), the expert's weight tile, and writes each row back to its pair's slot, scaled by
  the routing weight on the second projection. The top-k rows of a token are then summed in
  fp32 on the host side (a view, no scatter).
- Every weight kind in one kernel: float weights; int8, packed int4 or fp8 codes with group
  scales and zero points (dequantized in registers as in ``weight_only_gemm``); and W8A8
  codes (int8 or fp8, per token or per 128-column group) with per-channel or 128x128 block
  weight scales. Codes reach the dot as bf16 (exact for int8, e4m3 and e5m2, products exact
  in the fp32 accumulator), scaled per K tile: the reference's math in another order.
  int8 and fp8 tensor-core MMAs would be faster on sm_89+; not measured here (no GPU).

``gate`` and ``up`` are one weight (rows ``[0, I)`` and ``[up_offset, up_offset + I)``);
``act(gate) * up`` and the activation quantization between the projections are torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..act_quant import quantize_activation
from ..weight_only_gemm.triton_impl import _FP8_CODES, _fp8_bits_to_float

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(``sorted_pairs`` padded with ``pairs``, ``block_expert`` per tile, -1 past the
    end). Expert ``e``'s pairs fill whole tiles starting at tile ``padded_start[e]``."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    tiles = (counts + block_m - 1) // block_m
    tile_start = torch.cumsum(tiles, 0) - tiles
    start = torch.cumsum(counts, 0) - counts
    max_tiles = triton.cdiv(pairs, block_m) + num_experts
    sorted_pairs = torch.full((max_tiles * block_m,), pairs, dtype=torch.int32,
                              device=flat.device)
    expert_of = flat[order]
    slot = tile_start[expert_of] * block_m + torch.arange(pairs, device=flat.device) \
        - start[expert_of]
    sorted_pairs[slot] = order.to(torch.int32)
    block_expert = torch.full((max_tiles,), -1, dtype=torch.int32, device=flat.device)
    used = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), tiles)
    block_expert[:used.numel()] = used.to(torch.int32)
    return sorted_pairs, block_expert


@triton.jit
def _moe_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, z_ptr, c_ptr, rw_ptr,
                     sorted_ptr, expert_ptr, num_pairs, N, K, A_ROW_DIV, GS, AGS, SN,
                     stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn,
                     stride_ze, stride_zn, stride_cm,
                     A_FP8: tl.constexpr, W_FP8: tl.constexpr, BITS: tl.constexpr,
                     HAS_ZERO: tl.constexpr, HAS_ASCALE: tl.constexpr,
                     HAS_WSCALE: tl.constexpr, TILE_SCALE: tl.constexpr,
                     MUL_ROUTED: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(expert_ptr + pid_m)
    if e < 0:
        return
    e = e.to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = pairs < num_pairs
    a_rows = pairs // A_ROW_DIV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows_a = a_ptr + a_rows[:, None] * stride_am
    rows_as = as_ptr + a_rows * stride_asm
    rows_w = w_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
    rows_ws = ws_ptr + e * stride_wse + (offs_n // SN).to(tl.int64) * stride_wsn
    rows_z = z_ptr + e * stride_ze + offs_n.to(tl.int64) * stride_zn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(rows_a + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        if A_FP8 != 0:
            a = _fp8_bits_to_float(a, A_FP8)
        a = a.to(tl.float32)
        if BITS == 4:  # byte j: column 2j in the low nibble, 2j + 1 in the high one
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(rows_w + offs_b[None, :],
                             mask=mask_n[:, None] & (offs_b[None, :] < (K + 1) // 2), other=0)
            packed = packed.to(tl.int8, bitcast=True)
            w = tl.reshape(tl.join((packed << 4) >> 4, packed >> 4),
                           (BLOCK_N, BLOCK_K)).to(tl.float32)
        else:
            w = tl.load(rows_w + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                        other=0)
            if W_FP8 != 0:
                w = _fp8_bits_to_float(w, W_FP8)
            w = w.to(tl.float32)
        if TILE_SCALE:  # the K tile is inside one weight group and one activation group
            g = k0 // GS
            if HAS_ZERO:
                w -= tl.load(rows_z + g, mask=mask_n, other=0).to(tl.float32)[:, None]
            part = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)),
                          input_precision=PRECISION)
            if HAS_WSCALE:
                part *= tl.load(rows_ws + g, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_ASCALE:
                part *= tl.load(rows_as + k0 // AGS, mask=mask_m, other=0.0)[:, None]
            acc += part
        else:  # weight-only, groups narrower than the tile: scale each element
            g = offs_k // GS
            mask_g = mask_n[:, None] & mask_k[None, :]
            if HAS_ZERO:
                w -= tl.load(rows_z[:, None] + g[None, :], mask=mask_g, other=0).to(tl.float32)
            w *= tl.load(rows_ws[:, None] + g[None, :], mask=mask_g, other=0.0).to(tl.float32)
            acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc,
                         input_precision=PRECISION)
    if MUL_ROUTED:
        acc *= tl.load(rw_ptr + pairs, mask=mask_m, other=0.0)[:, None]
    out = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _block_sizes(pairs: int, w) -> tuple[int, int, int]:
    block_m = 16 if pairs <= 64 else 64
    block_k = 64
    if w.kind == "weight-only" and w.group_size < block_k:
        block_k = max(16, 1 << (int(w.group_size).bit_length() - 1))  # within one group
    return block_m, 64, block_k


def _check_scales(w) -> None:
    """The kernel reads scales by index: refuse layouts it would read past (a per-tensor
    ``[E, 1, 1]`` scale must come expanded per channel)."""
    if w.scale is None:
        return
    n, k = w.shape
    want = {"weight-only": (n, -(-k // max(w.group_size, 1))), "scaled": (n, 1),
            "block": (-(-n // w.block[0]), -(-k // w.block[1]))}[w.kind]
    if tuple(w.scale.shape[1:]) != want or w.scale.stride(-1) != 1:
        raise ValueError(f"{w.kind} expert scales must be [E, {want[0]}, {want[1]}] with "
                         f"unit last stride, got {tuple(w.scale.shape)}")


def _gemm(a, a_scale, w, sorted_pairs, block_expert, num_pairs, row_div, routed, out_dtype,
          block_m, compute_dtype):
    """``[num_pairs, N]``: row p = (activation row p // row_div) x (its expert's weight)^T,
    times ``routed[p]`` when given."""
    n, k = w.shape
    _check_scales(w)
    out = torch.empty(num_pairs, n, dtype=out_dtype, device=a.device)
    if num_pairs == 0:
        return out
    _, block_n, block_k = _block_sizes(num_pairs, w)
    a = a.contiguous()
    a_fp8 = _FP8_CODES.get(a.dtype, 0)
    if a_fp8:
        a = a.view(torch.uint8)
    codes = w.qdata
    w_fp8 = _FP8_CODES.get(codes.dtype, 0)
    if w_fp8:
        codes = codes.view(torch.uint8)
    scale = w.scale if w.scale is not None else codes  # a dummy pointer when unused
    zero = w.zero_point if w.zero_point is not None else scale
    group = {"dense": k, "weight-only": w.group_size, "scaled": k, "block": w.block[1]}[w.kind]
    act_group = (w.act_group or k) if a_scale is not None else k
    tile_scale = (group % block_k == 0 or group >= k) and \
        (a_scale is None or act_group % block_k == 0 or act_group >= k)
    if not tile_scale and a_scale is not None:
        raise ValueError(f"activation groups of {act_group} with weight groups of {group} "
                         f"need a K tile inside both (BLOCK_K {block_k})")
    interpreted = a.device.type == "cpu"  # the interpreter's bf16 dot: see weight_only_gemm
    dot_fp32 = interpreted or compute_dtype == torch.float32
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, a if a_scale is None else a_scale, codes, scale, zero, out,
        routed if routed is not None else out, sorted_pairs, block_expert, num_pairs, n, k,
        row_div, group, act_group, w.block[0] if w.kind == "block" else 1,
        a.stride(0), 0 if a_scale is None else a_scale.stride(0), codes.stride(0),
        codes.stride(1), 0 if w.scale is None else scale.stride(0),
        0 if w.scale is None else scale.stride(1),
        0 if w.zero_point is None else zero.stride(0),
        0 if w.zero_point is None else zero.stride(1), out.stride(0),
        A_FP8=a_fp8, W_FP8=w_fp8, BITS=w.bits if w.kind == "weight-only" else 8,
        HAS_ZERO=w.zero_point is not None, HAS_ASCALE=a_scale is not None,
        HAS_WSCALE=w.scale is not None, TILE_SCALE=tile_scale, MUL_ROUTED=routed is not None,
        DOT_DTYPE=tl.float32 if dot_fp32 else _TL_DTYPES[compute_dtype],
        PRECISION="ieee" if dot_fp32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def fused_moe(x, topk_ids, topk_weights, gate_up, down, intermediate: int, up_offset: int,
              act_fn) -> torch.Tensor:
    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    pairs = tokens * top_k
    block_m, _, _ = _block_sizes(pairs, gate_up)
    sorted_pairs, block_expert = align(topk_ids, gate_up.num_experts, block_m)
    a, a_scale = x, None
    if gate_up.act_dtype is not None:
        a, a_scale = quantize_activation(x, gate_up.act_group, gate_up.act_dtype)
    gu = _gemm(a, a_scale, gate_up, sorted_pairs, block_expert, pairs, top_k, None, x.dtype,
               block_m, x.dtype)
    h = act_fn(gu[:, :intermediate]) * gu[:, up_offset:up_offset + intermediate]
    a, a_scale = h, None
    if down.act_dtype is not None:
        a, a_scale = quantize_activation(h, down.act_group, down.act_dtype)
    y = _gemm(a, a_scale, down, sorted_pairs, block_expert, pairs, 1,
              topk_weights.reshape(-1).float().contiguous(), torch.float32, block_m, x.dtype)
    return y.view(tokens, top_k, hidden).sum(dim=1).to(x.dtype)
