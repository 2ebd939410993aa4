"""The C++ decode-attention kernel (``paged_attention.cpp``), built on first use by
:mod:`q.kernels.cpp_build`; where it cannot be built, :func:`unavailable_reason` says why
and the engine keeps gathering blocks for SDPA."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import cpp_build

SOURCE = Path(__file__).with_name("paged_attention.cpp")
LANES = 16  # positions per accumulator in the kernel: block sizes are multiples of it


@functools.cache
def _library() -> tuple[object, str | None]:
    """(the kernel's function, None) or (None, why it is unavailable)."""
    lib, why = cpp_build.bind(SOURCE, q_paged_decode="i pppppp llllllll ff i")
    return (None, why) if lib is None else (lib.q_paged_decode, None)


def unavailable_reason(dtype: torch.dtype | None = None) -> str | None:
    """Why the kernel cannot run here (None: it can)."""
    if dtype is not None and cpp_build.dtype_code(dtype) is None:
        return f"it takes float32 or bfloat16 caches, not {dtype}"
    return _library()[1]


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: torch.Tensor, lengths: torch.Tensor, scale: float,
                 window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """See :func:`q.kernels.paged_attention.reference.paged_decode`; fp32 ``[B, H, DV]``."""
    fn, why = _library()
    if fn is None:
        raise RuntimeError(f"the C++ paged-attention kernel is unavailable: {why}")
    batch, heads, dim = q.shape
    _, kv_heads, _, block_size = k_cache.shape
    value_dim = v_cache.shape[-1]
    dtype = cpp_build.dtype_code(k_cache.dtype)
    q = q.to(k_cache.dtype).contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()
            and v_cache.dtype == k_cache.dtype and heads % kv_heads == 0
            and block_size % LANES == 0):
        raise ValueError(f"paged_decode takes contiguous caches of one dtype, blocks of a "
                         f"multiple of {LANES} positions, and a whole number of query heads "
                         "per KV head")
    tables = tables.to(torch.int64).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    out = torch.empty(batch, heads, value_dim, dtype=torch.float32)
    fn(dtype, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
       lengths.data_ptr(), out.data_ptr(), batch, heads, kv_heads, dim, value_dim,
       tables.shape[1], block_size, window or 0, scale, softcap or 0.0,
       torch.get_num_threads())
    return out
