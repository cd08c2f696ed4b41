"""Real servers on 127.0.0.1 for the end-to-end test: PostgreSQL, Prefect, MLflow, a worker.

Each is a context manager that starts the process, waits until it answers, and on exit
stops it and its children, so a test leaves no stray processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _postgres_tool(name: str) -> str:
    found = shutil.which(name) or next(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), None)
    if found is None:
        raise FileNotFoundError(f"{name}: PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    return str(found)


def _as_postgres_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI containers often are root.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def wait_for(check, what: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text()[-3000:] if log else ''}")
        try:
            result = check()
            if result:
                return result
        except Exception:  # noqa: BLE001, S110 - not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f} s: {log.read_text()[-3000:] if log else ''}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200


@contextmanager
def postgres(databases: tuple[str, ...]) -> Iterator[str]:
    """A private cluster in a temporary folder; yields `user@127.0.0.1:port`."""
    root = Path(tempfile.mkdtemp(prefix="cnnpipe-pg-"))
    root.chmod(0o755)
    data, socket_dir = root / "data", root / "socket"
    for folder in (data, socket_dir):
        folder.mkdir()
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    subprocess.run(_as_postgres_user([_postgres_tool("initdb"), "-D", str(data), "-U", "postgres",
                                      "--auth=trust", "-E", "UTF8"]), check=True, capture_output=True)
    options = f"-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_postgres_user([_postgres_tool("pg_ctl"), "-D", str(data), "-o", options, "-l",
                                      str(socket_dir / "log"), "-w", "start"]), check=True, capture_output=True)
    try:
        for database in databases:
            subprocess.run([_postgres_tool("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                            database], check=True, capture_output=True)
        yield f"postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres_user([_postgres_tool("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def process(command: list[str], env: dict[str, str], log: Path, ready, what: str, timeout: float = 120,
            cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run `command` in its own process group until the block ends; `ready()` says it is up."""
    with open(log, "w") as output:
        child = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=cwd,
                                 start_new_session=True)
    try:
        wait_for(ready, what, timeout, child, log)
        yield child
    finally:
        stop_group(child)


def stop_group(child: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the whole process group, then SIGKILL what is left."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        child.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait(10)


def prefect_server(database_url: str, home: Path, log: Path) -> tuple[list[str], dict[str, str], str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return command, env, f"http://127.0.0.1:{port}/api"


def mlflow_server(backend_uri: str, artifacts: Path) -> tuple[list[str], str]:
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts), "--serve-artifacts"]
    return command, f"http://127.0.0.1:{port}"


def http_ready(url: str):
    return lambda: _http_ok(url)
