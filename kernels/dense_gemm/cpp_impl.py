"""bf16 GEMM on AMX tiles (``amx_bf16.cpp``, built on first use by
:mod:`q.kernels.cpp_build`): the weight kept in the tiles' B layout, read in place. None
where it cannot run, and the caller keeps oneDNN."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import cpp_build
from ..bound_calls import BoundCall

SOURCE = Path(__file__).with_name("amx_bf16.cpp")
FLAGS = {"avx512_bf16"}  # and AMX-BF16 tiles where the CPU has them


def to_amx_bf16_layout(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` bf16 -> ``[N / 16, K / 2, 16, 2]``: per 16 channels, the pairs of each two
    columns side by side, the B operand of AMX's bf16 tiles."""
    n, k = weight.shape
    return weight.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def from_amx_bf16_layout(amx_weight: torch.Tensor) -> torch.Tensor:
    """:func:`to_amx_bf16_layout` undone: the plain ``[N, K]`` weight (a copy)."""
    strips, pairs = amx_weight.shape[:2]
    return amx_weight.permute(0, 2, 1, 3).reshape(strips * 16, pairs * 2)


def _probe(lib) -> bool:
    for m in (1, 5):  # both paths (registers, tiles); every sum is exactly 32, + 1 of bias
        x = torch.ones(m, 32, dtype=torch.bfloat16)
        w = to_amx_bf16_layout(torch.ones(16, 32, dtype=torch.bfloat16))
        bias, out = torch.ones(16), torch.empty(m, 16, dtype=torch.bfloat16)
        lib.q_bf16_amx(x.data_ptr(), w.data_ptr(), bias.data_ptr(), out.data_ptr(), m, 16, 32,
                       1)
        if not torch.equal(out, torch.full((m, 16), 33.0, dtype=torch.bfloat16)):
            return False
    return True


@functools.cache
def _amx():
    return cpp_build.bind_amx(SOURCE, FLAGS, "q_amx_bf16_init", _probe,
                              q_bf16_amx="pppp lll i")


def amx_unavailable(n: int, k: int) -> str | None:
    """Why :func:`bf16_amx` cannot run an ``[n, k]`` weight here (None: it can)."""
    if n % 16 or k % 32:
        return f"N={n}, K={k}: the AMX bf16 kernel takes N % 16 == 0 and K % 32 == 0"
    return _amx()[1]


def _bf16_arguments(x, amx_weight, bias, out) -> tuple | None:
    """``q_bf16_amx``'s arguments for ``out = x @ W^T (+ bias)``, each tensor checked, or
    None where the kernel cannot run them (what :func:`bf16_amx` and :func:`bind_bf16_amx`
    share)."""
    lib = _amx()[0]
    m, k = x.shape
    n = amx_weight.shape[0] * 16
    if (lib is None or m == 0 or not cpp_build.plain(x, torch.bfloat16)
            or not cpp_build.plain(amx_weight, torch.bfloat16, (n // 16, k // 2, 16, 2))
            or (bias is not None and not cpp_build.plain(bias, torch.float32, numel=n))
            or not cpp_build.plain(out, torch.bfloat16, (m, n)) or amx_unavailable(n, k)):
        return None
    return (x.data_ptr(), amx_weight.data_ptr(), None if bias is None else bias.data_ptr(),
            out.data_ptr(), m, n, k, torch.get_num_threads())


def bf16_amx(x: torch.Tensor, amx_weight: torch.Tensor, bias: torch.Tensor | None
             ) -> torch.Tensor | None:
    """``x @ W^T (+ bias)`` in bf16: ``x [M, K]`` bf16, ``amx_weight`` from
    :func:`to_amx_bf16_layout`, ``bias [N]`` fp32 or None, all contiguous. None where it
    cannot run."""
    out = torch.empty(x.shape[0], amx_weight.shape[0] * 16, dtype=torch.bfloat16)
    args = _bf16_arguments(x, amx_weight, bias, out)
    return None if args is None or _amx()[0].q_bf16_amx(*args) else out


def bind_bf16_amx(x: torch.Tensor, amx_weight: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor):
    """:func:`bf16_amx` from ``x`` into ``out`` ``[M, N]`` bf16 (fixed buffers) as a call
    without arguments (:class:`q.kernels.bound_calls.BoundCall`), or None where it cannot
    run."""
    args = _bf16_arguments(x, amx_weight, bias, out)
    return None if args is None else BoundCall(_amx()[0], "q_bf16_amx", args)
