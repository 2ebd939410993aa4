"""Named numeric constants and small helpers shared by every reference op."""

from __future__ import annotations

import torch

# Largest finite magnitudes of the OCP fp8 formats: torch.finfo gives them, named here so
# no op writes 448.0 inline.
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {dtype: float(torch.finfo(dtype).max) for dtype in FP8_DTYPES.values()}

# Symmetric integer weight-only numerics follow FastDeploy/Paddle ``weight_quantize``:
# scale = amax / qmax and the codes are clamped to [-qmax, qmax]; the most negative code
# (-128 / -8) is never produced, so the values are symmetric around zero.
INT_QMAX = {8: 127, 4: 7}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def blocked_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Max |x| over each (bn, bk) tile of a 2-D tensor; ragged edge tiles use only real values.

    Zero padding never raises a tile's amax, so padding to the grid and reducing equals a
    reduction over the real elements only (the DeepSeek / compressed-tensors rule).
    Reads N*K elements, writes ceil(N/bn)*ceil(K/bk).
    """
    n, k = x.shape
    bn, bk = block
    gn, gk = ceil_div(n, bn), ceil_div(k, bk)
    ax = x.abs()
    if n % bn or k % bk:
        padded = ax.new_zeros((gn * bn, gk * bk))
        padded[:n, :k] = ax
        ax = padded
    return ax.reshape(gn, bn, gk, bk).amax(dim=(1, 3))


def expand_blocks(scale: torch.Tensor, block: tuple[int, ...], shape: tuple[int, ...]):
    """Broadcast a per-block tensor back to ``shape`` (cropping ragged edge blocks)."""
    out = scale
    for dim, size in enumerate(block):
        if size != 1:
            out = out.repeat_interleave(size, dim=dim)
    slices = tuple(slice(0, s) for s in shape)
    return out[slices]
