from __future__ import annotations

import json
import shutil

import duckdb
import mlflow
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cnn.checkpoint import load_checkpoint
from cnn.predict import Predictor
from cnnpipe.cli import cli
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import registry
from cnnpipe.models.params import TrainingParams
from cnnpipe.settings import get_settings
from flows.train import train

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


@pytest.fixture
def shapes_in_home(shapes_dataset, cnnpipe_home):
    shutil.copytree(shapes_dataset, cnnpipe_home / "datasets" / "shapes")
    return cnnpipe_home


def test_train_flow_logs_a_complete_mlflow_run_and_registers_a_loadable_model(shapes_in_home, tmp_path):
    outcome = train("shapes", TrainingParams(epochs=2, lr=0.01, device="cpu", registered_model="flowtest"))
    result = outcome.fit
    assert result.checkpoint.startswith(str(shapes_in_home / "checkpoints" / "shapes__alexnet-cifar"))
    assert load_checkpoint(result.checkpoint)["epoch"] == 2

    client = mlflow.MlflowClient(get_settings().mlflow_tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["config.epochs"] == "2" and params["config.lr"] == "0.01" and params["config.momentum"] == "0.9"
    # The batch size was left to the recipe: chosen for 640 train images, and marked as such.
    assert params["config.batch_size"] == params["recipe.batch_size"] == str(outcome.recipe.batch_size)
    assert (params["recipe.batch_size.source"], params["recipe.lr.source"], params["recipe.epochs.source"]) == \
        ("auto", "set", "set")
    assert params["recipe.train_images"] == "640" and run.data.tags["recipe"] == outcome.recipe.line()
    assert params["dataset"] == "shapes" and params["dataset_version_id"] == result.dataset_version
    assert params["classes"] == "circle,cross,square,triangle" and params["device"] == "cpu"
    assert params["torch"] == torch.__version__ and "torchvision" in params and "cnn_pipeline" in params
    assert run.data.tags["prefect.flow_run_id"] and run.data.tags["dataset_version_id"] == result.dataset_version
    for key in ("train_loss", "train_accuracy", "val_top1", "val_top5", "lr", "images_per_second"):
        history = client.get_metric_history(outcome.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    assert [m.value for m in client.get_metric_history(outcome.run_id, "val_top1")] == \
        pytest.approx([r["val_top1"] for r in result.history])
    assert run.data.metrics["test_top1"] == pytest.approx(result.held_out["top1"])
    assert "test_top5_error" in run.data.metrics and "test_ece" in run.data.metrics

    artifacts = mlflow.artifacts.download_artifacts(run_id=outcome.run_id, dst_path=str(tmp_path / "artifacts"))
    for name in ("confusion_matrix", "training_curves", "reliability_diagram", "confident_mistakes", "embedding_map"):
        with Image.open(f"{artifacts}/plots/{name}.png") as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300
    per_class = (tmp_path / "artifacts" / "evaluation" / "per_class_metrics.csv").read_text().splitlines()
    assert per_class[0] == "class,precision,recall,f1,support" and len(per_class) == 5
    reference = json.loads((tmp_path / "artifacts" / "monitoring" / "reference.json").read_text())
    assert reference == json.loads(json.dumps(result.reference)) and reference["images"] == result.held_out["images"]
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        kept = connection.execute("SELECT model_version, images, temperature FROM reference_profiles "
                                  "WHERE model_name = 'flowtest'").fetchall()
        shares = connection.execute("SELECT sum(true_share), count(*) FROM reference_classes "
                                    "WHERE model_name = 'flowtest'").fetchone()
    assert kept == [("1", reference["images"], pytest.approx(reference["temperature"]))]
    assert shares == (pytest.approx(1), 4)

    assert (outcome.model_name, outcome.model_version) == ("flowtest", "1")
    # Crowned only if it clearly beats the majority class of the validation split, as the tags record.
    version = client.get_model_version("flowtest", "1")
    assert outcome.decision.promoted == (version.tags["gate.beats_majority"] == "true")
    assert version.run_id == outcome.run_id and version.tags["dataset_version_id"] == result.dataset_version
    # The leak check ran on the held-out split: its count is in the run, on the version and in the report.
    leaked = run.data.metrics["leaked_test_images"]
    assert float(version.tags["leaked_test_images"]) == leaked and outcome.leaks.startswith("leak check: ")
    assert ("none of the" in outcome.leaks) == (leaked == 0)
    assert float(version.tags["gate.majority_rate"]) == pytest.approx(0.3)  # shapes' 80 validation images
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(registry.load_predictor("flowtest/1").probabilities(images),
                               Predictor(result.checkpoint).probabilities(images))


def test_train_flow_names_a_missing_dataset():
    with pytest.raises(CnnpipeError, match="no dataset named 'ghost'"):
        train("ghost", TrainingParams(epochs=1))


def test_cli_train_prints_the_held_out_figures_and_the_gate(shapes_in_home):
    result = CliRunner().invoke(cli, ["train", "--dataset", "shapes", "--epochs", "1", "--batch-size", "64",
                                      "--lr", "0.01", "--device", "cpu", "--ten-crop"])
    assert result.exit_code == 0, result.output
    assert "held-out (test, 80 images): top-1" in result.output and "ten-patch averaging" in result.output
    assert "registered cnn-classifier/1" in result.output and "gate: " in result.output
    # Ten steps at batch 64 cannot learn: said before training and again at the end.
    assert "warning: only 10 optimizer steps in all" in result.output


def test_cli_train_refuses_an_impossible_setting_and_an_empty_resume_in_one_line(shapes_in_home):
    for arguments, expected in [(["--lr", "-1"], "--lr must be a positive number, not -1.0"),
                                (["--batch-size", "1000"], "--batch-size 1000 is larger than the 640 train images"),
                                (["--resume"], "nothing to resume: no unfinished run of shapes with alexnet-cifar")]:
        result = CliRunner().invoke(cli, ["train", "--dataset", "shapes", "--device", "cpu", *arguments])
        assert result.exit_code == 1 and expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (shapes_in_home / "mlflow.db").exists()  # refused before any run started


def test_train_flow_runs_ddp_through_torchrun_and_logs_like_one_process(shapes_in_home):
    outcome = train("shapes", TrainingParams(epochs=1, batch_size=64, lr=0.01, norm="lrn", dropout=0.0, device="cpu",
                                             registered_model="ddp", nproc=2))
    client = mlflow.MlflowClient(get_settings().mlflow_tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.params["nproc"] == "2"
    assert [m.step for m in client.get_metric_history(outcome.run_id, "val_top1")] == [1]
    assert outcome.fit.epochs_run == 1 and load_checkpoint(outcome.fit.checkpoint)["epoch"] == 1
    plots = {a.path for a in client.list_artifacts(outcome.run_id, "plots")}
    assert "plots/confident_mistakes.png" in plots and outcome.decision is not None
