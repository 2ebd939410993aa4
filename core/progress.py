"""A byte-counting progress bar with ETA (rich), or nothing when output is not a terminal."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def byte_progress(description: str, total: int, enabled: bool | None = None):
    """Yields ``advance(nbytes)``; draws a bar on stderr when it is a TTY (or enabled=True)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
