"""Launch configurations of the Triton kernels, kept as data: one JSON file per op.

Each ``<op>.json`` holds a ``default`` entry, per-M-bucket entries under ``m`` (buckets 1, 16,
128, 1024 and 4096, the last covering every larger M), and optional per-shape overrides under
``nk`` keyed ``"NxK"`` and then by bucket. :func:`launch_config` merges them in that order.
A ``_note`` key says where the numbers came from. Reading the files needs no Triton.

``cpu.json`` is different: per class of CPU (:func:`cpu_class`: ``amx`` for CPUs with AMX
tiles, ``avx512-bf16``, ``avx512``, ``other``) and per op that the CPU kernels run with more
than one candidate kernel, ``[largest M, kernel]`` buckets (:func:`cpu_choice`), measured
and written by ``tests/bench/tune_kernels_cpu.py`` on a CPU of that class. The classes
differ in kind, not degree: with AMX, oneDNN's bf16 GEMM ran 3-4x faster at M = 128-512
(the tuner's dense_bf16 tables of both classes, docs/benchmarks.md), so a crossover
measured without it is wrong with it. A CPU whose class has no table takes the
nearest measured class below it (then above), and the load logs which.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

log = logging.getLogger("q.engine")

M_BUCKETS = (1, 16, 128, 1024, 4096)


def m_bucket(m: int) -> int:
    """The smallest bucket at or above ``m`` (the largest bucket for anything bigger)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


@functools.cache
def _table(op: str) -> dict:
    path = Path(__file__).with_name(f"{op}.json")
    if not path.is_file():
        raise ValueError(f"no launch configs for op {op!r} (expected {path.name} beside "
                         f"{Path(__file__).name})")
    return json.loads(path.read_text())


def launch_config(op: str, m: int, n: int | None = None, k: int | None = None) -> dict:
    """Launch parameters for ``op`` on an ``[m, k] x [k, n]`` problem (a fresh dict)."""
    table = _table(op)
    bucket = str(m_bucket(m))
    cfg = dict(table.get("default", {}))
    cfg.update(table.get("m", {}).get(bucket, {}))
    if n is not None and k is not None:
        cfg.update(table.get("nk", {}).get(f"{n}x{k}", {}).get(bucket, {}))
    return cfg


CPU_CLASSES = ("amx", "avx512-bf16", "avx512", "other")  # fastest first


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (``flags`` on x86, ``Features`` on Arm; empty off
    Linux), read once."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_class() -> str:
    """This CPU's class for ``cpu.json`` (see the module docstring)."""
    flags = cpu_flags()
    if {"amx_bf16", "amx_int8", "amx_tile"} <= flags:
        return "amx"
    if {"avx512_bf16", "avx512_vnni"} <= flags:
        return "avx512-bf16"
    if "avx512f" in flags:
        return "avx512"
    return "other"


@functools.cache
def _cpu_table() -> dict:
    tables = {k: v for k, v in _table("cpu").items() if k in CPU_CLASSES}
    if not tables:
        raise ValueError("cpu.json holds no table for any CPU class")
    mine = cpu_class()
    i = CPU_CLASSES.index(mine)
    order = [*CPU_CLASSES[i:], *reversed(CPU_CLASSES[:i])]  # nearest below, then above
    chosen = next(c for c in order if c in tables)
    if chosen != mine:
        log.info("kernels/configs/cpu.json has no table for %s CPUs: using the %s one "
                 "(python tests/bench/tune_kernels_cpu.py measures this CPU)", mine, chosen)
    return tables[chosen]


def cpu_choice(op: str, m: int) -> str:
    """Which CPU kernel runs ``op`` for ``m`` rows, from this CPU class's table in
    ``cpu.json``: a list of ``[largest m, kernel]`` buckets per op, the last one open-ended
    (``null``)."""
    for largest, kernel in _cpu_table()[op]:
        if largest is None or m <= largest:
            return kernel
    raise ValueError(f"cpu.json: the buckets of {op} end before m={m}")


__all__ = ["CPU_CLASSES", "M_BUCKETS", "cpu_choice", "cpu_class", "cpu_flags", "launch_config",
           "m_bucket"]
