from __future__ import annotations

import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli
from cnnpipe.predictions import champions
from flows.classify import classify
from tests.imagefactory import write_class_folders

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_classify_flow_then_sql(tmp_path, shapes_checkpoints):
    write_class_folders(tmp_path / "inbox", {"x": 12})
    summary = classify(str(tmp_path / "inbox"), checkpoint=str(shapes_checkpoints[0]), device="cpu")
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
    assert missing.exit_code == 1 and "model cnn-classifier@champion: not in the registry" in missing.output
    malformed = runner.invoke(cli, ["classify", str(tmp_path / "inbox"), "--model", "pets/latest"])
    assert malformed.exit_code == 1 and "NAME@ALIAS or NAME/VERSION" in malformed.output


def test_classify_with_the_champion_then_a_new_version_adds_rows_and_views_follow_the_alias(
        tmp_path, register_version):
    write_class_folders(tmp_path / "inbox", {"x": 10})
    register_version("pets", 0.5)
    champions.promote("pets", "1")
    first = classify(str(tmp_path / "inbox"), model="pets@champion", device="cpu")
    assert (first.model_name, first.model_version, first.classified) == ("pets", "1", 10)
    assert classify(str(tmp_path / "inbox"), model="pets@champion", device="cpu").skipped == 10

    register_version("pets", 0.6)
    second = classify(str(tmp_path / "inbox"), model="models:/pets/2", device="cpu")
    assert (second.model_version, second.classified) == ("2", 10)
    runner = CliRunner()

    def query(sql: str) -> list[str]:
        result = runner.invoke(cli, ["sql", sql, "--format", "csv"])
        assert result.exit_code == 0, result.output
        return result.output.splitlines()[1:]

    run_ids = query("SELECT DISTINCT model_version || ':' || (mlflow_run_id IS NOT NULL) FROM predictions ORDER BY 1")
    assert run_ids == ["1:true", "2:true"]
    # Version 1 is still the champion, so the latest predictions are its rows; after promotion, version 2's.
    assert query("SELECT DISTINCT model_version FROM latest_predictions") == ["1"]
    champions.promote("pets", "2")
    assert query("SELECT DISTINCT model_version FROM latest_predictions") == ["2"]
    assert query("SELECT to_version, reason FROM promotions ORDER BY promoted_at") == ["1,manual", "2,manual"]
