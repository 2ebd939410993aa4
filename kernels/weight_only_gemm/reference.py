"""Pure-torch spec of the weight-only GEMM: dequantize the weight, multiply in float.

``y = x @ ((w - zero) * scale)^T`` with one scale (and optional zero point) per output row
and ``group_size`` input columns. Weight codes are int8, fp8 (the fallback for GPUs without
fp8 tensor cores), or int4 packed two per byte along K by
:func:`q.kernels.packing.reference.pack_int4_bytes`. The kernels dequantize tile by tile in
registers; this spec dequantizes the whole weight in fp32.
"""

from __future__ import annotations

import torch

from ..numerics import ceil_div, codes_to_float, mul_blocks_, sub_blocks_
from ..packing.reference import unpack_int4_bytes


def check_weight_only_operands(x, wq, ws, group_size, bits, zero) -> None:
    m, k = x.shape
    n = wq.shape[0]
    width = ceil_div(k, 2) if bits == 4 else k
    if bits not in (4, 8):
        raise ValueError(f"weight-only GEMM takes 4- or 8-bit weights, got {bits}")
    if bits == 4 and wq.dtype != torch.uint8:
        raise ValueError(f"int4 weights must be packed into uint8 bytes, got {wq.dtype}")
    if wq.shape[1] != width:
        raise ValueError(f"weight codes {tuple(wq.shape)} do not fit activations of width {k}")
    if tuple(ws.shape) != (n, ceil_div(k, group_size)):
        raise ValueError(f"weight scales {tuple(ws.shape)} should be "
                         f"{(n, ceil_div(k, group_size))} for group size {group_size}")
    if zero is not None and zero.shape != ws.shape:
        raise ValueError(f"zero points {tuple(zero.shape)} should match scales {tuple(ws.shape)}")


def dequantize_weight(wq, ws, k, group_size, bits, zero=None) -> torch.Tensor:
    codes = unpack_int4_bytes(wq, k) if bits == 4 else wq
    w = codes_to_float(codes)
    if zero is not None:
        sub_blocks_(w, zero, (1, group_size))
    return mul_blocks_(w, ws, (1, group_size))


def weight_only_gemm(
    x: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    group_size: int,
    bits: int = 8,
    zero: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x [M, K]`` float; ``wq [N, K]`` int8/fp8 or ``[N, ceil(K/2)]`` uint8 (int4);
    ``ws`` and ``zero`` ``[N, ceil(K / group_size)]`` -> ``[M, N]``."""
    check_weight_only_operands(x, wq, ws, group_size, bits, zero)
    w = dequantize_weight(wq, ws, x.shape[1], group_size, bits, zero)
    return (x.float() @ w.T).to(out_dtype)
