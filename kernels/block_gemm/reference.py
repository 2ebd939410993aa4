"""Pure-torch spec of the fp8 block-scaled GEMM (DeepSeek-V3 / DeepGEMM structure).

``y = (xq * xs) @ (wq * ws)^T``: activations carry one fp32 scale per token and ``bk``
columns (1 x 128 groups), weights one per ``bn x bk`` tile (128 x 128). Computed in fp32
after dequantizing both operands; the Triton kernel instead accumulates each K block's
fp8 x fp8 product in fp32 and applies ``xs * ws`` per block, which is the same sum in a
different order. Ragged edges: the last row/column tile of the weight and the last
activation group may be partial (``--ragged quantize`` checkpoints).
"""

from __future__ import annotations

import torch

from ..numerics import ceil_div, codes_to_float, mul_blocks_


def check_block_operands(xq, xs, wq, ws, block) -> None:
    m, k = xq.shape
    n, kw = wq.shape
    bn, bk = block
    if kw != k:
        raise ValueError(f"activation width {k} does not match weight width {kw}")
    if tuple(xs.shape) != (m, ceil_div(k, bk)):
        raise ValueError(f"activation scales {tuple(xs.shape)} should be {(m, ceil_div(k, bk))}")
    if tuple(ws.shape) != (ceil_div(n, bn), ceil_div(k, bk)):
        raise ValueError(f"weight scales {tuple(ws.shape)} should be "
                         f"{(ceil_div(n, bn), ceil_div(k, bk))} for blocks {block}")


def fp8_block_gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``xq [M, K]`` fp8, ``xs [M, ceil(K/bk)]``, ``wq [N, K]`` fp8, ``ws [ceil(N/bn), ceil(K/bk)]``
    -> ``[M, N]`` in ``out_dtype``."""
    check_block_operands(xq, xs, wq, ws, block)
    a = mul_blocks_(codes_to_float(xq), xs, (1, block[1]))
    b = mul_blocks_(codes_to_float(wq), ws, block)
    return (a @ b.T).to(out_dtype)
