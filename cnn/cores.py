"""The cores this process may run on: its CPU affinity, which a container or `taskset` narrows, rather
than the machine's count. Without torch, so that ingest's decoders can size themselves by it."""

from __future__ import annotations

import os


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
