"""The fused MoE spec in pure torch: routed rows sorted by expert, each expert's rows
through the dense reference ops (dequantize in fp32, multiply), weighted sum in fp32."""

from __future__ import annotations

import torch

from ..act_quant.reference import quantize_activation
from ..block_gemm.reference import fp8_block_gemm
from ..scaled_gemm.reference import scaled_gemm
from ..weight_only_gemm.reference import weight_only_gemm


def quantize_rows(w, x: torch.Tensor):
    """The activation codes and scales ``w`` takes for ``x`` (None: not quantized)."""
    if w.act_dtype is None:
        return None
    return quantize_activation(x, w.act_group, w.act_dtype)


def expert_gemm(w, e: int, x: torch.Tensor, quantized) -> torch.Tensor:
    """``x [n, K]`` (or its activation codes) times expert ``e``'s weight -> fp32 ``[n, N]``."""
    if w.kind == "dense":
        return x.float() @ w.qdata[e].float().t()
    if w.kind == "weight-only":
        zero = None if w.zero_point is None else w.zero_point[e]
        return weight_only_gemm(x, w.qdata[e], w.scale[e], w.group_size, w.bits, zero,
                                torch.float32)
    xq, xs = quantized
    if w.kind == "scaled":
        return scaled_gemm(xq, xs, w.qdata[e], w.scale[e], torch.float32)
    return fp8_block_gemm(xq, xs, w.qdata[e], w.scale[e], w.block, torch.float32)


def _gather(quantized, rows: torch.Tensor):
    return None if quantized is None else (quantized[0][rows], quantized[1][rows])


def _slice(quantized, span: slice):
    return None if quantized is None else (quantized[0][span], quantized[1][span])


def route(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """(``order``: the flat (token, slot) pairs sorted by expert, stably; ``offsets``: expert
    ``e``'s rows are ``order[offsets[e]:offsets[e + 1]]``). Pair ``p`` is token
    ``p // top_k``."""
    flat = topk_ids.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts}), got "
                         f"{int(flat.min())}..{int(flat.max())}")
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = [0] + torch.cumsum(counts, 0).tolist()
    return order, offsets


def moe(x, topk_ids, topk_weights, gate_up, down, intermediate: int, up_offset: int, act_fn,
        gemm=expert_gemm) -> torch.Tensor:
    """The algorithm of :func:`q.kernels.fused_moe.fused_moe`, with ``gemm`` running one
    expert's rows (this module's :func:`expert_gemm`, or a faster one)."""
    tokens_in, hidden = x.shape
    top_k = topk_ids.shape[1]
    order, offsets = route(topk_ids, gate_up.num_experts)
    token_of_row = order // top_k
    xs = x[token_of_row]
    xq = _gather(quantize_rows(gate_up, x), token_of_row)
    active = [e for e in range(gate_up.num_experts) if offsets[e + 1] > offsets[e]]
    h = x.new_empty(order.numel(), intermediate)
    for e in active:
        span = slice(offsets[e], offsets[e + 1])
        gu = gemm(gate_up, e, xs[span], _slice(xq, span))
        gate, up = gu[:, :intermediate], gu[:, up_offset:up_offset + intermediate]
        h[span] = (act_fn(gate) * up).to(h.dtype)
    hq = quantize_rows(down, h)
    y = torch.empty(order.numel(), hidden, dtype=torch.float32, device=x.device)
    for e in active:
        span = slice(offsets[e], offsets[e + 1])
        y[span] = gemm(down, e, h[span], _slice(hq, span))
    y.mul_(topk_weights.reshape(-1)[order].float()[:, None])
    out = torch.zeros(tokens_in, hidden, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_row, y)
    return out.to(x.dtype)
