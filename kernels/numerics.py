"""Named numeric constants and small helpers shared by every reference op."""

from __future__ import annotations

import threading

import torch

# Largest finite magnitudes of the OCP fp8 formats: torch.finfo gives them, named here so
# no op writes 448.0 inline.
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {dtype: float(torch.finfo(dtype).max) for dtype in FP8_DTYPES.values()}

# Largest positive code per bit width. Activations (and "restricted" weights, Paddle's
# ``weight_quantize``) use [-qmax, qmax] with scale amax / qmax; "full" weights
# (compressed-tensors) also use -qmax - 1 with scale amax / (qmax + 0.5). See int_weight.
INT_QMAX = {8: 127, 4: 7}
INT_RANGES = ("full", "restricted")

# Elements processed at once (whole rows). A 4 MiB fp32 stripe stays in cache across a
# quantizer's passes instead of streaming the whole weight through memory once per op:
# 1.7-2.4x the whole-tensor throughput on one thread of this project's 2-core machine
# (tests/bench/bench_kernels_cpu.py, with and without --stripe 1000000000).
STRIPE_ELEMENTS = 1 << 20


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def stripe_rows(n_rows: int, n_cols: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Row ranges of about STRIPE_ELEMENTS elements, each a multiple of ``multiple`` rows."""
    rows = max(multiple, (STRIPE_ELEMENTS // max(n_cols, 1)) // multiple * multiple)
    return [(r, min(r + rows, n_rows)) for r in range(0, n_rows, rows)]


_scratch = threading.local()


def _scratch_fp32(numel: int, device) -> torch.Tensor:
    """A per-thread fp32 buffer reused across stripes and tensors.

    Allocating a fresh stripe buffer each time costs a kernel mmap plus a page fault per
    4 KiB (measured: 4.9 M faults, 16 s of system time on a 5.6 GiB model).
    """
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel or buf.device != torch.device(device):
        buf = torch.empty(max(numel, STRIPE_ELEMENTS * 2), dtype=torch.float32, device=device)
        _scratch.buf = buf
    return buf[:numel]


def padded_blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 copy of a 2-D tensor as a (rows/bn, bn, cols/bk, bk) view, zero-padded if ragged.

    The copy lives in a per-thread scratch buffer: it is valid until this thread's next
    call, so use it and copy results out before asking for another stripe. Zero padding
    never raises a tile's amax, so it equals a reduction over real elements only (the
    DeepSeek / compressed-tensors rule).
    """
    n, k = x.shape
    bn, bk = block
    gn, gk = ceil_div(n, bn), ceil_div(k, bk)
    out = _scratch_fp32(gn * bn * gk * bk, x.device).view(gn * bn, gk * bk)
    if n % bn or k % bk:
        out.zero_()
        out[:n, :k] = x
    else:
        out.copy_(x)
    return out.view(gn, bn, gk, bk)


def abs_max(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Max |x| (over ``dim``) as max(amax, -amin): two reductions, no |x| temporary; exact on
    bf16 too, and NaN propagates (so the pipeline can refuse it)."""
    if dim is None:
        return torch.maximum(x.amax(), x.amin().neg())
    return torch.maximum(x.amax(dim=dim, keepdim=keepdim), x.amin(dim=dim, keepdim=keepdim).neg())


def block_amax(v: torch.Tensor) -> torch.Tensor:
    """Max |x| per tile of a (gn, bn, gk, bk) view."""
    return abs_max(v, dim=(1, 3))


def expand_blocks(scale: torch.Tensor, block: tuple[int, ...], shape: tuple[int, ...]):
    """Broadcast a per-block tensor back to ``shape`` (cropping ragged edge blocks)."""
    out = scale
    for dim, size in enumerate(block):
        if size != 1:
            out = out.repeat_interleave(size, dim=dim)
    slices = tuple(slice(0, s) for s in shape)
    return out[slices]


def unit_scale_for_zero(amax: torch.Tensor, qmax: float, scale_dtype: torch.dtype):
    """``amax / qmax`` rounded to ``scale_dtype``; all-zero blocks get 1 (exact round trip).

    Tests ``amax == 0`` rather than ``amax > 0`` so NaN and Inf reach the scale, where the
    pipeline detects them and refuses the tensor.
    """
    return torch.where(amax == 0, torch.ones_like(amax), amax / qmax).to(scale_dtype)


# fp8 -> fp32 through fp16 bit patterns: torch's own fp8 cast runs element by element on CPU
# (1.75 ms for a 1536x576 weight on this project's machine), while int16 shifts and the
# fp16 -> fp32 cast are vectorized (0.33 ms; tests/bench/bench_engine_cpu.py --ops).
# e5m2 is the top byte of an fp16. e4m3 (bias 7) shifted into fp16's exponent/mantissa
# fields (bias 15) is the value times 2^-8, subnormals included; one multiply undoes that.
def fp8_to_float(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of fp8 ``codes``, bit-exact vs ``codes.float()`` for every finite code."""
    v = codes.view(torch.int8).to(torch.int16)
    if codes.dtype == torch.float8_e5m2:
        return v.bitwise_left_shift_(8).view(torch.float16).float()
    if codes.dtype != torch.float8_e4m3fn:
        raise ValueError(f"not an fp8 dtype: {codes.dtype}")
    # sign-extension leaves bit 14 set for negative codes after the shift: clear it
    v.bitwise_left_shift_(7).bitwise_and_(~0x4000)
    return v.view(torch.float16).float().mul_(256.0)


def codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    """fp32 copy of int or fp8 codes, fast on CPU."""
    if codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and codes.device.type == "cpu":
        return fp8_to_float(codes)
    return codes.float()


def mul_blocks_(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """In place: multiply a 2-D fp32 ``w`` by a per-(bn, bk)-block ``scale`` (ragged edges
    allowed), in one pass instead of materializing the expanded scale."""
    return _blockwise_(w, scale, block, torch.Tensor.mul_)


def sub_blocks_(w: torch.Tensor, zero: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """In place: subtract a per-block ``zero`` point from a 2-D fp32 ``w``."""
    return _blockwise_(w, zero, block, torch.Tensor.sub_)


def _blockwise_(w, per_block, block, op):
    n, k = w.shape
    bn, bk = block
    rows = per_block.float()
    if bn != 1:
        rows = rows.repeat_interleave(bn, dim=0)[:n]
    full = k // bk
    if full:
        op(w[:, : full * bk].view(n, full, bk), rows[:, :full, None])
    if k % bk:
        op(w[:, full * bk:], rows[:, full:])
    return w
