"""Progress bars on a terminal; periodic log lines everywhere else (CI, Prefect workers)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("cnnpipe.progress")
LOG_EVERY_SECONDS = 15.0


@contextmanager
def progress_bar(description: str, unit: str = "images") -> Iterator[Callable[[int, int | None], None]]:
    """Yield `update(done, total)`; total may be None when a stream cannot tell."""
    if sys.stderr.isatty():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} " + unit + "/s"), TimeElapsedColumn(), TimeRemainingColumn()]
        started = time.perf_counter()
        with Progress(*columns, transient=False) as progress:
            task_id = progress.add_task(description, total=None, rate="-")

            def update(done: int, total: int | None) -> None:
                rate = done / max(time.perf_counter() - started, 1e-9)
                progress.update(task_id, completed=done, total=total, rate=f"{rate:,.0f}")

            yield update
        return
    started = last = time.perf_counter()

    def update(done: int, total: int | None) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= LOG_EVERY_SECONDS:
            last = now
            of_total = f" of {total:,}" if total else ""
            log.info("%s: %s%s %s (%.0f/s)", description, f"{done:,}", of_total, unit, done / (now - started))

    yield update
