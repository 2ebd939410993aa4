"""The decoder layer's elementwise ops in C++ (``decoder_ops.cpp``, built on first use by
:mod:`q.kernels.cpp_build`), one pass each where transformers runs several torch ops:
bit-exact to :mod:`.reference` for the residual add, the rotary embedding and bf16 SiLU x
up (its SiLU looked up in torch's own SiLU of every bf16 value, :func:`silu_table`), and
for RMSNorm where torch's summation order is found (:func:`torch_sum_lanes`). Each function
takes the layouts the engine has (rows of a fixed stride, the last dimension contiguous)
and raises ``ValueError`` on others: :func:`unavailable_reason` is asked once per load, and
the engine keeps transformers' forward where it is not None.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import cpp_build
from ..bound_calls import BoundCall

SOURCE = Path(__file__).with_name("decoder_ops.cpp")


@functools.cache
def _library():
    return cpp_build.bind(SOURCE, q_rms_norm="iplpl pppll fii",
                          q_rotary_cache="ipll plpl lll pp l ppp li",
                          q_silu_mul="ppl p pl ll i")


@functools.cache
def torch_sum_lanes() -> int | None:
    """The lane count W of the sum kernel torch runs on this CPU, which fixes the order its
    sums add in: probed once, as the W (8 or 16) whose fp32 RMSNorm matches the reference
    on every row of random data (x86 builds of torch 2.13 sum in 8 lanes even on AVX-512
    CPUs); None where neither matches (RMSNorm then sums in 8 lanes, within a few fp32 ulp
    of torch's, not bit-exact)."""
    from . import reference

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=gen) * 30
    weight = torch.ones(1000)
    want = reference.rms_norm(x, weight, 1e-6)
    for lanes in (8, 16):
        if torch.equal(_rms_norm(x, weight, 1e-6, None, lanes), want):
            return lanes
    return None


def unavailable_reason(dtype: torch.dtype) -> str | None:
    if cpp_build.dtype_code(dtype) is None:
        return f"it takes float32 or bfloat16, not {dtype}"
    return _library()[1]


def _rows(x: torch.Tensor, name: str, width: int | None = None) -> int:
    """Row stride of a 2-D CPU tensor whose rows are contiguous."""
    if x.dim() != 2 or x.stride(1) != 1 or x.device.type != "cpu":
        raise ValueError(f"{name} must be 2-D CPU rows, each contiguous (got shape "
                         f"{tuple(x.shape)}, strides {x.stride()})")
    if width is not None and x.shape[1] != width:
        raise ValueError(f"{name} has {x.shape[1]} columns, expected {width}")
    return x.stride(0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """See :func:`.reference.rms_norm`."""
    return _rms_norm(x, weight, eps, residual, torch_sum_lanes() or 8)


def _rms_norm_arguments(x, weight, eps, residual, out, total, lanes) -> tuple:
    """``q_rms_norm``'s arguments, the inputs checked (the outputs: by the caller)."""
    rows, n = x.shape
    xs = _rows(x, "x")
    rs = 0 if residual is None else _rows(residual, "residual", n)
    if weight.dtype != x.dtype or not weight.is_contiguous() or weight.numel() != n:
        raise ValueError("the norm weight must be contiguous, of the activations' width "
                         "and dtype")
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    return (cpp_build.dtype_code(x.dtype), x.data_ptr(), xs, ptr(residual), rs,
            weight.data_ptr(), out.data_ptr(), ptr(total), rows, n, eps, lanes,
            torch.get_num_threads())


def _rms_norm(x, weight, eps, residual, lanes):
    rows, n = x.shape
    out = torch.empty(rows, n, dtype=x.dtype)
    total = None if residual is None else torch.empty(rows, n, dtype=x.dtype)
    _library()[0].q_rms_norm(*_rms_norm_arguments(x, weight, eps, residual, out, total, lanes))
    return out if residual is None else (out, total)


def bind_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
                  residual: torch.Tensor | None = None, total: torch.Tensor | None = None):
    """:func:`rms_norm` of fixed buffers into ``out`` (and the sum ``residual + x`` into
    ``total``) as a call without arguments (:class:`q.kernels.bound_calls.BoundCall`)."""
    rows, n = x.shape
    if any(t is not None and not cpp_build.plain(t, x.dtype, (rows, n)) for t in (out, total)) \
            or (residual is None) != (total is None):
        raise ValueError("the norm's outputs must be contiguous [rows, n] in the activations' "
                         "dtype, the sum output given exactly when a residual is")
    args = _rms_norm_arguments(x, weight, eps, residual, out, total, torch_sum_lanes() or 8)
    return BoundCall(_library()[0], "q_rms_norm", args)


def _rotary_arguments(q, k, v, head_dim, k_cache, v_cache, rows, cos, sin, slots) -> tuple:
    """``q_rotary_cache``'s arguments, q/k/v and the caches checked; ``cos``, ``sin`` and
    ``slots`` are pointers (checked by the caller: they change per step when bound)."""
    dtype = q.dtype
    if any(t.dtype != dtype for t in (k, v)) or head_dim % 2:
        raise ValueError("q, k, v, cos and sin must share a dtype; the head size must be even")
    qs, ks, vs = _rows(q, "q"), _rows(k, "k"), _rows(v, "v")
    heads, kv_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
    value_dim, bs = v.shape[1] // max(kv_heads, 1), 0
    if k_cache is not None:
        bs = k_cache.shape[-1]
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()
                and k_cache.dtype == v_cache.dtype == dtype
                and tuple(k_cache.shape[1:3]) == (kv_heads, head_dim)
                and tuple(v_cache.shape[1:]) == (kv_heads, bs, value_dim)):
            raise ValueError("the cache must be one layer's contiguous [blocks, kvH, d, bs] "
                             "keys and [blocks, kvH, bs, dv] values of the activations' "
                             "dtype, with one int64 slot per row")
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    return (cpp_build.dtype_code(dtype), q.data_ptr(), qs, heads, k.data_ptr(), ks,
            v.data_ptr(), vs, kv_heads, head_dim, value_dim, cos, sin, rows, ptr(k_cache),
            ptr(v_cache), slots, bs, torch.get_num_threads())


def rotary_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, head_dim: int, k_cache: torch.Tensor | None = None,
                 v_cache: torch.Tensor | None = None, slots: torch.Tensor | None = None):
    """Rotate ``q [N, H*d]`` and ``k [N, kvH*d]`` in place and, given a cache, write each
    token's keys and values (``v [N, kvH*dv]``) to ``slots`` (int64); as
    :func:`.reference.rotary` then :func:`.reference.write_cache`."""
    rows = q.shape[0]
    if cos.dtype != q.dtype or sin.dtype != q.dtype:
        raise ValueError("q, k, v, cos and sin must share a dtype; the head size must be even")
    _rows(cos, "cos", head_dim), _rows(sin, "sin", head_dim)
    if cos.stride(0) != head_dim or sin.stride(0) != head_dim or cos.shape[0] != rows:
        raise ValueError("cos and sin must be contiguous [N, head_dim]")
    if k_cache is not None and not (slots.dtype == torch.int64 and slots.is_contiguous()
                                    and slots.numel() == rows):
        raise ValueError("the cache must be one layer's contiguous [blocks, kvH, d, bs] "
                         "keys and [blocks, kvH, bs, dv] values of the activations' "
                         "dtype, with one int64 slot per row")
    args = _rotary_arguments(q, k, v, head_dim, k_cache, v_cache, rows, cos.data_ptr(),
                             sin.data_ptr(), None if slots is None else slots.data_ptr())
    _library()[0].q_rotary_cache(*args)


def bind_rotary_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, cos, sin, slots):
    """:func:`rotary_cache` of fixed buffers (views of one fused q/k/v output may be passed)
    into one layer's caches as a call without arguments; ``cos``, ``sin`` and ``slots`` are
    ``ctypes.c_void_p`` the caller points, before each call, at contiguous ``[N, head_dim]``
    tables in the activations' dtype and ``[N]`` int64 slots."""
    args = _rotary_arguments(q, k, v, head_dim, k_cache, v_cache, q.shape[0], cos, sin, slots)
    return BoundCall(_library()[0], "q_rotary_cache", args)


@functools.cache
def silu_table() -> torch.Tensor:
    """fp32 ``[65536]``: torch's bf16 ``F.silu`` of the bf16 number with each bit pattern,
    the table ``q_silu_mul`` looks SiLU up in. torch computes it in fp32 with Sleef's exp
    and rounds to bf16; its vector and scalar loops agree on every bf16 input (checked when
    this was written, and by tests/test_kernels_decoder_ops.py), so the table holds the very numbers
    ``F.silu`` gives wherever a row's elements fall."""
    import numpy as np

    bits = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16))
    return torch.nn.functional.silu(bits.view(torch.bfloat16)).float().contiguous()


def _silu_mul_arguments(gate, up, out) -> tuple:
    """``q_silu_mul``'s arguments, ``gate`` and ``up`` checked (``out``: by the caller)."""
    rows, n = gate.shape
    stride = _rows(gate, "gate")
    if (gate.dtype != torch.bfloat16 or up.dtype != torch.bfloat16
            or _rows(up, "up", n) != stride or up.shape[0] != rows):
        raise ValueError("SiLU x up takes bf16 gate and up of one shape and row stride (got "
                         f"{gate.dtype} {tuple(gate.shape)} and {up.dtype} {tuple(up.shape)})")
    return (gate.data_ptr(), up.data_ptr(), stride, silu_table().data_ptr(), out.data_ptr(),
            out.stride(0), rows, n, torch.get_num_threads())


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` for bf16 ``[N, n]`` rows (views of one fused gate/up output
    may be passed), bit-exact: see :func:`.reference.silu_mul`."""
    out = torch.empty(gate.shape, dtype=torch.bfloat16)
    _library()[0].q_silu_mul(*_silu_mul_arguments(gate, up, out))
    return out


def bind_silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor):
    """:func:`silu_mul` of fixed buffers into ``out`` as a call without arguments."""
    if not cpp_build.plain(out, torch.bfloat16, tuple(gate.shape)):
        raise ValueError("SiLU x up's output must be contiguous bf16 of gate's shape")
    args = _silu_mul_arguments(gate, up, out)
    return BoundCall(_library()[0], "q_silu_mul", args)
