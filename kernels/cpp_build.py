"""Small C++ kernels compiled on first use, for the CPU paths torch has no kernel for.

A source is compiled once per source text (with the q headers it includes), compiler, flags
and CPU (``-march=native``: the CPU's flags are part of the cache key) into
``<q cache>/kernels/`` with the machine's C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``); the files include no torch headers, so each builds in about a
second. They are loaded with ctypes and parallelize with OpenMP:
libgomp has the soname torch's own copy has, so the process keeps one OpenMP runtime.
Where no compiler is found or a build fails, :func:`load` says why and callers keep their
torch path. ``Q_NO_CPP_KERNELS=1`` turns them all off. :func:`bind` loads a source and
declares its exported functions' argument types, so each op's ``cpp_impl.py`` states its
signatures in one line each.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("q.engine")

# The ``int dtype`` argument q's kernels take for their float tensors
_DTYPE_CODES = {"float32": 0, "bfloat16": 1}
# argument codes of bind()'s signatures
_ARG_TYPES = {"i": ctypes.c_int, "l": ctypes.c_int64, "p": ctypes.c_void_p, "f": ctypes.c_float}

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
# Q_NO_AMX_TILES=1: build for this CPU without its AMX tiles, so q's strip-layout kernels
# (amx_tiles.h) run their AVX-512 path, as on CPUs without AMX (tests cover both paths on
# an AMX machine with it)
NO_TILES = ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]


def _flags() -> list[str]:
    return FLAGS + (NO_TILES if os.environ.get("Q_NO_AMX_TILES") == "1" else [])


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


_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def _source_bytes(source: Path) -> bytes:
    """The source and the q headers it includes (``#include "..."``, relative to it): an
    edited header must rebuild every kernel that includes it."""
    text = source.read_bytes()
    return text + b"".join(_source_bytes(source.parent / name.decode())
                           for name in _INCLUDE.findall(text))


def _build(source: Path, compiler: str) -> Path:
    from q.embedded import cache_dir

    key = hashlib.sha256(_source_bytes(source) + " ".join([compiler, *_flags()]).encode()
                         + _cpu_flags().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([compiler, *_flags(), str(source), "-o", tmp], capture_output=True,
                             text=True, timeout=300)
        if run.returncode:
            raise RuntimeError(f"{Path(compiler).name} failed: {run.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: a concurrent build or a crash leaves no torn .so
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the C++ kernel %s: %s", source.name, target)
    return target


@functools.cache
def load(source: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None) or (None, why it is unavailable)."""
    if os.environ.get("Q_NO_CPP_KERNELS"):
        return None, "Q_NO_CPP_KERNELS is set"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (install g++ or set CXX)"
    try:
        return ctypes.CDLL(str(_build(source, compiler))), None
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"building it failed: {e}"


@functools.cache
def bind(source: Path, **signatures: str) -> tuple[ctypes.CDLL | None, str | None]:
    """:func:`load`, with each named function's arguments declared: ``q_fn="ipll f"`` is
    (int, pointer, int64, int64, float); spaces are ignored. Every kernel returns int."""
    lib, why = load(source)
    if lib is None:
        return None, why
    for name, codes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = [_ARG_TYPES[c] for c in codes.replace(" ", "")]
        fn.restype = ctypes.c_int
    return lib, None


def dtype_code(dtype) -> int | None:
    """The kernels' code for a torch dtype (float32, bfloat16), or None."""
    return _DTYPE_CODES.get(str(dtype).removeprefix("torch."))


TILE_FLAGS = frozenset({"amx_tile"})  # -march=native then builds amx_tiles.h's tile loop


def amx_tiles() -> bool:
    """Whether q's strip-layout kernels (``amx_tiles.h``) run on AMX tiles here; without,
    the same kernels run on AVX-512 registers."""
    from .configs import cpu_flags

    return TILE_FLAGS <= cpu_flags() and os.environ.get("Q_NO_AMX_TILES") != "1"


def strip_kernel_name() -> str:
    """The name logs give q's strip-layout kernels on this CPU: ``amx`` with tiles,
    ``avx512`` without (the engine's code calls both ``amx``: one layout, one entry)."""
    return "amx" if amx_tiles() else "avx512"


def bind_amx(source: Path, flags: set[str], init: str, probe, **signatures: str
             ) -> tuple[ctypes.CDLL | None, str | None]:
    """:func:`bind` for a kernel on the strip layout of ``amx_tiles.h``: (library, None)
    once the CPU has the vector ``flags`` (AVX-512 BF16 / VNNI), the source builds (on AMX
    tiles where the CPU has them, :func:`amx_tiles`), Linux grants the process the tile
    state where there are tiles (the exported ``init``) and ``probe(library)``, a call with a
    known exact answer, gets it; else (None, why)."""
    from .configs import cpu_flags

    if not flags <= cpu_flags():
        return None, f"this CPU lacks {', '.join(sorted(flags - cpu_flags()))}"
    lib, why = bind(source, **{init: ""}, **signatures)
    if lib is None:
        return None, why
    if getattr(lib, init)() != 0:
        return None, "Linux refused this process the AMX tile state (arch_prctl)"
    if not probe(lib):
        return None, f"{source.name}'s probe gave a wrong sum on this CPU"
    return lib, None


def plain(t, dtype, shape: tuple | None = None, numel: int | None = None) -> bool:
    """Whether ``t`` can go to a kernel as a pointer: a contiguous tensor of ``dtype`` (and
    of ``shape`` / ``numel`` where given)."""
    return (t.dtype == dtype and t.is_contiguous()
            and (shape is None or tuple(t.shape) == tuple(shape))
            and (numel is None or t.numel() == numel))
