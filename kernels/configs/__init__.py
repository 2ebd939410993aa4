"""Launch configurations of the Triton kernels, kept as data: one JSON file per op.

Each ``<op>.json`` holds a ``default`` entry, per-M-bucket entries under ``m`` (buckets 1, 16,
128, 1024 and 4096, the last covering every larger M), and optional per-shape overrides under
``nk`` keyed ``"NxK"`` and then by bucket. :func:`launch_config` merges them in that order.
A ``_note`` key says where the numbers came from. Reading the files needs no Triton.
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


__all__ = ["M_BUCKETS", "launch_config", "m_bucket"]
