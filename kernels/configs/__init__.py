"""Launch configurations of the Triton kernels, kept as data: one JSON file per op.

Each ``<op>.json`` holds a ``default`` entry, per-M-bucket entries under ``m`` (buckets 1, 16,
128, 1024 and 4096, the last covering every larger M), and optional per-shape overrides under
``nk`` keyed ``"NxK"`` and then by bucket. :func:`launch_config` merges them in that order.
A ``_note`` key says where the numbers came from. Reading the files needs no Triton.

``cpu.json`` is different: per op that torch's CPU kernels run with more than one candidate
kernel, ``[largest M, kernel]`` buckets (:func:`cpu_choice`), measured and written by
``tests/bench/tune_kernels_cpu.py``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

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


@functools.cache
def _cpu_table() -> dict:
    return _table("cpu")


def cpu_choice(op: str, m: int) -> str:
    """Which torch CPU kernel runs ``op`` for ``m`` rows, from ``cpu.json``: a list of
    ``[largest m, kernel]`` buckets per op, the last one open-ended (``null``)."""
    for largest, kernel in _cpu_table()[op]:
        if largest is None or m <= largest:
            return kernel
    raise ValueError(f"cpu.json: the buckets of {op} end before m={m}")


__all__ = ["M_BUCKETS", "cpu_choice", "launch_config", "m_bucket"]
