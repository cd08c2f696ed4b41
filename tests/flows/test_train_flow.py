from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from cnn.checkpoint import load_checkpoint
from cnnpipe.cli import cli
from cnnpipe.errors import CnnpipeError
from flows.train import train

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


@pytest.fixture
def shapes_in_home(shapes_dataset, cnnpipe_home):
    shutil.copytree(shapes_dataset, cnnpipe_home / "datasets" / "shapes")
    return cnnpipe_home


def test_train_flow_returns_metrics_and_a_checkpoint_under_home(shapes_in_home):
    result = train("shapes", epochs=1, batch_size=64, lr=0.01, device="cpu")
    assert result.checkpoint.startswith(str(shapes_in_home / "checkpoints" / "shapes__alexnet-cifar"))
    assert len(result.history) == 1 and 0 <= result.held_out["top1"] <= 1
    assert load_checkpoint(result.checkpoint)["epoch"] == 1


def test_train_flow_names_a_missing_dataset():
    with pytest.raises(CnnpipeError, match="no dataset named 'ghost'"):
        train("ghost", epochs=1)


def test_cli_train_prints_the_held_out_figures(shapes_in_home):
    result = CliRunner().invoke(cli, ["train", "--dataset", "shapes", "--epochs", "1", "--batch-size", "64",
                                      "--lr", "0.01", "--device", "cpu", "--ten-crop"])
    assert result.exit_code == 0, result.output
    assert "held-out (test, 80 images): top-1" in result.output and "ten-patch averaging" in result.output
