"""A classify run's drift: its `drift_by_run` row and the distributions its picture shows.

The views themselves, and the summary they read, are part of the predictions database's schema
(`cnnpipe.predictions.summary`); this module only reads them.
"""

from __future__ import annotations

from pathlib import Path

from cnnpipe.predictions.database import connect_for_writing


def run_drift(database: Path, classify_run_id: str) -> dict | None:
    """The `drift_by_run` row of one classify run, with what its picture shows under
    `distributions`; None when its model has no reference profile."""
    with connect_for_writing(database) as connection:
        cursor = connection.execute("SELECT * FROM drift_by_run WHERE classify_run_id = ?", [classify_run_id])
        row = cursor.fetchone()
        if row is None:
            return None
        drift = dict(zip([column[0] for column in cursor.description], row))
        drift["distributions"] = _distributions(connection, classify_run_id, drift["model_name"],
                                                drift["model_version"])
        return drift


def _distributions(connection, classify_run_id: str, model_name: str, model_version: str) -> dict:
    """The share of each class among a run's predictions, and of each reference confidence bin
    among its calibrated confidences, beside the reference's own."""
    key = [model_name, model_version]
    connection.execute("CREATE OR REPLACE TEMP TABLE run_rows AS SELECT label, coalesce(calibrated_confidence, "
                       "confidence) AS confidence FROM predictions WHERE classify_run_id = ? AND model_name = ? "
                       "AND model_version = ?", [classify_run_id, *key])
    total = max(1, connection.execute("SELECT count(*) FROM run_rows").fetchone()[0])
    classes = connection.execute(
        "SELECT c.label, (SELECT count(*) FROM run_rows r WHERE r.label = c.label) / ?, c.predicted_share "
        "FROM reference_classes c WHERE model_name = ? AND model_version = ? ORDER BY c.label",
        [total, *key]).fetchall()
    bins = connection.execute(
        "SELECT b.low, b.high, (SELECT count(*) FROM run_rows r WHERE r.confidence >= b.low AND (r.confidence "
        "< b.high OR b.high >= 1)) / ?, b.share FROM reference_confidence b WHERE model_name = ? AND "
        "model_version = ? ORDER BY b.bin", [total, *key]).fetchall()
    connection.execute("DROP TABLE run_rows")
    return {"classes": classes, "bins": bins}
