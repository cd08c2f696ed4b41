"""What a worker process runs as it starts. It lives apart from the pools that start such workers,
so that a worker, and the fork server it is forked from, imports only this and the function it
runs, not the store (pyarrow and the rest: a tenth of a second of CPU a process, at every ingest)."""

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


def _let_the_fork_server_end() -> None:
    """A worker forked by multiprocessing's fork server holds the pipe whose closing tells the server
    that its owner is gone, so the server outlived an owner killed with SIGKILL, and kept its workers
    and the owner's stdout open. With this copy closed, the server ends with its owner and its
    workers with it (`die_with_parent`)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None:
        os.close(alive)
        server._forkserver_alive_fd = None


def start_worker(pids, environment: dict[str, str]) -> None:
    """A pool worker's initializer: tie its life to the parent's, take the pool owner's `environment`
    (a forked worker has its fork server's), then say its pid to the pool (a SimpleQueue), which has
    no other way to end a call that hangs."""
    die_with_parent()
    _let_the_fork_server_end()
    if environment != os.environ:
        os.environ.clear()
        os.environ.update(environment)
    pids.put(os.getpid())
