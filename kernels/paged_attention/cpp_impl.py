"""The C++ decode-attention kernel (``paged_attention.cpp``), built on first use.

It is compiled once per source, compiler flags and CPU (``-march=native``: the CPU's flags
are part of the cache key) into ``<q cache>/kernels/`` with the machine's C++ compiler
(``$CXX``, else ``c++``/``g++``), about a second with no torch headers, and called through
ctypes. Where no compiler is found or the build fails, :func:`unavailable_reason` says why
and the engine keeps gathering blocks for SDPA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("q.engine")

SOURCE = Path(__file__).with_name("paged_attention.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
LANES = 16  # positions per accumulator in the kernel: block sizes are multiples of it


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    from q.embedded import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()
                         + _cpu_flags().encode() + torch.__version__.encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"paged_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                             text=True, timeout=300)
        if run.returncode:
            raise RuntimeError(f"{Path(compiler).name} failed: {run.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: a concurrent build or a crash leaves no torn .so
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the C++ paged decode-attention kernel: %s", target)
    return target


@functools.cache
def _library() -> tuple[object, str | None]:
    """(the kernel's function, None) or (None, why it is unavailable)."""
    if os.environ.get("Q_NO_CPP_KERNELS"):
        return None, "Q_NO_CPP_KERNELS is set"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (install g++ or set CXX)"
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"building it failed: {e}"
    fn = lib.q_paged_decode
    i64 = ctypes.c_int64
    fn.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 6 + [i64] * 8
                   + [ctypes.c_float] * 2 + [ctypes.c_int])
    fn.restype = ctypes.c_int
    return fn, None


def unavailable_reason(dtype: torch.dtype | None = None) -> str | None:
    """Why the kernel cannot run here (None: it can)."""
    if dtype is not None and dtype not in _DTYPES:
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
    dtype = _DTYPES[k_cache.dtype]
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
