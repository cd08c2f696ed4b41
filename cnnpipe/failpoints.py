"""Deterministic crash points for tests: inert unless `FAILPOINT` names one.

`FAILPOINT=parquet.after_rowgroup FAILPOINT_AFTER=3 FAILPOINT_ACTION=kill` kills the
process on the third row group. Actions: kill (SIGKILL), exit (os._exit(137)),
enospc (OSError: no space left), raise (RuntimeError). Timed kills are flaky on two cores;
these are not.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    if os.environ.get("FAILPOINT") != name:
        return
    _hits[name] += 1
    if _hits[name] < int(os.environ.get("FAILPOINT_AFTER", "1")):
        return
    action = os.environ.get("FAILPOINT_ACTION", "kill")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(137)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    else:
        raise RuntimeError(f"failpoint {name} triggered")
