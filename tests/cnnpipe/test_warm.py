"""The warm worker's choices, without a worker: which commands it may serve, and when its child
would not behave as a new process would (`cnnpipe.server.warm`). tests/cnnpipe/test_server.py
runs commands through a real one."""

from __future__ import annotations

import os
import sys

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
