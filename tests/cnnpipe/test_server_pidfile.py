"""`cnnpipe server stop/status` over PID files whose PID another program has now: no server is started.

A decoy takes the PID: a process whose command line holds what a server's would ("mlflow", or
Prefect's app), with a child of its own, as a PID reused after a reboot may be.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli
from cnnpipe.server.pidfiles import record
from cnnpipe.settings import get_settings


@pytest.fixture
def decoys():
    """Start processes by argv; each is killed, with its children, when the test ends."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], argv0: str) -> psutil.Process:
        """`argv0`: what the process is called once it runs, after the execs that name it."""
        started.append(subprocess.Popen(argv))
        process = psutil.Process(started[-1].pid)
        deadline = time.monotonic() + 10
        while process.cmdline()[:1] != [argv0]:
            assert time.monotonic() < deadline, process.cmdline()
            time.sleep(0.01)
        return process

    yield start
    for popen in started:
        try:
            family = [*psutil.Process(popen.pid).children(recursive=True), psutil.Process(popen.pid)]
        except psutil.NoSuchProcess:
            family = []
        for member in family:
            member.kill()
        # The orphaned child is init's to reap, which takes it a second or two: not worth waiting for.
        popen.wait(timeout=10)


def _bash_decoy(decoys, argv0: str) -> psutil.Process:
    # The background sleep, started first, stays the child of the process bash execs into.
    return decoys(["bash", "-c", f"sleep 1001 & exec -a {argv0} sleep 1002"], argv0)


def _alive(process: psutil.Process) -> bool:
    return process.is_running() and process.status() != psutil.STATUS_ZOMBIE


def _bare_mlflow_pid(decoy: psutil.Process) -> tuple[str, str]:
    return "mlflow_server_pid_file", str(decoy.pid)


def _mlflow_record_started_earlier(decoy: psutil.Process) -> tuple[str, str]:
    return "mlflow_server_pid_file", json.dumps(
        {"pid": decoy.pid, "create_time": decoy.create_time() - 3600, "cmdline": decoy.cmdline()})


def _mlflow_record_of_another_command(decoy: psutil.Process) -> tuple[str, str]:
    return "mlflow_server_pid_file", json.dumps(
        {"pid": decoy.pid, "create_time": decoy.create_time(),
         "cmdline": [sys.executable, "-m", "mlflow", "server", "--port", "5000"]})


def _bare_prefect_pid(decoy: psutil.Process) -> tuple[str, str]:
    return "prefect_server_pid_file", str(decoy.pid)


@pytest.mark.parametrize("argv0, pid_file", [
    ("mlflow-notes", _bare_mlflow_pid),
    ("mlflow-notes", _mlflow_record_started_earlier),
    ("mlflow-notes", _mlflow_record_of_another_command),
    ("prefect.server.api.server:create_app", _bare_prefect_pid),
], ids=["bare-mlflow-pid", "mlflow-record-started-earlier", "mlflow-record-of-another-command", "bare-prefect-pid"])
def test_stop_and_status_leave_a_process_a_stale_pid_file_names_alone_and_say_so(decoys, argv0, pid_file):
    decoy = _bash_decoy(decoys, argv0)
    [child] = decoy.children()
    attribute, text = pid_file(decoy)
    path = getattr(get_settings(), attribute)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)

    status = CliRunner().invoke(cli, ["server", "status"])
    assert status.exit_code == 0, status.output
    said = [line for line in status.output.splitlines() if "stale PID file" in line]
    assert len(said) == 1 and f"stale PID file {path}: pid {decoy.pid} " in said[0], status.output
    assert path.exists(), "status only looks"

    stopped = CliRunner().invoke(cli, ["server", "stop"])
    assert stopped.exit_code == 0, stopped.output
    said = [line for line in stopped.output.splitlines() if "stale" in line]
    assert len(said) == 1 and said[0].startswith(f"Removed the stale PID file {path}: pid {decoy.pid} "), stopped.output
    assert _alive(decoy) and _alive(child)
    assert not path.exists()


def test_stop_stops_the_process_its_pid_file_recorded(decoys):
    server = decoys([sys.executable, "-c", "import time; time.sleep(1001)", "mlflow", "--port", "5999"],
                    sys.executable)
    settings = get_settings()
    settings.server_dir.mkdir(parents=True)
    record(settings.mlflow_server_pid_file, server.pid, "mlflow")

    status = CliRunner().invoke(cli, ["server", "status"])
    assert status.exit_code == 0, status.output
    assert status.output.splitlines()[1].startswith("MLflow UI:   http://127.0.0.1:5999")
    assert f"pid {server.pid}" in status.output

    stopped = CliRunner().invoke(cli, ["server", "stop"])
    assert stopped.exit_code == 0, stopped.output
    assert stopped.output.splitlines() == [f"Stopped the MLflow UI (pid {server.pid})."]
    assert not _alive(server)
