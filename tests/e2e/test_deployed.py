"""The pipeline as a service, on real servers on 127.0.0.1 and nothing mocked.

PostgreSQL (a private cluster) behind `prefect server start` and `mlflow server`, a
`prefect worker` for the `cnnpipe` pool, the deployments from deploy/prefect.yaml, and
runs triggered with `prefect deployment run`, exactly as deploy/README.md describes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import psutil
import pytest
from PIL import Image

from cnnpipe.demo import SHAPES, encode, render_shape, write_demo_images
from tests.e2e.servers import BIN, http_ready, mlflow_server, postgres, prefect_server, process, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.minutes, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]


def _cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post_json(url: str, body: dict) -> list | dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _run_deployment(env: dict[str, str], api: str, name: str, parameters: dict) -> dict:
    args = ["deployment", "run", name]
    for key, value in parameters.items():
        args += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    output = _cli(env, *args)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)

    def finished():
        run = _get_json(f"{api}/flow_runs/{run_id}")
        return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    run = wait_for(finished, f"flow run {name}", 300)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    return run


def _deployment(api: str, name: str) -> dict:
    return _get_json(f"{api}/deployments/name/{name}")


def _scheduled_start_times(api: str, deployment_id: str) -> list[str]:
    runs = _post_json(f"{api}/flow_runs/filter", {
        "deployments": {"id": {"any_": [deployment_id]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}, "limit": 200})
    return [run["expected_start_time"] for run in runs]


def write_darkened_shapes(folder: Path, count: int) -> None:
    """New demo shapes at a third of their brightness: what a camera with a failing exposure sends."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    for index in range(count):
        image = np.asarray(render_shape(SHAPES[index % len(SHAPES)], rng)) * 0.3
        (folder / f"{index:04d}.png").write_bytes(encode(Image.fromarray(image.astype(np.uint8)), "PNG"))


def test_the_deployed_pipeline_on_postgres_prefect_and_mlflow_servers(tmp_path):
    # Other tests' helpers (a session's Prefect harness) may be running; only ours must end.
    already_running = {child.pid for child in psutil.Process().children(recursive=True)}
    shapes, archive = write_demo_images(tmp_path / "images")
    with postgres(("prefect", "mlflow")) as database:
        command, server_env, api = prefect_server(f"postgresql+asyncpg://{database}/prefect", tmp_path / "server",
                                                  tmp_path / "prefect.log")
        with process(command, server_env, tmp_path / "prefect.log", http_ready(f"{api}/health"), "prefect server",
                     timeout=180):
            command, tracking = mlflow_server(f"postgresql://{database}/mlflow", tmp_path / "mlartifacts")
            with process(command, dict(os.environ), tmp_path / "mlflow.log", http_ready(f"{tracking}/health"),
                         "mlflow server", timeout=180):
                env = {**os.environ, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": tracking,
                       "CNNPIPE_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "client")}
                _cli(env, "work-pool", "create", "cnnpipe", "--type", "process")
                _cli(env, "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")

                # 1. The schedules exist, with the right cron and timezone.
                nightly, inbox = _deployment(api, "retrain/nightly"), _deployment(api, "classify/inbox")
                assert [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in nightly["schedules"]] == \
                    [("0 2 * * *", "UTC")]
                assert [s["schedule"]["cron"] for s in inbox["schedules"]] == ["*/15 * * * *"]
                # Writers of datasets and of the predictions take turns, whichever worker runs them.
                writers = (nightly, _deployment(api, "ingest/ingest"), inbox)
                assert [deployment["global_concurrency_limit"]["limit"] for deployment in writers] == [1, 1, 1]

                worker_log = tmp_path / "worker.log"
                ready = lambda: "started" in worker_log.read_text().lower()  # noqa: E731
                with process([str(BIN / "prefect"), "worker", "start", "--pool", "cnnpipe", "--type", "process"],
                             env, worker_log, ready, "prefect worker", cwd=REPO):
                    # 2. Retrain on a tiny generated dataset, triggered as an operator would.
                    _run_deployment(env, api, "retrain/nightly", {
                        "dataset": "e2e", "source": str(shapes),
                        "params": {"epochs": 2, "batch_size": 32, "lr": 0.01, "device": "cpu"}})

                    # 3. Through MLflow's REST API: the gate's decision, the run, its metrics, and the
                    # champion alias. Two epochs rarely beat the majority class clearly; then an
                    # operator promotes by hand, as `cnnpipe promote` does against this server.
                    query = urllib.parse.urlencode({"name": "cnn-classifier", "version": "1"})
                    first = _get_json(f"{tracking}/api/2.0/mlflow/model-versions/get?{query}")["model_version"]
                    gate = {tag["key"]: tag["value"] for tag in first["tags"]}
                    assert gate["gate.decision"] in ("promoted", "rejected") and "gate.p_value" in gate
                    if gate["gate.decision"] == "rejected":
                        promoted = subprocess.run([str(BIN / "cnnpipe"), "promote", "cnn-classifier", "1"], env=env,
                                                  capture_output=True, text=True, timeout=120)
                        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
                    query = urllib.parse.urlencode({"name": "cnn-classifier", "alias": "champion"})
                    champion = _get_json(f"{tracking}/api/2.0/mlflow/registered-models/alias?{query}")
                    version = champion["model_version"]
                    run = _get_json(f"{tracking}/api/2.0/mlflow/runs/get?run_id={version['run_id']}")["run"]
                    assert run["info"]["status"] == "FINISHED"
                    metrics = {m["key"] for m in run["data"]["metrics"]}
                    assert {"val_top1", "train_loss", "test_top1", "test_top5"} <= metrics
                    history = _get_json(f"{tracking}/api/2.0/mlflow/metrics/get-history?run_id="
                                        f"{version['run_id']}&metric_key=val_top1")["metrics"]
                    assert sorted(m["step"] for m in history) == [1, 2]

                    # 4. Classify with the champion; the rows land in DuckDB.
                    _run_deployment(env, api, "classify/inbox", {"source": str(archive)})
                    with duckdb.connect(str(tmp_path / "home" / "predictions.duckdb"), read_only=True) as db:
                        rows = db.execute("SELECT count(*), any_value(model_name), any_value(model_version), "
                                          "count(DISTINCT mlflow_run_id) FROM predictions").fetchone()
                    assert rows == (200, "cnn-classifier", version["version"], 1)

                # 5. Deploying again updates the schedules: none is added, no run is scheduled twice.
                before = _scheduled_start_times(api, nightly["id"])
                _cli(env, "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
                for name in ("retrain/nightly", "classify/inbox"):
                    assert len(_deployment(api, name)["schedules"]) == 1
                for deployment in (nightly, inbox):
                    times = _scheduled_start_times(api, deployment["id"])
                    assert not [t for t, n in Counter(times).items() if n > 1], times
                assert before, "the scheduler made no runs to compare"

                # 6. Drift starts a retraining: with the documented trigger turned on, a classify run of
                # darkened images emits cnnpipe.model.drift, and the trigger creates a retrain/nightly run.
                enabled = tmp_path / "prefect-drift.yaml"
                text = (REPO / "deploy" / "prefect.yaml").read_text()
                assert text.count("enabled: false") == 1
                enabled.write_text(text.replace("enabled: false", "enabled: true"))
                _cli(env, "deploy", "--name", "nightly", "--prefect-file", str(enabled))
                write_darkened_shapes(tmp_path / "dark", 100)
                classified = subprocess.run([str(BIN / "cnnpipe"), "classify", str(tmp_path / "dark")], env=env,
                                            capture_output=True, text=True, timeout=300)
                assert classified.returncode == 0, classified.stdout + classified.stderr
                # The server stores the events it receives in batches, a few seconds apart.
                drifted = wait_for(lambda: _post_json(f"{api}/events/filter", {
                    "filter": {"event": {"name": ["cnnpipe.model.drift"]}}, "limit": 10})["events"],
                    "the cnnpipe.model.drift event", 60)
                assert [event["resource"]["version"] for event in drifted] == [version["version"]]

                def triggered():
                    runs = _post_json(f"{api}/flow_runs/filter", {"deployments": {"id": {"any_": [nightly["id"]]}},
                                                                   "limit": 200})
                    return [run for run in runs if (run.get("created_by") or {}).get("type") == "AUTOMATION"]

                assert len(wait_for(triggered, "a retrain/nightly run created by the drift trigger", 120)) == 1

    # 7. Everything stopped: no child process and no server of this test is left.
    time.sleep(1)
    assert [c for c in psutil.Process().children(recursive=True) if c.pid not in already_running] == []
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if any(str(tmp_path) in part or "cnnpipe-pg-" in part for part in (p.info["cmdline"] or []))]
    assert leftovers == []
