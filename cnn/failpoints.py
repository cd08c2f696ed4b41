"""Deterministic crash points for tests: inert unless `FAILPOINT` names one.

`FAILPOINT=parquet.after_rowgroup FAILPOINT_AFTER=3 FAILPOINT_ACTION=kill` kills the
process on the third row group. Actions: kill (SIGKILL), exit (os._exit(137)),
enospc (OSError: no space left), eio (a transient OSError), hang (says so on stderr,
then sleeps an hour), raise (RuntimeError). Timed kills are flaky on two cores;
these are not.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable

_hits: Counter[str] = Counter()


def failpoint(name: str, key: Callable[[], str] | None = None) -> None:
    """`key`, when given, restricts the failpoint to hits whose key equals `FAILPOINT_KEY`."""
    if os.environ.get("FAILPOINT") != name:
        return
    if key is not None and "FAILPOINT_KEY" in os.environ and key() != os.environ["FAILPOINT_KEY"]:
        return
    _hits[name] += 1
    # Fire once, on the k-th hit, so a retry in the same process gets past it.
    if _hits[name] != int(os.environ.get("FAILPOINT_AFTER", "1")):
        return
    action = os.environ.get("FAILPOINT_ACTION", "kill")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(137)
    elif action == "hang":
        # Said, so a test knows the process is held here rather than only slow on a loaded machine.
        print(f"failpoint {name}: hanging", file=sys.stderr, flush=True)
        time.sleep(3600)
    elif action in ("enospc", "eio"):
        code = errno.ENOSPC if action == "enospc" else errno.EIO
        raise OSError(code, os.strerror(code), name)
    else:
        raise RuntimeError(f"failpoint {name} triggered")


def failpoint_armed(name: str) -> bool:
    """Whether `failpoint(name)` may fire: a loop of many hits asks once, not once a hit."""
    return os.environ.get("FAILPOINT") == name


def reset() -> None:
    """Forget hit counts (tests that arm several failpoints in one process)."""
    _hits.clear()
