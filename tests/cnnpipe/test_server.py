"""`cnnpipe server`: a real Prefect server and MLflow UI in a temporary $CNNPIPE_HOME, and how
commands find them. One server serves the module; its last test stops it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.imagefactory import write_class_folders

# Its module fixture is costly: every test of the module runs on one xdist worker, which builds it once.
pytestmark = pytest.mark.xdist_group("server")

# What main() leaves in PREFECT_API_URL, run as the `cnnpipe` script runs it.
PROBE = """
import os, sys, time
from cnnpipe.cli import main
sys.argv = ["cnnpipe", "--version"]
began = time.perf_counter()
try:
    main()
except SystemExit:
    pass
print(os.environ.get("PREFECT_API_URL"), "prefect" in sys.modules, round(time.perf_counter() - began, 3))
"""


@dataclass
class Server:
    home: Path
    port: int
    mlflow_port: int
    starts: list[subprocess.CompletedProcess]


def _clean_environment() -> dict[str, str]:
    """This process's environment without PREFECT_API_URL, and without the MLFLOW_TRACKING_URI that an
    earlier test's in-process mlflow.set_tracking_uri may have left: the server serves $CNNPIPE_HOME's store.
    Without pytest's name of the test running, too, so that commands match the warm worker's environment."""
    return {key: value for key, value in os.environ.items()
            if key not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cnnpipe(home: Path, *argv: str, timeout: float = 400, **extra_env: str) -> subprocess.CompletedProcess:
    env = _clean_environment()
    env.update(CNNPIPE_HOME=str(home), **extra_env)
    return subprocess.run([sys.executable, "-m", "cnnpipe.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def probe_main(home: Path, **extra_env: str) -> tuple[str, bool, float]:
    env = _clean_environment()
    env.update(CNNPIPE_HOME=str(home), **extra_env)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    url, imported, seconds = done.stdout.split()[-3:]
    return url, imported == "True", float(seconds)


def processes_on(*ports: int) -> list[psutil.Process]:
    """Every process serving one of these ports, found by command line whatever the PID files say."""
    wanted = {str(port) for port in ports}
    found = []
    for process in psutil.process_iter(["cmdline"]):
        arguments = process.info["cmdline"] or []
        if "--port" in arguments[:-1] and arguments[arguments.index("--port") + 1] in wanted:
            found.append(process)
    return found


def _reaped_pid() -> int:
    """The PID of a process that has ended, as a server killed by a reboot leaves in its PID file."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def api(port: int, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    """Started by two `server start` at once, over PID files left by a server that died; always
    stopped, and killed by PID if stopping fails, even when a test fails."""
    home = tmp_path_factory.mktemp("server-home")
    port, mlflow_port = free_port(), free_port()
    (home / "prefect").mkdir()
    (home / "prefect" / "server.pid").write_text(str(_reaped_pid()))
    (home / "server").mkdir()
    (home / "server" / "mlflow.pid").write_text(str(_reaped_pid()))
    env = _clean_environment()
    env["CNNPIPE_HOME"] = str(home)
    argv = [sys.executable, "-m", "cnnpipe.cli", "server", "start", "--port", str(port), "--mlflow-port",
            str(mlflow_port)]
    try:
        launched = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for _ in range(2)]
        starts = []
        for process in launched:
            output, errors = process.communicate(timeout=400)
            starts.append(subprocess.CompletedProcess(argv, process.returncode, output, errors))
        yield Server(home, port, mlflow_port, starts)
    finally:
        cnnpipe(home, "server", "stop", timeout=120)
        for process in processes_on(port, mlflow_port):
            for member in [*process.children(recursive=True), process]:
                member.kill()


@pytest.mark.slow
def test_two_starts_at_once_make_one_server_over_stale_pid_files(server):
    assert [start.returncode for start in server.starts] == [0, 0], [start.stdout + start.stderr
                                                                     for start in server.starts]
    first_lines = sorted(start.stdout.splitlines()[0] for start in server.starts)
    assert first_lines == ["Already running:", "Started:"]
    for start in server.starts:
        assert f"http://127.0.0.1:{server.port}" in start.stdout
        assert f"http://127.0.0.1:{server.mlflow_port}" in start.stdout
    prefect_servers = [p for p in processes_on(server.port) if "prefect.server.api.server:create_app" in p.cmdline()]
    assert len(prefect_servers) == 1
    assert (server.home / "prefect" / "prefect.db").exists()


@pytest.mark.slow
def test_status_says_what_runs_where(server):
    status = cnnpipe(server.home, "server", "status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith(f"Prefect UI:  http://127.0.0.1:{server.port}")
    assert lines[1].startswith(f"MLflow UI:   http://127.0.0.1:{server.mlflow_port}")
    assert f"store sqlite:///{server.home / 'mlflow.db'}" in lines[1]
    assert lines[2].startswith("Warm worker: pid ")
    assert lines[3].startswith("Flow commands in any shell run on this Prefect server")


@pytest.mark.slow
def test_commands_find_the_server_unless_prefect_api_url_names_another(server):
    url, prefect_imported, _ = probe_main(server.home)
    assert url == f"http://127.0.0.1:{server.port}/api"
    assert not prefect_imported
    elsewhere = "http://127.0.0.1:9/api"
    assert probe_main(server.home, PREFECT_API_URL=elsewhere)[0] == elsewhere


@pytest.mark.slow
def test_a_flow_command_runs_on_the_server(server, tmp_path):
    write_class_folders(tmp_path / "tiny", {"cat": 2, "dog": 2})
    ingested = cnnpipe(server.home, "ingest", str(tmp_path / "tiny"), "--dataset", "tiny", "--workers", "0")
    assert ingested.returncode == 0, ingested.stderr
    assert f"http://127.0.0.1:{server.port}/runs/flow-run/" in ingested.stdout + ingested.stderr
    runs = api(server.port, "/flow_runs/filter", {"flows": {"name": {"any_": ["ingest"]}}})
    assert [(run["parameters"]["dataset"], run["state_type"]) for run in runs] == [("tiny", "COMPLETED")]


def served_lines(home: Path) -> list[str]:
    return [line for line in (home / "server" / "warm.log").read_text().splitlines() if " pid " in line or "not served" in line]


def wait_for(condition, what: str, seconds: float = 180):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.2)
    return found


@pytest.mark.slow
def test_flow_commands_run_in_a_fork_of_the_warm_worker_and_end_with_their_command(server, tmp_path):
    wait_for((server.home / "server" / "warm.sock").exists, "warm worker ready")
    write_class_folders(tmp_path / "pets", {"cat": 12, "dog": 12})
    ingested = cnnpipe(server.home, "ingest", str(tmp_path / "pets"), "--dataset", "pets")
    assert ingested.returncode == 0, ingested.stderr
    assert "24 added" in ingested.stdout
    assert served_lines(server.home)[-1].endswith(f"cnnpipe ingest {tmp_path / 'pets'} --dataset pets")
    refused = cnnpipe(server.home, "ingest", str(tmp_path / "pets"), "--dataset", "pets", CNNPIPE_EXAMPLE="1")
    assert refused.returncode == 0, refused.stderr
    assert served_lines(server.home)[-1].startswith("not served, as the environment differs (CNNPIPE_EXAMPLE)")
    missing = cnnpipe(server.home, "ingest", str(tmp_path / "absent"), "--dataset", "pets")
    assert (missing.returncode, missing.stderr.strip()) == (1, f"Error: {tmp_path / 'absent'}: no such file or folder")

    # A command killed, by a signal passed on or by SIGKILL, which cannot be, takes its work with it: an
    # ingest held at a failpoint, in a worker of its own whose environment arms it.
    home = tmp_path / "held-home"
    env = {**_clean_environment(), "CNNPIPE_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{server.port}/api",
           "FAILPOINT": "store.before_manifest", "FAILPOINT_ACTION": "hang"}
    (home / "server").mkdir(parents=True)
    worker = subprocess.Popen([sys.executable, "-m", "cnnpipe.cli.warm", str(home / "server" / "warm.sock")], env=env,
                              stdout=open(home / "server" / "warm.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for((home / "server" / "warm.sock").exists, "second warm worker ready")
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            served_before = len(served_lines(home))
            errors = tmp_path / f"held-{number}.err"
            with open(errors, "w") as stderr:
                command = subprocess.Popen([sys.executable, "-m", "cnnpipe.cli", "ingest", str(tmp_path / "pets"),
                                            "--dataset", f"held-{number}"], env=env, stdout=subprocess.DEVNULL,
                                           stderr=stderr)
            line = wait_for(lambda: served_lines(home)[served_before:], "ingest served")[0]
            child = psutil.Process(int(line.split()[3].rstrip(":")))
            wait_for(lambda: "failpoint store.before_manifest: hanging" in errors.read_text(),
                     "ingest held at its failpoint", seconds=120)
            command.send_signal(number)
            command.wait(timeout=120)  # never, were the signal not passed on
            if number == signal.SIGKILL:
                assert command.returncode == -signal.SIGKILL
            else:
                assert command.returncode not in (0, None), errors.read_text()[-2000:]
            wait_for(lambda: not child.is_running(), "end of the worker's child", seconds=30)
    finally:
        worker.terminate()
        worker.wait(timeout=30)


# Two versions registered straight into the store, then listed, promoted and rolled back as the
# commands do it while the server runs: through its MLflow UI, without importing mlflow.
REGISTRY_PROBE = """
import json, sys
from mlflow.tracking import MlflowClient
from cnnpipe.settings import get_settings
direct = MlflowClient(get_settings().mlflow_tracking_uri)
direct.create_registered_model("rest")
for top1 in ("0.5", "0.7"):
    direct.create_model_version("rest", "file:///nowhere/weights", tags={"val_top1": top1})
# A version whose logged model holds real weights, as `cnnpipe train` registers one.
import tempfile, torch
from pathlib import Path
from cnn.model import build_model
with tempfile.TemporaryDirectory() as scratch:
    (Path(scratch) / "extra_files").mkdir()
    torch.save({"model": build_model("alexnet-cifar", 3).state_dict(), "classes": ["a", "b", "c"],
                "config": {"model": "alexnet-cifar", "norm": "lrn", "padding": "zeros", "pool": "max", "dropout": 0.5},
                "colour_stats": {"mean": [0.5] * 3, "std": [0.25] * 3, "eigenvalues": [0.0] * 3,
                                 "eigenvectors": torch.eye(3).tolist()}}, Path(scratch) / "extra_files" / "weights.pt")
    from cnnpipe.models import tracking
    tracking.connect()  # the experiment `cnnpipe train` logs into, its artifacts under the home
    import mlflow
    experiment = mlflow.get_experiment_by_name(tracking.MLFLOW_EXPERIMENT).experiment_id
    logged = direct.create_logged_model(experiment, name="weights")
    direct.log_model_artifacts(logged.model_id, scratch)
direct.create_registered_model("served")
direct.create_model_version("served", f"models:/{logged.model_id}", model_id=logged.model_id)
for name in [name for name in sys.modules if name.startswith("mlflow")]:
    del sys.modules[name]
from cnnpipe.models import registry
from cnnpipe.predictions import champions
client = registry.light_client(get_settings())
steps = [champions.promote("rest", "1").challenger, champions.promote("rest", "2").challenger,
         champions.rollback("rest").challenger]
listed = [(v.version, aliases, v.tags["val_top1"]) for v, aliases in registry.list_versions("rest")]
predictor = registry.load_predictor("served/1")
print(json.dumps([type(client).__name__, steps, listed, [predictor.name, predictor.version, predictor.classes],
                  "mlflow" in sys.modules]))
"""


@pytest.mark.slow
def test_registry_commands_and_loading_a_model_go_through_the_servers_mlflow_ui_without_importing_mlflow(server):
    # The store the server serves, named outright: earlier tests in a session may leave MLflow's own
    # MLFLOW_TRACKING_URI behind (mlflow.set_tracking_uri sets it), pointing elsewhere.
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL" and not key.startswith("MLFLOW_")}
    env.update(CNNPIPE_HOME=str(server.home), MLFLOW_TRACKING_URI=f"sqlite:///{server.home / 'mlflow.db'}")
    done = subprocess.run([sys.executable, "-c", REGISTRY_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client, steps, listed, loaded, mlflow_imported = json.loads(done.stdout.splitlines()[-1])
    assert client == "RestRegistry" and not mlflow_imported
    assert loaded == ["served", "1", ["a", "b", "c"]]
    assert steps == ["1", "2", "1"]
    assert listed == [["2", [], "0.7"], ["1", ["champion"], "0.5"]]
    missing = cnnpipe(server.home, "promote", "rest", "9")
    assert missing.returncode == 1 and missing.stderr.strip().startswith("Error: model rest/9: not in the registry")


def test_a_taken_port_is_one_line_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mlflow_port = free_port()
        started = cnnpipe(tmp_path / "home", "server", "start", "--port", str(port), "--mlflow-port", str(mlflow_port))
    assert started.returncode == 1
    assert started.stderr.strip().splitlines() == [
        f"Error: port {port} on 127.0.0.1 is already in use by another program; choose another with --port"]
    assert processes_on(port, mlflow_port) == []


@pytest.mark.slow
def test_stop_leaves_no_process_and_commands_fall_back(server, tmp_path):
    stopped = cnnpipe(server.home, "server", "stop", timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert "Stopped the Prefect server" in stopped.stdout and "Stopped the MLflow UI" in stopped.stdout
    assert processes_on(server.port, server.mlflow_port) == []
    assert not (server.home / "prefect" / "server.pid").exists()
    # What a server killed without `stop` leaves: its ports recorded, nothing answering.
    (server.home / "server").mkdir(exist_ok=True)
    (server.home / "server" / "server.json").write_text(json.dumps({"prefect_port": server.port}))
    url, _, seconds = probe_main(server.home)
    assert url == "None" and seconds < 1.0
    (tmp_path / "empty").mkdir()
    ingested = cnnpipe(server.home, "ingest", str(tmp_path / "empty"), "--dataset", "empty")
    assert ingested.returncode == 0, ingested.stderr
    assert f"127.0.0.1:{server.port}" not in ingested.stdout + ingested.stderr


def test_serve_says_what_works_where_its_deployments_are_registered():
    from flows.serve import build_deployments, serving_message

    deployments = build_deployments("pets", inbox="./inbox")
    on_server = serving_message(deployments, "http://127.0.0.1:4200/api")
    assert "PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run retrain/nightly" in on_server
    ephemeral = serving_message(deployments, None)
    assert "retrain/nightly, classify/inbox" in ephemeral
    assert "`prefect deployment run` from another shell cannot reach them" in ephemeral
    assert "cnnpipe server start" in ephemeral
