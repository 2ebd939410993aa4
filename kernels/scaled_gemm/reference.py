"""Pure-torch spec of the row/column-scaled GEMM: fp8 or int8 W8A8.

``y[m, n] = xs[m] * ws[n] * sum_k xq[m, k] * wq[n, k]``: per-token activation scales and
per-output-channel weight scales (a per-tensor weight scale is a ``[1, 1]`` broadcast).
The kernels accumulate codes (int32 for int8, fp32 for fp8, as cuBLASLt / CUTLASS
scaled_mm do) and scale once at the end. This spec dequantizes both operands in fp32 and
multiplies: the same sum in a different order, chosen so that the CPU engine computes
bit-for-bit what transformers computes on the dequantized checkpoint with fake-quantized
activations (tests/test_engine_smollm2.py). Orders differ by fp32 rounding only.
"""

from __future__ import annotations

import torch

from ..numerics import codes_to_float


def check_scaled_operands(xq, xs, wq, ws) -> None:
    m, k = xq.shape
    n, kw = wq.shape
    if kw != k:
        raise ValueError(f"activation width {k} does not match weight width {kw}")
    if xq.dtype != wq.dtype:
        raise ValueError(f"activation codes are {xq.dtype} but weight codes are {wq.dtype}")
    if tuple(xs.shape) != (m, 1):
        raise ValueError(f"activation scales {tuple(xs.shape)} should be {(m, 1)} (per token)")
    if tuple(ws.shape) not in ((n, 1), (1, 1)):
        raise ValueError(f"weight scales {tuple(ws.shape)} should be {(n, 1)} or (1, 1)")


def scaled_gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``xq [M, K]``, ``xs [M, 1]``, ``wq [N, K]`` (same code dtype), ``ws [N, 1] | [1, 1]``."""
    check_scaled_operands(xq, xs, wq, ws)
    a = codes_to_float(xq).mul_(xs.float())
    b = codes_to_float(wq).mul_(ws.float())
    return (a @ b.T).to(out_dtype)
