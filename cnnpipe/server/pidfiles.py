"""PID files that name a process for good: its PID, start time and command line.

A PID alone does not say which program has it: once a process ends, any other may get its PID,
and a `stop` that trusted it would signal that program. Only a process matching all three is
the one recorded. Imports only the standard library at load time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE_SECONDS = 15
# psutil's create_time is boot time plus ticks since boot, and boot time moves when the clock is
# set: a recorded start time matches within this. A bigger step leaves the process unrecognised,
# which is the safe way to be wrong. The command line must match exactly besides.
START_TIME_TOLERANCE_SECONDS = 2.0
RECORD_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class Recorded:
    """What a PID file names: our server, if that very process still runs; else why the file is stale."""
    process: object = None  # a psutil.Process
    stale: str | None = None


def end(process) -> None:
    """SIGTERM to `process` and its children, then kill whatever of them outlives the grace period."""
    import psutil

    try:
        family = [process, *process.children(recursive=True)]
    except psutil.Error:
        return
    for member in family:
        try:
            member.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(family, timeout=STOP_GRACE_SECONDS)
    for member in alive:
        try:
            member.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=STOP_GRACE_SECONDS)


def record(pid_file: Path, pid: int, mark: str) -> None:
    """Write `pid_file` for the process `pid` once its command line holds `mark`; nothing if it ends first."""
    import psutil

    deadline = time.monotonic() + RECORD_TIMEOUT_SECONDS
    try:
        process = psutil.Process(pid)
        # Just after exec the kernel shows an empty command line for a moment (seen under load).
        while mark not in " ".join(cmdline := process.cmdline()):
            if process.status() == psutil.STATUS_ZOMBIE or time.monotonic() > deadline:
                return  # gone already: waiting for it says so
            time.sleep(0.01)
        identity = {"pid": pid, "create_time": process.create_time(), "cmdline": cmdline}
    except psutil.Error:
        return
    # Whole or not at all: `status` reads it without the lock.
    scratch = pid_file.with_name(f"{pid_file.name}.new")
    scratch.write_text(json.dumps(identity))
    os.replace(scratch, pid_file)


def recorded(pid_file: Path, bare_pid_file: Path | None = None) -> Recorded:
    """The server `pid_file` names if its process still runs with the start time and command line
    recorded; else why the file is stale. When there is no `pid_file`, `bare_pid_file` is read: a
    bare PID, as Prefect and earlier versions of cnnpipe write, is never enough to act on."""
    import psutil

    if not pid_file.exists() and bare_pid_file is not None and bare_pid_file.exists():
        pid_file = bare_pid_file
    try:
        text = pid_file.read_text()
    except FileNotFoundError:
        return Recorded()
    except OSError as error:
        return Recorded(stale=f"stale PID file {pid_file}: unreadable ({error.strerror})")
    try:
        identity = json.loads(text)
        pid = int(identity["pid"])
    except (ValueError, KeyError, TypeError):
        identity = None
        try:
            pid = int(text.strip())
        except ValueError:
            return Recorded(stale=f"stale PID file {pid_file}: no PID in it")
    try:
        process = psutil.Process(pid)
        alive = process.status() != psutil.STATUS_ZOMBIE
        if alive and identity is not None and process.cmdline() == identity.get("cmdline") and abs(
                process.create_time() - float(identity.get("create_time", 0))) <= START_TIME_TOLERANCE_SECONDS:
            return Recorded(process)
    except psutil.NoSuchProcess:
        alive = False
    except (psutil.Error, ValueError, TypeError):
        alive = True  # not ours to look at, or a record we cannot compare: not ours to signal either
    if not alive:
        why = "has exited"
    elif identity is None:
        why = "has no start time or command line recorded to check it by; left alone"
    else:
        why = "is another program now; left alone"
    return Recorded(stale=f"stale PID file {pid_file}: pid {pid} {why}")
