"""`cnnpipe monitor thresholds`: the drift thresholds listed and changed through the CLI, checked
before anything is written, and read by the drift views."""

from __future__ import annotations

import csv
import io

import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli
from cnnpipe.predictions.database import transaction
from cnnpipe.predictions.records import add_predictions
from cnnpipe.predictions.summary import DEFAULT_THRESHOLDS
from cnnpipe.settings import get_settings

DEFAULTS = {metric: threshold for metric, (threshold, _) in DEFAULT_THRESHOLDS.items()}


def invoke(*argv: str):
    return CliRunner().invoke(cli, list(argv))


def listed() -> dict[str, float]:
    result = invoke("monitor", "thresholds", "--format", "csv")
    assert result.exit_code == 0, result.output
    return {row["metric"]: float(row["threshold"]) for row in csv.DictReader(io.StringIO(result.output))}


def test_thresholds_list_the_defaults_with_what_each_means():
    assert listed() == DEFAULTS
    table = invoke("monitor", "thresholds").output
    assert "share of inputs rejected above this" in table


def brightened_batch(brightness_shift: float) -> None:
    """A classify run of 100 predictions like its version's reference in every figure but brightness."""
    with transaction(get_settings().predictions_db) as connection:
        connection.execute("INSERT INTO reference_profiles (model_name, model_version, images, mean_confidence, "
                           "low_confidence_share, mean_width, mean_height, mean_brightness) "
                           "VALUES ('m', '1', 1000, 0.9, 0.0, 32, 32, 0.5)")
        connection.execute("INSERT INTO reference_classes VALUES ('m', '1', 'a', 0.5, 0.5), ('m', '1', 'b', 0.5, 0.5)")
        add_predictions(connection, f"""
            SELECT 'sha' || i AS image_sha256, 'inbox' AS source_uri, 'f' || i AS member_path, 'm' AS model_name,
                   '1' AS model_version, NULL AS mlflow_run_id, CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END AS label,
                   0.9 AS confidence, [{{'label': 'a', 'probability': 0.9}}] AS top5, 32 AS width, 32 AS height,
                   'run' AS classify_run_id, now() AS predicted_at, 0.9 AS calibrated_confidence,
                   {0.5 + brightness_shift} AS brightness
            FROM range(100) t(i)""")
        connection.execute("INSERT INTO classify_runs (classify_run_id, model_name, model_version, finished_at, "
                           "classified, rejected) VALUES ('run', 'm', '1', now(), 100, 0)")


def alert() -> str:
    result = invoke("monitor", "--model", "m", "--format", "csv")
    assert result.exit_code == 0, result.output
    (row,) = csv.DictReader(io.StringIO(result.output))
    return row["alert"]


def test_set_changes_one_threshold_prints_old_and_new_and_the_drift_views_use_it():
    brightened_batch(0.05)
    assert alert() == "False"  # 0.05 is under the default 0.1
    result = invoke("monitor", "thresholds", "--set", "brightness_shift=0.04")
    assert result.exit_code == 0, result.output
    assert result.output == "brightness_shift: 0.1 -> 0.04\n"
    assert listed() == {**DEFAULTS, "brightness_shift": 0.04}
    assert alert() == "True"


@pytest.mark.parametrize(("assignment", "reason"), [
    ("colour=0.1", "no threshold named 'colour'; the thresholds are brightness_shift, confidence_drop, "
                   "embedding_shift, low_confidence_rise, psi, rejected_rate, size_shift"),
    ("psi=abc", "psi must be a number, not 'abc'"),
    ("psi=-0.1", "psi must be at least 0"),
    ("size_shift=nan", "size_shift must be a finite number"),
    ("psi=inf", "psi must be a finite number"),
    ("rejected_rate=1.5", "rejected_rate must be between 0 and 1"),
    ("psi", "expected METRIC=VALUE, e.g. psi=0.1"),
])
def test_a_bad_threshold_is_one_line_and_changes_nothing(assignment, reason):
    # A good change given with it is not written either.
    result = invoke("monitor", "thresholds", "--set", "psi=0.2", "--set", assignment)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: --set {assignment}: {reason}"]
    assert listed() == DEFAULTS
