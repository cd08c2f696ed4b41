"""`cnnpipe train` on data it cannot learn from, or with a loss that blows up: each ends in one
line saying why and what to do, with no traceback and no registered version."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import mlflow
import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli
from cnnpipe.models import tracking
from cnnpipe.settings import Settings
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions
from tests.imagefactory import write_class_folders


def ingest(home, source) -> None:
    store = DatasetStore("shapes", Settings(home=home, mlflow_tracking_uri=""))
    with store.lock():
        store.commit(store.stage(open_source(str(source)), IngestOptions(workers=0)))


def refused(home) -> str:
    result = CliRunner().invoke(cli, ["train", "--dataset", "shapes", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert not (home / "mlflow.db").exists()  # refused before any run started: nothing to register
    return result.output.strip()


def test_one_image_a_class_is_refused_before_training_naming_the_counts(cnnpipe_home, tmp_path):
    # Unsplit, all three land in train, leaving nothing to validate on: this crashed in evaluation.
    write_class_folders(tmp_path / "src", {"circle": 1, "square": 1, "triangle": 1})
    ingest(cnnpipe_home, tmp_path / "src")
    assert refused(cnnpipe_home) == (
        "Error: shapes: the train split of shapes has too few images to train on: circle 1, square 1, triangle 1 "
        "(at least 5 a class are needed); ingest more images")


def test_a_class_missing_from_the_train_split_is_refused_naming_it_first(cnnpipe_home, tmp_path):
    write_class_folders(tmp_path / "src", {"circle": 12, "square": 12}, split="train")
    write_class_folders(tmp_path / "src", {"circle": 2, "square": 2, "triangle": 2}, seed=1, split="test")
    ingest(cnnpipe_home, tmp_path / "src")
    train = DatasetStore("shapes").manifest()["counts"]["train"]
    assert refused(cnnpipe_home) == (
        f"Error: shapes: the train split of shapes has too few images to train on: triangle 0, "
        f"circle {train['circle']}, square {train['square']} (at least 5 a class are needed); ingest more images")


@pytest.mark.slow
def test_a_diverging_run_stops_in_the_epoch_it_diverges_keeping_the_epoch_before_and_registering_nothing(
        tiny_shapes_dataset, prefect_harness, cnnpipe_home):
    shutil.copytree(tiny_shapes_dataset, cnnpipe_home / "datasets" / "shapes")
    # A process of its own, so the output is all a user would see, Prefect's log lines included.
    env = {**{key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"},
           "CNNPIPE_HOME": str(cnnpipe_home), "PREFECT_API_URL": prefect_harness}
    # At this rate the first epoch (three steps, warming up) stays finite and the second does not.
    result = subprocess.run([sys.executable, "-m", "cnnpipe.cli", "train", "--dataset", "shapes", "--device", "cpu",
                             "--epochs", "2", "--batch-size", "16", "--lr", "1.5"],
                            env=env, capture_output=True, text=True, timeout=600)
    [run_dir] = (cnnpipe_home / "checkpoints" / "shapes__alexnet-cifar").iterdir()
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and error.startswith("Error: training diverged in epoch 2: "), result.stderr
    assert error.endswith(f"; train again with --lr 0.15 (a tenth of 1.5); the checkpoint of epoch 1 is kept in "
                          f"{run_dir}"), error
    assert "Traceback" not in result.stderr
    assert (run_dir / "epoch-0001.pt").exists() and not (run_dir / "done").exists()

    client = mlflow.MlflowClient(f"sqlite:///{cnnpipe_home / 'mlflow.db'}")
    assert client.search_model_versions() == []
    (run,) = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    assert run.info.status == "FAILED" and error.removeprefix("Error: ").startswith(run.data.tags[tracking.FAILURE_TAG])
