"""A training killed by SIGTERM ends KILLED in MLflow; one killed by SIGKILL is failed by the next start."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from cnnpipe.models import tracking
from cnnpipe.settings import get_settings

pytestmark = [pytest.mark.crash, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _start_training(home, api_url) -> subprocess.Popen:
    env = {**os.environ, "CNNPIPE_HOME": str(home), "PREFECT_API_URL": api_url}
    return subprocess.Popen([sys.executable, "-m", "cnnpipe.cli", "train", "--dataset", "shapes", "--epochs", "200",
                             "--batch-size", "32", "--lr", "0.01", "--device", "cpu"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_an_epoch(process: subprocess.Popen, seen: set[str]) -> str:
    """The id of the new run once it has logged a validation figure."""
    client = mlflow.MlflowClient(get_settings().mlflow_tracking_uri)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        except Exception:  # noqa: BLE001 - the store may not exist yet
            runs = []
        for run in runs:
            if run.info.run_id not in seen and "val_top1" in run.data.metrics:
                return run.info.run_id
        time.sleep(0.5)
    raise AssertionError("training logged no epoch in time")


def test_sigterm_ends_the_run_killed_and_sigkill_is_reconciled_later(tiny_shapes_dataset, cnnpipe_home,
                                                                     prefect_harness):
    shutil.copytree(tiny_shapes_dataset, cnnpipe_home / "datasets" / "shapes")
    client = mlflow.MlflowClient(get_settings().mlflow_tracking_uri)

    terminated = _start_training(cnnpipe_home, prefect_harness)
    terminated_id = _wait_for_an_epoch(terminated, set())
    terminated.send_signal(signal.SIGTERM)
    assert terminated.wait(60) != 0
    run = client.get_run(terminated_id).info
    assert run.status == "KILLED" and run.end_time is not None

    killed = _start_training(cnnpipe_home, prefect_harness)
    killed_id = _wait_for_an_epoch(killed, {terminated_id})
    killed.kill()
    killed.wait(60)
    assert client.get_run(killed_id).info.status == "RUNNING"  # nobody could say otherwise
    tracking.connect()  # what the next flow's first task does
    assert client.get_run(killed_id).info.status == "FAILED"
    assert client.get_run(terminated_id).info.status == "KILLED"  # an ended run keeps its status
