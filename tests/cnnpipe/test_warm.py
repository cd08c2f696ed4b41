"""The warm worker's choices, without a worker: which commands it may serve, and when its child
would not behave as a new process would (`cnnpipe.server.warm`). tests/cnnpipe/test_server.py
runs commands through a real one."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from cnnpipe.server import warm

WORKER_ENV = {"PATH": "/usr/bin", "CNNPIPE_HOME": "/srv/cnnpipe", "TERM": "xterm", "SHLVL": "1"}


def request(**changes) -> dict:
    return {"argv": ["ingest", "photos/"], "cwd": "/", "env": dict(WORKER_ENV), "python": sys.executable,
            "code": "1:2", **changes}


def test_a_command_from_the_workers_environment_is_served_whatever_its_terminal():
    env = {**WORKER_ENV, "TERM": "screen", "SHLVL": "3", "COLUMNS": "80", "_": "/usr/bin/cnnpipe"}
    assert warm.why_cold(request(env=env), WORKER_ENV, "1:2", "/") is None


def test_the_same_home_named_otherwise_is_the_same_environment():
    # `make demo` starts the server with CNNPIPE_HOME=$(CURDIR)/.cnnpipe and make's own variables.
    started_by_make = {**WORKER_ENV, "CNNPIPE_HOME": "/work/project/.cnnpipe", "MAKELEVEL": "1", "MAKEFLAGS": "s"}
    shell = {key: value for key, value in WORKER_ENV.items() if key != "CNNPIPE_HOME"}
    assert warm.why_cold(request(env=shell, cwd="/work/project"), started_by_make, "1:2", "/work/project") is None
    relative = {**shell, "CNNPIPE_HOME": "project/.cnnpipe"}
    assert warm.why_cold(request(env=relative, cwd="/work"), started_by_make, "1:2", "/work/project") is None
    assert warm.why_cold(request(env=shell, cwd="/elsewhere"), started_by_make, "1:2", "/work/project") == \
        "the environment differs (CNNPIPE_HOME)"


def test_another_environment_python_or_code_runs_cold_and_says_why():
    changed = {**WORKER_ENV, "CNNPIPE_HOME": "/elsewhere", "PREFECT_API_URL": "http://other/api"}
    assert warm.why_cold(request(env=changed), WORKER_ENV, "1:2", "/") == \
        "the environment differs (CNNPIPE_HOME, PREFECT_API_URL)"
    removed = {key: value for key, value in WORKER_ENV.items() if key != "PATH"}
    assert warm.why_cold(request(env=removed), WORKER_ENV, "1:2", "/") == "the environment differs (PATH)"
    assert warm.why_cold(request(python="/opt/other/python"), WORKER_ENV, "1:2", "/") == \
        "another Python (/opt/other/python)"
    assert warm.why_cold(request(), WORKER_ENV, "1:3", "/") == "the code changed since the worker started"


def test_only_flow_commands_go_to_a_worker_and_none_without_one(tmp_path):
    socket_path = tmp_path / "warm.sock"
    socket_path.touch()  # nothing listens on it: a worker killed without cleaning up
    for argv in (["sql", "SELECT 1"], ["server", "stop"], ["classify", "--help"], [], ["ingest", "-h", "x"]):
        assert warm.run_warm(argv, dict(os.environ), socket_path) is None
    assert warm.run_warm(["ingest", "x"], {**os.environ, "CNNPIPE_WARM": "0"}, socket_path) is None
    assert warm.run_warm(["ingest", "x"], dict(os.environ), socket_path) is None  # refused: runs here
    assert warm.run_warm(["ingest", "x"], dict(os.environ), tmp_path / "absent.sock") is None


def test_the_code_fingerprint_moves_when_a_source_changes(tmp_path, monkeypatch):
    package = tmp_path / "cnnpipe" / "server"
    package.mkdir(parents=True)
    (tmp_path / "cnn").mkdir()
    source = tmp_path / "cnn" / "model.py"
    source.write_text("")
    os.utime(source, ns=(1, 1))
    monkeypatch.setattr(warm, "__file__", str(package / "warm.py"))
    before = warm.code_fingerprint()
    os.utime(source, ns=(2, 2))
    assert warm.code_fingerprint() != before == "1:1"


# A worker whose code is the text of a file, which runs a command by writing its arguments, the code
# it ran on and its PID to the file the command names: the same loop as the real one, in a second.
TOY_WORKER = """
import os, sys
from pathlib import Path
from cnnpipe.server import warm
warm.PRELOADED = ()
code = Path(sys.argv[2])
warm.code_fingerprint = code.read_text

def run():
    Path(sys.argv[-1]).write_text(f"{warm.code_fingerprint()} {os.getpid()}")

warm.serve(Path(sys.argv[1]), lambda: None, run)
"""


def test_a_worker_whose_code_changed_starts_again_on_it_and_serves_again(tmp_path, monkeypatch):
    socket_path, code, log = tmp_path / "warm.sock", tmp_path / "code", tmp_path / "warm.log"
    code.write_text("v1")
    monkeypatch.setattr(warm, "code_fingerprint", code.read_text)
    environ = dict(os.environ)
    with open(log, "ab") as output:
        worker = subprocess.Popen([sys.executable, "-c", TOY_WORKER, str(socket_path), str(code)], env=environ,
                                  cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    monkeypatch.chdir(tmp_path)

    def served(argv: list[str]) -> int | None:
        deadline = time.monotonic() + 60
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return warm.run_warm(argv, environ, socket_path)

    def wait_for_ready(times: int) -> None:
        deadline = time.monotonic() + 60
        while log.read_text().count("ready at") < times and time.monotonic() < deadline:
            time.sleep(0.05)

    try:
        wait_for_ready(1)
        assert served(["ingest", "first"]) == 0
        ran_on, child = (tmp_path / "first").read_text().split()
        assert ran_on == "v1" and int(child) != worker.pid
        code.write_text("v2")  # an upgrade: the command and the worker's sources now say v2
        assert served(["ingest", "second"]) is None and not (tmp_path / "second").exists()
        wait_for_ready(2)
        assert served(["ingest", "third"]) == 0
        assert (tmp_path / "third").read_text().split()[0] == "v2"
        assert worker.poll() is None  # the same process, on the new code: `server stop` still finds it
        assert f"not served, as {warm.CODE_CHANGED}: cnnpipe ingest second" in log.read_text()
        assert "starting again on the new code" in log.read_text()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
