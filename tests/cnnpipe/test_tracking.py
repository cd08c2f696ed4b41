"""MLflow tracking on a real SQLite store: concurrent first use, and runs their process left behind."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import mlflow
import pytest

from cnnpipe.models import tracking
from cnnpipe.settings import MLFLOW_EXPERIMENT, get_settings

pytestmark = pytest.mark.slow


def _log_metrics(home: str, barrier, count: int) -> None:
    os.environ["CNNPIPE_HOME"] = home
    from cnnpipe.models import tracking

    barrier.wait(timeout=60)  # both meet a store that does not exist yet
    tracking.connect()
    with mlflow.start_run():
        for step in range(count):
            mlflow.log_metric("value", step, step=step)


def test_two_processes_on_a_fresh_store_share_one_experiment_and_lose_no_metric(cnnpipe_home):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_log_metrics, args=(str(cnnpipe_home), barrier, 200)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(180)
        assert worker.exitcode == 0
    client = mlflow.MlflowClient(get_settings().mlflow_tracking_uri)
    experiments = [e for e in client.search_experiments() if e.name == MLFLOW_EXPERIMENT]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert len(runs) == 2
    for run in runs:
        assert [m.value for m in client.get_metric_history(run.info.run_id, "value")] == list(range(200))


def test_runs_left_running_by_a_dead_process_are_failed_and_nothing_else_is_touched():
    client = tracking.connect()
    with tracking.training_run("finished", {}) as finished:
        pass
    live = tracking.training_run("live", {})
    live_run = live.__enter__()
    try:
        # A child process starts a run and dies without a word, as under kill -9.
        code = ("import os\nfrom cnnpipe.models import tracking\ntracking.connect()\n"
                "active = tracking.training_run('killed', {})\nrun = active.__enter__()\n"
                "print(run.info.run_id, flush=True)\n"
                "os._exit(9)\n")
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        killed_id = child.stdout.split()[-1]
        assert client.get_run(killed_id).info.status == "RUNNING"
        tracking.connect()
        killed = client.get_run(killed_id)
        assert killed.info.status == "FAILED" and killed.info.end_time is not None
        assert client.get_run(finished.info.run_id).info.status == "FINISHED"
        assert client.get_run(live_run.info.run_id).info.status == "RUNNING"
    finally:
        live.__exit__(None, None, None)
    assert client.get_run(live_run.info.run_id).info.status == "FINISHED"


def test_a_failing_block_ends_its_run_failed():
    client = tracking.connect()
    with pytest.raises(RuntimeError), tracking.training_run("fails", {}) as run:
        raise RuntimeError("boom")
    assert client.get_run(run.info.run_id).info.status == "FAILED"
