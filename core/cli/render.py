"""Rich tables for plans, inspections and plugin listings."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.table import Table


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def console() -> Console:
    return Console(stderr=False, width=140)


def plan_summary(plan) -> Table:
    groups = defaultdict(lambda: [0, 0, 0])
    for e in plan.entries:
        g = groups[(e.action, e.reason)]
        g[0] += 1
        g[1] += e.in_bytes
        g[2] += e.out_bytes
    table = Table(title=f"plan: {plan.recipe.scheme} -> {plan.format}")
    for col in ("action", "reason", "tensors", "size in", "size out"):
        table.add_column(col, justify="right" if col.startswith(("tensors", "size")) else "left")
    for (action, reason), (count, bin_, bout) in sorted(groups.items()):
        table.add_row(action, reason, str(count), human(bin_), human(bout))
    total_in, total_out = plan.totals()
    table.add_row("total", "", str(len(plan.entries)), human(total_in), human(total_out),
                  style="bold")
    return table


def plan_detail(plan) -> Table:
    table = Table(title="every tensor")
    for col in ("tensor", "action", "reason", "shape", "dtype", "out", "size in", "size out"):
        table.add_column(col, overflow="fold")
    for e in plan.entries:
        outs = ", ".join(f"{n.rsplit('.', 1)[-1]}:{d}{list(s)}" for n, (d, s) in e.outputs.items())
        table.add_row(e.name, e.action, e.reason, "x".join(map(str, e.shape)), e.dtype,
                      outs, human(e.in_bytes), human(e.out_bytes))
    return table


def inspect_table(report: dict) -> Table:
    table = Table(title=f"{report['path']}: {report['format']}")
    for col in ("module", "qdtype", "granularity", "block", "shape", "scale", "size"):
        table.add_column(col, overflow="fold")
    for layer in report["layers"]:
        table.add_row(layer["module"], layer["qdtype"], layer["granularity"],
                      "x".join(map(str, layer["block_size"])),
                      "x".join(map(str, layer["shape"])),
                      f"{layer['scale_dtype']}{layer['scale_shape']}", human(layer["bytes"]))
    return table


def engine_lines(report: dict) -> list[str]:
    """One line per engine target: does it run this checkpoint, and why (q.inspect's data)."""
    return [f"  {'yes' if e['runs'] else 'no '}  {e['engine']}: {e['target']}: {e['reason']}"
            for e in report.get("engines", [])]
