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


class TrainingProgress:
    """`on_step` and `on_epoch` callbacks for `cnn.train.fit`: a bar per epoch and a line per epoch."""

    def __init__(self, epochs: int, images_per_epoch: int, logger: logging.Logger | logging.LoggerAdapter = log):
        self.epochs, self.images_per_epoch, self.logger = epochs, images_per_epoch, logger
        self.epoch, self.done, self.started = 0, 0, time.perf_counter()
        self._progress = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[rate]} img/s"),
                                      TimeElapsedColumn(), transient=True)
            self._progress.start()
            self._task = self._progress.add_task("epoch 1", total=images_per_epoch, loss="-", lr="-", rate="-")

    def on_step(self, step: dict) -> None:
        self.done += step["images"]
        if self._progress is not None:
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            self._progress.update(self._task, completed=self.done, loss=f"{step['loss']:.3f}",
                                  lr=f"{step['lr']:.4g}", rate=f"{rate:,.0f}")

    def on_epoch(self, record: dict) -> None:
        self.logger.info("epoch %d/%d: train loss %.3f, accuracy %.1f%%, val top-1 %.1f%%, top-5 %.1f%%, lr %.3g, %.0f img/s",
                 record["epoch"], self.epochs, record["train_loss"], 100 * record["train_accuracy"],
                 100 * record["val_top1"], 100 * record["val_top5"], record["lr"], record["images_per_second"])
        self.done, self.started = 0, time.perf_counter()
        if self._progress is not None:
            self._progress.reset(self._task, total=self.images_per_epoch, description=f"epoch {record['epoch'] + 1}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
