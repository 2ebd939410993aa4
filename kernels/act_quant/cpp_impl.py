"""Per-token int8 activation quantization in C++ (``int8_per_token.cpp``, built on first use
by :mod:`q.kernels.cpp_build`): bit-exact to :func:`.reference.quantize_activation` with
``group_size=None, qdtype=int8``, in one pass per row. :func:`quantize_int8_per_token`
returns None where it cannot run (no compiler, a dtype other than float32/bfloat16, rows
that are not each contiguous) and the caller keeps the reference."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import cpp_build
from ..bound_calls import BoundCall

SOURCE = Path(__file__).with_name("int8_per_token.cpp")


@functools.cache
def _library():
    return cpp_build.bind(SOURCE, q_quantize_int8_per_token="i pl pp ll i")[0]


def _kernel():
    lib = _library()
    return None if lib is None else lib.q_quantize_int8_per_token


def _arguments(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> tuple | None:
    """The kernel's arguments for ``x`` into ``codes``/``scales``, or None where it cannot
    run them."""
    dtype = cpp_build.dtype_code(x.dtype)
    if dtype is None or x.dim() != 2 or x.device.type != "cpu" or x.stride(1) != 1:
        return None
    rows, k = x.shape
    if not (cpp_build.plain(codes, torch.int8, (rows, k))
            and cpp_build.plain(scales, torch.float32, (rows, 1))):
        return None
    return (dtype, x.data_ptr(), x.stride(0), codes.data_ptr(), scales.data_ptr(), rows, k,
            torch.get_num_threads())


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``x [M, K]`` -> (int8 codes ``[M, K]``, fp32 scales ``[M, 1]``), or None."""
    fn = _kernel()
    if fn is None or x.dim() != 2:
        return None
    codes = torch.empty(x.shape, dtype=torch.int8)
    scales = torch.empty(x.shape[0], 1, dtype=torch.float32)
    args = _arguments(x, codes, scales)
    if args is None:
        return None
    fn(*args)
    return codes, scales


def bind_quantize_int8_per_token(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor):
    """:func:`quantize_int8_per_token` of ``x [M, K]`` into fixed buffers ``codes [M, K]``
    int8 and ``scales [M, 1]`` fp32 as a call without arguments
    (:class:`q.kernels.bound_calls.BoundCall`), or None where it cannot run."""
    lib = _library()
    args = None if lib is None else _arguments(x, codes, scales)
    return None if args is None else BoundCall(lib, "q_quantize_int8_per_token", args)
