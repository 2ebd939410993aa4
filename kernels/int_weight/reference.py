"""Pure-torch spec of symmetric weight-only integer quantization (WINT8 / WINT4).

Numerics follow Paddle ``weight_quantize`` as FastDeploy uses it: per output channel (or per
``group_size`` input columns), ``s = amax / qmax`` with qmax 127 (int8) or 7 (int4),
``q = round_half_away_from_zero(w / s)`` clamped to ``[-qmax, qmax]``. Scales multiply and
are rounded to their storage dtype before dividing. All-zero rows/groups get scale 1.

Group-wise with ``K % group_size != 0``: the last group is ragged and takes amax over its
real columns (scale grid ``[N, ceil(K / g)]``). Formats that cannot store this refuse it.
"""

from __future__ import annotations

import torch

from ..numerics import INT_QMAX, blocked_amax, expand_blocks


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # torch.round is half-to-even; Paddle/C round() is half away from zero.
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize_int_weight(
    w: torch.Tensor,
    bits: int = 8,
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` -> int8 codes ``[N, K]`` (int4 values kept unpacked in int8) and scales.

    Scale shape is ``[N, 1]`` per channel or ``[N, ceil(K / group_size)]`` group-wise.
    """
    if bits not in INT_QMAX:
        raise ValueError(f"bits must be one of {sorted(INT_QMAX)}, got {bits}")
    qmax = INT_QMAX[bits]
    n, k = w.shape
    block = (1, k if group_size is None else group_size)
    wf = w.float()
    amax = blocked_amax(wf, block)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / qmax).to(scale_dtype)
    full = expand_blocks(scale.float(), block, (n, k))
    q = _round_half_away(wf / full).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_int_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    group_size: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    n, k = q.shape
    block = (1, k if group_size is None else group_size)
    return (q.float() * expand_blocks(scale.float(), block, (n, k))).to(out_dtype)
