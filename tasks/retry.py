"""When a failed task is worth running again."""

from __future__ import annotations

from cnnpipe.errors import CnnpipeError


def is_transient_io_error(task, task_run, state) -> bool:
    """Retry I/O hiccups; a CnnpipeError (bad source, disk full) fails the same way twice."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) and not isinstance(
        exc, (CnnpipeError, FileNotFoundError, PermissionError))
