"""The C++ paged-attention kernels (``paged_attention.cpp``): decode steps
(:func:`paged_decode`) and prompts or prompt chunks (:func:`paged_prefill`), built on first
use by :mod:`q.kernels.cpp_build`; where they cannot be built, :func:`unavailable_reason`
says why and the engine keeps torch's SDPA."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import cpp_build
from ..bound_calls import BoundCall

SOURCE = Path(__file__).with_name("paged_attention.cpp")
LANES = 16  # positions per accumulator in the kernel: block sizes are multiples of it


@functools.cache
def _library() -> tuple[object, str | None]:
    """(the loaded kernels, None) or (None, why they are unavailable)."""
    return cpp_build.bind(SOURCE, q_paged_decode="i pl ppppp i llllllll ff i",
                          q_paged_prefill="i pl ppppp l llllllll ff i")


def unavailable_reason(dtype: torch.dtype | None = None) -> str | None:
    """Why the kernel cannot run here (None: it can)."""
    if dtype is not None and cpp_build.dtype_code(dtype) is None:
        return f"it takes float32 or bfloat16 caches, not {dtype}"
    return _library()[1]


def _lib():
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"the C++ paged-attention kernel is unavailable: {why}")
    return lib


def _check_caches(name: str, k_cache, v_cache, heads: int) -> None:
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[3]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()
            and v_cache.dtype == k_cache.dtype and heads % kv_heads == 0
            and block_size % LANES == 0):
        raise ValueError(f"{name} takes contiguous caches of one dtype, blocks of a "
                         f"multiple of {LANES} positions, and a whole number of query heads "
                         "per KV head")


def _decode_arguments(q, k_cache, v_cache, tables, lengths, width, out, scale, window,
                      softcap) -> tuple:
    """``q_paged_decode``'s arguments, q and the caches checked; ``tables`` and
    ``lengths`` are pointers and ``width`` the tables' row length (checked by the caller:
    they change per step when bound)."""
    batch, heads, dim = q.shape
    _, kv_heads, _, block_size = k_cache.shape
    value_dim = v_cache.shape[-1]
    _check_caches("paged_decode", k_cache, v_cache, heads)
    if q.dtype != k_cache.dtype or q.stride(2) != 1 or q.stride(1) != dim:
        raise ValueError("paged_decode takes q [B, H, D] in the caches' dtype, each row's "
                         "heads contiguous")
    if out.dtype not in (torch.float32, k_cache.dtype):
        raise ValueError(f"paged_decode writes float32 or the caches' dtype, not {out.dtype}")
    return (cpp_build.dtype_code(k_cache.dtype), q.data_ptr(), q.stride(0),
            k_cache.data_ptr(), v_cache.data_ptr(), tables, lengths, out.data_ptr(),
            int(out.dtype != torch.float32), batch, heads, kv_heads, dim, value_dim, width,
            block_size, window or 0, scale, softcap or 0.0, torch.get_num_threads())


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: torch.Tensor, lengths: torch.Tensor, scale: float,
                 window: int | None = None, softcap: float | None = None,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """See :func:`q.kernels.paged_attention.reference.paged_decode`: ``[B, H, DV]`` in
    fp32, or in the caches' dtype (``out_dtype``: the fp32 result rounded as ``.to()``
    rounds). ``q``'s rows may be strided (a view of the fused q/k/v projection's output) as
    long as each row's heads are contiguous."""
    lib = _lib()
    if q.dtype != k_cache.dtype or q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.to(k_cache.dtype).contiguous()
    tables = tables.to(torch.int64).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=out_dtype)
    lib.q_paged_decode(*_decode_arguments(q, k_cache, v_cache, tables.data_ptr(),
                                          lengths.data_ptr(), tables.shape[1], out, scale,
                                          window, softcap))
    return out


def bind_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      tables, lengths, width, out: torch.Tensor, scale: float,
                      window: int | None = None, softcap: float | None = None):
    """:func:`paged_decode` of fixed buffers into ``out`` as a call without arguments;
    ``tables`` and ``lengths`` are ``ctypes.c_void_p`` and ``width`` a ``ctypes.c_int64``
    the caller sets, before each call, to contiguous int64 ``[B, width]`` block tables and
    ``[B]`` lengths."""
    if not cpp_build.plain(out, out.dtype, (q.shape[0], q.shape[1], v_cache.shape[-1])):
        raise ValueError("paged_decode's output must be contiguous [B, H, DV]")
    args = _decode_arguments(q, k_cache, v_cache, tables, lengths, width, out, scale, window,
                             softcap)
    return BoundCall(_lib(), "q_paged_decode", args)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  tables: torch.Tensor, spans: torch.Tensor, scale: float,
                  window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """See :func:`q.kernels.paged_attention.reference.paged_prefill`: ``[N, H, DV]`` in the
    caches' dtype. ``q``'s rows may be strided (a view of the fused q/k/v projection's
    output) as long as each row's heads are contiguous; rows no span covers are left
    uninitialized (the engine's spans cover every row of a step)."""
    lib = _lib()
    rows, heads, dim = q.shape
    _, kv_heads, _, block_size = k_cache.shape
    value_dim = v_cache.shape[-1]
    _check_caches("paged_prefill", k_cache, v_cache, heads)
    if q.dtype != k_cache.dtype or q.stride(2) != 1 or q.stride(1) != dim:
        q = q.to(k_cache.dtype).contiguous()
    tables = tables.to(torch.int64).contiguous()
    spans = spans.to(torch.int64).contiguous()
    if spans.dim() != 2 or spans.shape[1] != 3 or spans.shape[0] != tables.shape[0]:
        raise ValueError("spans must be [B, 3] (first row, count, first position), one per "
                         "row of tables")
    if len(spans) and int((spans[:, 0] + spans[:, 1]).max()) > rows:
        raise ValueError(f"spans reach past the {rows} query rows")
    if len(spans) and int((spans[:, 1] + spans[:, 2]).max()) > tables.shape[1] * block_size:
        raise ValueError(f"spans reach past the {tables.shape[1]} blocks of their tables")
    out = torch.empty(rows, heads, value_dim, dtype=k_cache.dtype)
    lib.q_paged_prefill(cpp_build.dtype_code(k_cache.dtype), q.data_ptr(), q.stride(0),
                        k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                        spans.data_ptr(), out.data_ptr(), heads * value_dim, len(spans), heads,
                        kv_heads, dim, value_dim, tables.shape[1], block_size, window or 0,
                        scale, softcap or 0.0, torch.get_num_threads())
    return out
