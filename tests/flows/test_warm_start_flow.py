"""Warm starts through the flows and the CLI, on a real MLflow store: retrain fine-tunes the
champion and links its run, falls back to scratch when that does not beat the champion, and
`--init` errors are one line."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli
from cnnpipe.models import registry
from cnnpipe.models.params import TrainingParams
from cnnpipe.predictions.champions import promote
from cnnpipe.settings import get_settings
from flows.retrain import retrain

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

QUICK = TrainingParams(epochs=1, batch_size=64, lr=0.01, device="cpu", registered_model="warm")


@pytest.fixture
def shapes_in_home(shapes_dataset, cnnpipe_home):
    shutil.copytree(shapes_dataset, cnnpipe_home / "datasets" / "shapes")
    return cnnpipe_home


@pytest.mark.minutes
def test_retrain_fine_tunes_the_champion_links_its_run_and_falls_back_to_scratch(shapes_in_home, register_version,
                                                                              trained_on_shapes):
    learned = Path(trained_on_shapes.checkpoint)
    champion = register_version("warm", 0.30, checkpoint=learned)
    promote("warm", champion.version)
    warm = retrain("shapes", force=True, params=QUICK)
    assert "fine-tuning champion warm v1, trained on shapes version 2" in warm.why
    assert warm.started_from == "init from warm v1: 4 classes kept, 0 new, 0 dropped"
    assert warm.model_version == "2" and warm.decision.promoted, warm.decision.reason
    client = mlflow.MlflowClient(get_settings().mlflow_tracking_uri)
    run = client.get_run(warm.run_id)
    assert {key: run.data.params[key] for key in ("init", "init_model_version", "init_run_id")} == {
        "init": "warm v1", "init_model_version": "warm/1", "init_run_id": champion.run_id}
    assert mlflow.get_parent_run(warm.run_id).info.run_id == champion.run_id  # nested under it in the UI
    assert registry.client().get_model_version("warm", "2").tags["init"] == "warm v1"

    # A champion it cannot beat: the warm start loses the gate, and the night trains from scratch.
    unbeatable = register_version("warm", 0.999, checkpoint=learned)
    promote("warm", unbeatable.version)
    fallback = retrain("shapes", force=True, params=QUICK)
    assert "the warm start warm/4 did not beat the champion" in fallback.why
    assert fallback.model_version == "5" and fallback.started_from == ""
    assert registry.client().get_model_version("warm", "5").tags["init"] == "scratch"
    assert "init_run_id" in client.get_run(fallback.run_id).data.params

    # --init scratch turns the warm start off; the CLI says where each run started.
    result = CliRunner().invoke(cli, ["retrain", "--dataset", "shapes", "--force", "--init", "scratch", "--epochs", "1",
                                      "--batch-size", "64", "--lr", "0.01", "--device", "cpu",
                                      "--registered-model", "warm"])
    assert result.exit_code == 0 and "registered warm/6" in result.output and "init from" not in result.output
    result = CliRunner().invoke(cli, ["train", "--dataset", "shapes", "--init", "warm/1", "--epochs", "1",
                                      "--batch-size", "64", "--lr", "0.01", "--device", "cpu",
                                      "--registered-model", "warm"])
    assert result.exit_code == 0 and "init from warm v1: 4 classes kept, 0 new, 0 dropped" in result.output
    listed = csv.DictReader(io.StringIO(CliRunner().invoke(cli, ["models", "warm", "--format", "csv"]).output))
    assert {row["version"]: row["started from"] for row in listed} == {
        "7": "v1", "6": "scratch", "5": "scratch", "4": "v3", "3": "", "2": "v1", "1": ""}


def test_cli_refuses_an_init_it_cannot_use_in_one_line(shapes_in_home):
    for arguments, expected in [
        (["--init", "absent.pt"], "--init absent.pt: no such file"),
        (["--init", "torchvision"], "--init torchvision: alexnet-cifar is this pipeline's own network"),
    ]:  # refused before any flow or MLflow store starts
        result = CliRunner().invoke(cli, ["train", "--dataset", "shapes", "--device", "cpu", "--epochs", "1",
                                          *arguments])
        assert result.exit_code == 1 and result.output.startswith(f"Error: shapes: {expected}"), result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    # A registered version is looked up in the flow, whose MLflow store says it is creating its tables.
    result = CliRunner().invoke(cli, ["train", "--dataset", "shapes", "--device", "cpu", "--init", "ghost@champion"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: model ghost@champion: not in the registry")
