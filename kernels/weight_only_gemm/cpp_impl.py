"""int4 weights unpacked from torch's CPU int4pack layout to bf16 in one pass
(``dequant_int4.cpp``, built on first use by :mod:`q.kernels.cpp_build`): what the
weight-only GEMM does for prompts, above the packed kernel's crossover. Bit-identical to
the torch ops it replaces (tests/test_kernels_torch.py); None where it cannot run, and
the caller keeps those ops."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import cpp_build

SOURCE = Path(__file__).with_name("dequant_int4.cpp")
TILE = 32  # columns per pass in the kernel: int4 groups are multiples of it


@functools.cache
def _kernel():
    lib, _ = cpp_build.load(SOURCE)
    if lib is None:
        return None
    fn = lib.q_dequant_int4pack
    i64 = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p] * 3 + [i64] * 4 + [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def dequantize_int4pack(packed: torch.Tensor, scales_and_zeros: torch.Tensor, n: int, k: int,
                        group: int, block: int | None) -> torch.Tensor | None:
    """bf16 ``[n, k]``: ``(q - 8) * s + z`` from torch's packed layout (``block`` rows per
    block, see torch_impl.int4pack_block_n), or None where the kernel cannot run."""
    fn = _kernel()
    if (fn is None or block is None or n % block or block % 2 or group % TILE or k % group
            or scales_and_zeros.dtype != torch.bfloat16 or not packed.is_contiguous()
            or not scales_and_zeros.is_contiguous()):
        return None
    out = torch.empty(n, k, dtype=torch.bfloat16)
    fn(packed.data_ptr(), scales_and_zeros.data_ptr(), out.data_ptr(), n, k, block, group,
       torch.get_num_threads())
    return out
