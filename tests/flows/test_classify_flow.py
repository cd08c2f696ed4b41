from __future__ import annotations

import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli
from flows.classify import classify
from tests.imagefactory import write_class_folders

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_classify_flow_then_sql(tmp_path, shapes_checkpoints):
    write_class_folders(tmp_path / "inbox", {"x": 12})
    summary = classify(str(tmp_path / "inbox"), str(shapes_checkpoints[0]), device="cpu")
    assert summary.classified == 12 and len(summary.run_id) == 36  # the Prefect flow run id
    result = CliRunner().invoke(cli, ["sql", "SELECT count(*) AS n FROM latest_predictions", "--format", "csv"])
    assert result.output.splitlines() == ["n", "12"]


def test_cli_classify_prints_a_summary_and_needs_a_model(tmp_path, shapes_checkpoints):
    write_class_folders(tmp_path / "inbox", {"x": 3})
    runner = CliRunner()
    result = runner.invoke(cli, ["classify", str(tmp_path / "inbox"), "--checkpoint", str(shapes_checkpoints[0])])
    assert result.exit_code == 0, result.output
    assert "3 classified" in result.output
    missing = runner.invoke(cli, ["classify", str(tmp_path / "inbox")])
    assert missing.exit_code == 1 and "--checkpoint" in missing.output
