from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from prefect.artifacts import Artifact

from cnnpipe.cli import cli
from cnnpipe.models.params import TrainingParams
from cnnpipe.settings import get_settings
from flows.retrain import retrain
from flows.serve import build_deployments
from tests.imagefactory import write_class_folders

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

TINY = TrainingParams(epochs=1, batch_size=32, lr=0.01, device="cpu")


def _runs() -> int:
    client = mlflow.MlflowClient(get_settings().mlflow_tracking_uri)
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


def test_retrain_trains_only_when_the_data_changed_since_the_latest_version(tiny_shapes_dataset, cnnpipe_home,
                                                                          tmp_path):
    shutil.copytree(tiny_shapes_dataset, cnnpipe_home / "datasets" / "shapes")
    first = retrain("shapes", params=TINY)
    assert first.model_version == "1" and "cnn-classifier has no registered version yet" in first.why
    # One epoch learns nothing: the challenger is not crowned, and the report says why.
    assert not first.decision.promoted and "majority-class rate" in first.decision.reason
    report = Artifact.get("training-report")
    assert report is not None and first.run_id in report.data and "not promoted" in report.data

    # The loser was trained on this very dataset version: nothing to retrain, champion or not.
    again = retrain("shapes", params=TINY)
    assert again.fit is None and "not training" in again.skipped and "latest version cnn-classifier/1" in again.skipped
    assert _runs() == 1
    assert "Retraining skipped" in Artifact.get("training-report").data

    write_class_folders(tmp_path / "new", {"circle": 6, "square": 6}, seed=7)
    with_new_data = retrain("shapes", source=str(tmp_path / "new"), params=TINY)
    assert with_new_data.ingested.added == 12 and "was trained on shapes" in with_new_data.why
    assert with_new_data.model_version == "2" and with_new_data.fit.dataset_version != first.fit.dataset_version

    # As a deployment passes them: a plain mapping, which the flow's parameter checks and converts.
    forced = retrain("shapes", force=True, params=TINY.model_dump(exclude_defaults=True))
    assert forced.model_version == "3" and _runs() == 3 and forced.why.startswith("training because of --force")


def test_serve_builds_a_nightly_retrain_and_an_inbox_classifier():
    nightly, inbox = build_deployments("pets", "./incoming", cron="30 3 * * *", timezone="Europe/Berlin",
                                       inbox="./inbox", inbox_cron="*/5 * * * *", model="pets@champion",
                                       params=TrainingParams(epochs=5))
    assert nightly.name == "nightly" and nightly.parameters == {"dataset": "pets", "source": "./incoming",
                                                                "params": {"epochs": 5}}
    assert nightly.schedules[0].schedule.cron == "30 3 * * *"
    assert nightly.schedules[0].schedule.timezone == "Europe/Berlin"
    assert inbox.parameters == {"source": "./inbox", "model": "pets@champion"}
    assert inbox.schedules[0].schedule.cron == "*/5 * * * *"


def test_cnnpipe_serve_defaults_to_02_00_nightly_and_the_inbox_every_15_minutes():
    defaults = {param.name: param.default for param in cli.commands["serve"].params}
    assert (defaults["cron"], defaults["inbox_cron"], defaults["timezone"]) == ("0 2 * * *", "*/15 * * * *", "UTC")


def test_cnnpipe_serve_registers_its_schedules_with_the_prefect_api(prefect_harness, cnnpipe_home):
    from prefect.client.orchestration import get_client

    env = {**os.environ, "PREFECT_API_URL": prefect_harness, "CNNPIPE_HOME": str(cnnpipe_home),
           "PYTHONFAULTHANDLER": "1"}
    log = cnnpipe_home.parent / "serve.log"
    # Schedules that cannot come due while the test runs: a due run would keep the server busy.
    with open(log, "w") as output:
        server = subprocess.Popen([sys.executable, "-m", "cnnpipe.cli", "serve", "--dataset", "pets", "--timezone",
                                   "America/New_York", "--cron", "0 2 29 2 *", "--inbox",
                                   str(cnnpipe_home / "inbox"), "--inbox-cron", "0 3 29 2 *"],
                                  env=env, stdout=output, stderr=subprocess.STDOUT, text=True,
                                  # As from a terminal: a suite run in the background inherits SIGINT ignored.
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        found = {}
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline and len(found) < 2:
                for name in ("retrain/nightly", "classify/inbox"):
                    try:
                        found[name] = client.read_deployment_by_name(name)
                    except Exception:  # noqa: BLE001 - not served yet
                        pass
                time.sleep(1)
            # Ctrl-C before the runner is up can be lost in Prefect's start-up; wait until it polls.
            while time.monotonic() < deadline and "polling for scheduled runs" not in log.read_text():
                time.sleep(0.5)
        assert set(found) == {"retrain/nightly", "classify/inbox"}, log.read_text()
        schedule = found["retrain/nightly"].schedules[0]
        assert schedule.schedule.cron == "0 2 29 2 *" and schedule.schedule.timezone == "America/New_York"
        assert schedule.active and found["classify/inbox"].schedules[0].schedule.cron == "0 3 29 2 *"
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack into the log
            server.wait(30)
            raise AssertionError(f"cnnpipe serve ignored Ctrl-C for 60 s:\n{log.read_text()[-20000:]}") from None
    with get_client(sync_client=True) as client:
        # pause_on_shutdown=False: stopping the server leaves the schedule on for its next start.
        assert client.read_deployment_by_name("retrain/nightly").schedules[0].active
