"""Progress bars with ETA (rich) on stderr, or nothing when stderr is not a terminal.

One mechanism for every long step: bytes written by quantize/export, decoder layers of a
calibration, windows and generated tokens of an evaluation.
"""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def _progress(description: str, total: int, enabled: bool | None, unit: str):
    """Yields ``advance(n=1, description=None)``; a no-op when the bar is off."""
    if not (sys.stderr.isatty() if enabled is None else enabled):
        yield lambda n=1, description=None: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counts = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else \
        (MofNCompleteColumn(),)
    columns = (TextColumn("{task.description}"), BarColumn(), *counts, TextColumn("ETA"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)

        def advance(n=1, description=None):
            bar.update(task, advance=n, **({"description": description} if description else {}))
        yield advance


def byte_progress(description: str, total: int, enabled: bool | None = None):
    """Yields ``advance(nbytes)``; shows bytes done, rate and ETA."""
    return _progress(description, total, enabled, "bytes")


def count_progress(description: str, total: int, enabled: bool | None = None):
    """Yields ``advance(n=1, description=None)``; shows items done of ``total`` and ETA."""
    return _progress(description, total, enabled, "items")
