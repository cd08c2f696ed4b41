"""What a worker process runs as it starts. It lives apart from the pools that start such workers,
so that a spawned worker imports only this and the function it runs, not the store (pyarrow and
the rest: a tenth of a second of CPU a worker, at every ingest)."""

from __future__ import annotations

import os
import signal


def die_with_parent() -> None:
    """Workers must not outlive a parent killed with SIGKILL, which cannot stop them."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def start_worker(pids) -> None:
    """A pool worker's initializer: tie its life to the parent's, then say its pid to the pool
    (a SimpleQueue), which has no other way to end a call that hangs."""
    die_with_parent()
    pids.put(os.getpid())
