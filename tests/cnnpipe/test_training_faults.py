"""`cnnpipe train` meeting a fault: a resume that would change the run, a damaged newest
checkpoint, a full disk while checkpointing. Each says so in a line; none ends in a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import tracking
from cnnpipe.settings import Settings
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions
from tests.imagefactory import write_class_folders

# Its module fixture is costly: every test of the module runs on one xdist worker, which builds it once.
pytestmark = pytest.mark.xdist_group("training-faults")


def unfinished_run(home: Path, shapes_dataset: Path, shapes_checkpoints: list[Path]) -> Path:
    """The shapes in `home`, and under its checkpoints a copy of the session's 2-epoch run, left unfinished."""
    shutil.copytree(shapes_dataset, home / "datasets" / "shapes")
    run_dir = home / "checkpoints" / "shapes__alexnet-cifar" / "20260101T000000000000Z"
    shutil.copytree(shapes_checkpoints[-1].parent, run_dir, ignore=shutil.ignore_patterns("done"))
    return run_dir


def test_a_resume_that_would_change_the_run_is_refused_in_one_line_saying_what_it_was_started_with(
        shapes_dataset, shapes_checkpoints, cnnpipe_home, tmp_path):
    run_dir = unfinished_run(cnnpipe_home, shapes_dataset, shapes_checkpoints)
    for arguments, started_with in [(["--epochs", "3"], "--epochs 2"), (["--batch-size", "64"], "--batch-size 32"),
                                    (["--lr", "0.1", "--schedule", "step"], "--lr 0.01 --schedule onecycle")]:
        result = CliRunner().invoke(cli, ["train", "--dataset", "shapes", "--device", "cpu", "--resume", *arguments])
        assert result.exit_code == 1, result.output
        assert f"{run_dir} was started with {started_with}, not {' '.join(arguments)}" in result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output

    # New images change the steps an epoch, and the colour statistics the run normalises with.
    write_class_folders(tmp_path / "more", {"circle": 2}, seed=7, split="train")
    store = DatasetStore("shapes", Settings(home=cnnpipe_home, mlflow_tracking_uri=""))
    with store.lock():
        store.commit(store.stage(open_source(str(tmp_path / "more")), IngestOptions(workers=0)))
    result = CliRunner().invoke(cli, ["train", "--dataset", "shapes", "--device", "cpu", "--resume"])
    assert result.exit_code == 1 and f"{run_dir} was started on version " in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (cnnpipe_home / "mlflow.db").exists()  # refused before any run started


@pytest.fixture(scope="module")
def resumed_past_a_damaged_checkpoint_onto_a_full_disk(shapes_dataset, shapes_checkpoints, prefect_harness,
                                                       tmp_path_factory):
    """One training for two faults: `--resume` alone of a run whose newest checkpoint is cut short,
    and the disk full when the epoch it trains again is checkpointed. Returns the home, the run
    folder, the finished `cnnpipe train` and the MLflow runs."""
    home = tmp_path_factory.mktemp("faults") / "cnnpipe-home"
    run_dir = unfinished_run(home, shapes_dataset, shapes_checkpoints)
    damaged = run_dir / "epoch-0002.pt"
    damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
    # A process of its own, so the output is all a user would see, Prefect's log lines included.
    env = {**{key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"},
           "CNNPIPE_HOME": str(home), "PREFECT_API_URL": prefect_harness,
           "FAILPOINT": "ckpt.after_tmp_write", "FAILPOINT_ACTION": "enospc"}
    result = subprocess.run([sys.executable, "-m", "cnnpipe.cli", "train", "--dataset", "shapes", "--device", "cpu",
                             "--resume"], env=env, capture_output=True, text=True, timeout=600)
    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    return home, run_dir, result, runs


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_named_with_why_and_the_epoch_the_run_really_continues_after(
        resumed_past_a_damaged_checkpoint_onto_a_full_disk):
    _, run_dir, result, _ = resumed_past_a_damaged_checkpoint_onto_a_full_disk
    assert f"skipped {run_dir / 'epoch-0002.pt'}: unreadable checkpoint (" in result.stderr
    assert "the run continues after epoch 1, from epoch-0001.pt" in result.stderr
    assert f"resuming {run_dir} after epoch 1 of 2" in result.stderr, result.stderr


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_said_in_one_line_fails_the_mlflow_run_and_leaves_no_partial_file(
        resumed_past_a_damaged_checkpoint_onto_a_full_disk):
    home, run_dir, result, runs = resumed_past_a_damaged_checkpoint_onto_a_full_disk
    error = f"disk full while writing checkpoint {run_dir / 'epoch-0002.pt'} (No space left on device)"
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(f"Error: {error}"), \
        result.stderr
    assert "Traceback" not in result.stderr and "MLflow:" not in result.stderr
    (run,) = runs
    assert run.info.status == "FAILED" and run.data.tags[tracking.FAILURE_TAG].startswith(error)
    assert not list(home.rglob("*.tmp"))
    assert [p.name for p in sorted(run_dir.glob("epoch-*.pt"))] == ["epoch-0001.pt", "epoch-0002.pt"]


def test_a_failed_run_keeps_its_reason_and_its_own_error_when_the_tracking_store_fails_too(monkeypatch):
    client = tracking.connect()
    with pytest.raises(CnnpipeError), tracking.training_run("fails", {}) as failed:
        raise CnnpipeError("disk full while writing checkpoint x.pt")
    run = client.get_run(failed.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags[tracking.FAILURE_TAG] == "disk full while writing checkpoint x.pt"

    def store_is_full(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) database or disk is full")

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", store_is_full)
    with pytest.raises(CnnpipeError, match="disk full while writing"), tracking.training_run("fails", {}) as failed:
        raise CnnpipeError("disk full while writing checkpoint x.pt")
    assert mlflow.active_run() is None
    # `end_run` failed before stopping the run's system metrics thread.
    mlflow.tracking.fluent.run_id_to_system_metrics_monitor.pop(failed.info.run_id).finish()
