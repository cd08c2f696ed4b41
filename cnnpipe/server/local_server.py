"""`cnnpipe server`: the Prefect and MLflow UIs over the pipeline's state, and how commands find them.

Prefect runs as its own `prefect server start --background`, with PREFECT_HOME under
$CNNPIPE_HOME so that its database and PID file live there. The MLflow UI is `mlflow server`
on the tracking store the commands write to, in a session of its own. Both listen on 127.0.0.1
only. Each has a PID file of ours (see `cnnpipe.server.pidfiles`), and `stop` signals only the process
it names: Prefect's own PID file holds a bare PID, which any program may have by now.

`use_local_server` runs before every command, so this module imports only the standard
library at load time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cnnpipe.base.locks import file_lock
from cnnpipe.errors import CnnpipeError
from cnnpipe.server import warm
from cnnpipe.server.pidfiles import Recorded, end, record, recorded
from cnnpipe.settings import Settings, get_settings

HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
# A server on this machine answers in milliseconds; one that does not is taken as absent
# rather than make every command wait on it.
HEALTH_TIMEOUT_SECONDS = 0.5
MLFLOW_HEALTH_TIMEOUT_SECONDS = 5.0
# The first start on a busy 2-core machine migrates Prefect's database for half a minute or more.
STARTUP_TIMEOUT_SECONDS = 180
PREFECT_SERVER_MARK = "prefect.server.api.server:create_app"


@dataclass(frozen=True)
class RunningServer:
    name: str
    url: str
    pid: int
    answering: bool


def use_local_server(environ: dict[str, str] | None = None) -> None:
    """Point Prefect at a `cnnpipe server` that answers now, unless PREFECT_API_URL already says
    where to go. Call before Prefect is imported: it reads its settings once."""
    environ = os.environ if environ is None else environ
    if environ.get("PREFECT_API_URL"):
        return
    settings = get_settings()
    api_url = local_api_url(settings)
    if api_url:
        environ["PREFECT_API_URL"] = api_url
        environ.setdefault("PREFECT_HOME", str(settings.prefect_home))
        if not environ.get("PREFECT_API_SSL_CERT_FILE"):
            bundle = _plain_http_ca_bundle(settings)
            if bundle is not None:
                environ["PREFECT_API_SSL_CERT_FILE"] = str(bundle)


def _plain_http_ca_bundle(settings: Settings) -> Path | None:
    """A CA bundle of one certificate, for Prefect's clients of the local server.

    Each Prefect client builds a verifying TLS context even for a plain-HTTP API, loading the
    150 certificates of certifi's bundle: 30 to 90 ms each on a busy 2-core machine, and a flow
    command makes four (its own, the log and event workers', the events client's version check). The local server speaks HTTP
    on 127.0.0.1 only, so no certificate is ever checked; one loads in a millisecond. None if
    it cannot be written."""
    bundle = settings.server_dir / "plain-http-ca.pem"
    if bundle.exists():
        return bundle
    try:
        import re

        import certifi

        first = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n",
                          Path(certifi.where()).read_text(), re.S)
        if first is None:
            return None
        bundle.parent.mkdir(parents=True, exist_ok=True)
        partial = bundle.with_name(f".{bundle.name}.{os.getpid()}")
        partial.write_text(first.group(0))
        os.replace(partial, bundle)
    except (ImportError, OSError):
        return None
    return bundle


def local_api_url(settings: Settings | None = None) -> str | None:
    """The API of a `cnnpipe server` that answers its health check now, else None."""
    settings = settings or get_settings()
    try:
        port = json.loads(settings.server_state_file.read_text())["prefect_port"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    api_url = _prefect_api_url(port)
    return api_url if _answers(f"{api_url}/health") else None


def local_mlflow_url(settings: Settings | None = None) -> str | None:
    """The MLflow UI of a `cnnpipe server` that serves this store and answers now, else None."""
    settings = settings or get_settings()
    if not _tracks_locally(settings) or not settings.mlflow_server_pid_file.exists():
        return None
    mlflow = recorded(settings.mlflow_server_pid_file).process
    if mlflow is None:
        return None
    url = _mlflow_url(_port_of(mlflow))
    # Its process is alive, so a slow answer is load, not absence: worth waiting for rather than
    # paying seconds to import mlflow instead.
    return url if _answers(f"{url}/health", MLFLOW_HEALTH_TIMEOUT_SECONDS) else None


def ui_urls(settings: Settings | None = None) -> tuple[str, str | None] | None:
    """(Prefect UI, MLflow UI or None) of a running `cnnpipe server`, else None."""
    settings = settings or get_settings()
    api_url = local_api_url(settings)
    if api_url is None:
        return None
    mlflow = recorded(settings.mlflow_server_pid_file).process
    return api_url.removesuffix("/api"), _mlflow_url(_port_of(mlflow)) if mlflow else None


def start(prefect_port: int = DEFAULT_PREFECT_PORT, mlflow_port: int = DEFAULT_MLFLOW_PORT,
          settings: Settings | None = None) -> list[str]:
    """Start whichever of the two servers is not running; return lines saying what runs where.

    Serialised by a file lock, so two starts at once end with one server, both reporting it."""
    settings = settings or get_settings()
    if prefect_port == mlflow_port:
        raise CnnpipeError(f"--port and --mlflow-port are both {prefect_port}; give them different ports")
    with file_lock(settings.locks_dir / "server.lock", waiting="another `cnnpipe server` command is running; waiting"):
        prefect = _recorded_prefect(settings).process
        mlflow = recorded(settings.mlflow_server_pid_file).process
        wants_mlflow = _tracks_locally(settings)
        # A stale PID file would make `prefect server start` refuse to start; the process it names is left alone.
        if prefect is None:
            _forget_prefect(settings)
            _require_free(prefect_port, "--port")
        if wants_mlflow and mlflow is None:
            settings.mlflow_server_pid_file.unlink(missing_ok=True)
            _require_free(mlflow_port, "--mlflow-port")
        if prefect is not None and (not wants_mlflow or mlflow is not None):
            _start_warm_worker(settings)
            return ["Already running:", *_describe(settings), *_moved(prefect, prefect_port, mlflow, mlflow_port)]

        started_prefect_port = _port_of(prefect) if prefect else prefect_port
        settings.server_dir.mkdir(parents=True, exist_ok=True)
        settings.server_state_file.write_text(json.dumps({"prefect_port": started_prefect_port}))
        try:
            waits = []
            if prefect is None:
                _launch_prefect(settings, prefect_port)
                waits.append((f"{_prefect_api_url(prefect_port)}/health", _prefect_record_file(settings),
                              _prefect_failure(settings, prefect_port)))
            if wants_mlflow and mlflow is None:
                _launch_mlflow(settings, mlflow_port)
                waits.append((f"{_mlflow_url(mlflow_port)}/health", settings.mlflow_server_pid_file,
                              f"the MLflow UI on port {mlflow_port} exited while starting; "
                              f"see {settings.mlflow_server_log}"))
            _wait_until_answering(waits)
            _start_warm_worker(settings)
        except BaseException:
            _stop(settings)
            raise
        return ["Started:", *_describe(settings)]


def _start_warm_worker(settings: Settings) -> None:
    """Unless one runs: commands fall back to their own process until it is ready."""
    if warm.AVAILABLE and recorded(settings.warm_pid_file).process is None:
        settings.warm_pid_file.unlink(missing_ok=True)
        record(settings.warm_pid_file, warm.launch(settings.warm_socket, settings.warm_log), warm.WORKER_MODULE)


def stop(settings: Settings | None = None) -> list[str]:
    """Stop both servers, the warm worker and anything they started; return what was stopped."""
    settings = settings or get_settings()
    with file_lock(settings.locks_dir / "server.lock", waiting="another `cnnpipe server` command is running; waiting"):
        said = _stop(settings)
        if not any(line.startswith("Stopped") for line in said):
            said.append("No cnnpipe server was running.")
        return said


def status(settings: Settings | None = None) -> list[str]:
    settings = settings or get_settings()
    return _describe(settings)


def _stop(settings: Settings) -> list[str]:
    """Stop the servers our PID files name, and only those; remove the files, saying which were stale."""
    said = []
    for name, found, forget in (
            ("the Prefect server", _recorded_prefect(settings), lambda: _forget_prefect(settings)),
            ("the MLflow UI", recorded(settings.mlflow_server_pid_file),
             lambda: settings.mlflow_server_pid_file.unlink(missing_ok=True)),
            ("the warm worker", recorded(settings.warm_pid_file), lambda: _forget_warm_worker(settings))):
        if found.process is not None:
            # What `prefect server stop` does too, but to the process we verified, not whatever its PID file names.
            end(found.process)
            said.append(f"Stopped {name} (pid {found.process.pid}).")
        elif found.stale:
            said.append(f"Removed the {found.stale}.")
        forget()
    settings.server_state_file.unlink(missing_ok=True)
    return said


def _forget_warm_worker(settings: Settings) -> None:
    settings.warm_pid_file.unlink(missing_ok=True)
    settings.warm_socket.unlink(missing_ok=True)


def _describe(settings: Settings) -> list[str]:
    lines = []
    recorded_prefect = _recorded_prefect(settings)
    prefect = recorded_prefect.process
    api_url = _prefect_api_url(_port_of(prefect)) if prefect else None
    prefect_answers = bool(api_url) and _answers(f"{api_url}/health")
    if prefect is None:
        lines.append(f"Prefect UI:  {_not_running(recorded_prefect)}")
    else:
        answering = "" if prefect_answers else ", not answering yet"
        database = os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") or settings.prefect_home / "prefect.db"
        lines.append(f"Prefect UI:  {api_url.removesuffix('/api')}  flow runs, logs, artifacts "
                     f"(pid {prefect.pid}{answering}; database {database})")
    if not _tracks_locally(settings):
        lines.append(f"MLflow UI:   {settings.mlflow_tracking_uri}  (MLFLOW_TRACKING_URI, a server of its own)")
    else:
        recorded_mlflow = recorded(settings.mlflow_server_pid_file)
        mlflow = recorded_mlflow.process
        if mlflow is None:
            lines.append(f"MLflow UI:   {_not_running(recorded_mlflow)}")
        else:
            url = _mlflow_url(_port_of(mlflow))
            answering = "" if _answers(f"{url}/health") else ", not answering yet"
            lines.append(f"MLflow UI:   {url}  runs, metrics, plots, models and champions "
                         f"(pid {mlflow.pid}{answering}; store {settings.mlflow_tracking_uri})")
    worker = recorded(settings.warm_pid_file).process
    if worker is not None:
        ready = "ready" if settings.warm_socket.exists() else "importing"
        lines.append(f"Warm worker: pid {worker.pid}, {ready}; {', '.join(sorted(warm.WARM_COMMANDS))} from a shell "
                     "with the environment it started in run in a fork of it, the stack imported (CNNPIPE_WARM=0: not)")
    explicit = os.environ.get("PREFECT_API_URL")
    if explicit and explicit != api_url:
        lines.append(f"Flow commands run on PREFECT_API_URL={explicit}, which wins over the local server.")
    elif prefect_answers:
        lines.append("Flow commands in any shell run on this Prefect server; `cnnpipe server stop` stops both.")
    else:
        lines.append("Flow commands run on Prefect's ephemeral API, started by each command.")
    return lines


def _not_running(found: Recorded) -> str:
    if found.stale:
        return f"not running: {found.stale} (`cnnpipe server start` or `stop` removes it)"
    return "not running (`cnnpipe server start` starts it)"


def _moved(prefect, prefect_port: int, mlflow, mlflow_port: int) -> list[str]:
    asked = [f"port {port} was asked for" for process, port in ((prefect, prefect_port), (mlflow, mlflow_port))
             if process is not None and _port_of(process) != port]
    return [f"({'; '.join(asked)}: `cnnpipe server stop` first to move it.)"] if asked else []


def _launch_prefect(settings: Settings, port: int) -> None:
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    # Its own session: Ctrl-C in the shell that started it, or the end of `make`, leaves it running.
    started = subprocess.run(
        [sys.executable, "-m", "prefect", "server", "start", "--background", "--host", HOST, "--port", str(port),
         "--analytics-off"],
        env=_prefect_environment(settings, port), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        start_new_session=True, timeout=300)
    if started.returncode != 0:
        said = [line.strip() for line in (started.stdout + started.stderr).splitlines() if line.strip()]
        raise CnnpipeError(f"prefect server start on port {port} failed: {said[-1] if said else started.returncode}")
    try:
        launched = int(settings.prefect_server_pid_file.read_text().strip())
    except (OSError, ValueError):
        return  # gone already: waiting for it says so
    record(_prefect_record_file(settings), launched, PREFECT_SERVER_MARK)


def _launch_mlflow(settings: Settings, port: int) -> None:
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", settings.mlflow_tracking_uri,
               "--host", HOST, "--port", str(port), "--workers", "1"]
    if settings.mlflow_artifacts_dir is not None:
        command += ["--default-artifact-root", settings.mlflow_artifacts_dir.as_uri()]
    settings.server_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.mlflow_server_log, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    record(settings.mlflow_server_pid_file, process.pid, "mlflow")


def _prefect_environment(settings: Settings, port: int) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(settings.prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # The UI it serves talks to this API, not to one a PREFECT_API_URL in the shell names.
    env["PREFECT_API_URL"] = _prefect_api_url(port)
    return env


def _prefect_failure(settings: Settings, port: int) -> str:
    return (f"the Prefect server on port {port} exited while starting; "
            f"`PREFECT_HOME={settings.prefect_home} prefect server start --port {port}` shows why")


def _wait_until_answering(waits: list[tuple[str, Path, str]]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    pending = list(waits)
    while pending:
        for wait in list(pending):
            health_url, pid_file, failure = wait
            if _answers(health_url):
                pending.remove(wait)
            elif recorded(pid_file).process is None:
                raise CnnpipeError(failure)
        if pending and time.monotonic() > deadline:
            raise CnnpipeError(f"{pending[0][0]} did not answer within {STARTUP_TIMEOUT_SECONDS} s")
        if pending:
            time.sleep(0.25)


def _recorded_prefect(settings: Settings) -> Recorded:
    return recorded(_prefect_record_file(settings), settings.prefect_server_pid_file)


def _forget_prefect(settings: Settings) -> None:
    _prefect_record_file(settings).unlink(missing_ok=True)
    settings.prefect_server_pid_file.unlink(missing_ok=True)


def _prefect_record_file(settings: Settings) -> Path:
    """Ours, beside Prefect's own PID file, which holds only the PID."""
    return settings.server_dir / "prefect.pid"


def _port_of(process) -> int:
    arguments = process.cmdline()
    return int(arguments[arguments.index("--port") + 1])


def _require_free(port: int, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # The same test `prefect server start` makes, so a port we pass is one it accepts.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            raise CnnpipeError(f"port {port} on {HOST} is already in use by another program; "
                               f"choose another with {option}") from None


def _tracks_locally(settings: Settings) -> bool:
    """Whether MLflow's store is one we serve (a database or folder), not a tracking server already."""
    return not settings.mlflow_tracking_uri.startswith(("http://", "https://", "databricks"))


def _answers(url: str, timeout: float = HEALTH_TIMEOUT_SECONDS) -> bool:
    import http.client
    import urllib.request

    # No proxy from the environment: these servers are on this machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status == 200
    # HTTPException: with nothing listening on a port in the ephemeral range, a connection to it
    # may be its own other end, and the request comes back as the reply.
    except (OSError, ValueError, http.client.HTTPException):
        return False


def _prefect_api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def _mlflow_url(port: int) -> str:
    return f"http://{HOST}:{port}"
