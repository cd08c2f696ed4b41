"""The monitoring views read summaries kept as predictions and labels commit (issue 32): each answers
what a plain scan of the predictions answers over the same rows, after new predictions, new labels,
changed and withdrawn labels, a rebuild, and an upgrade from the summary of earlier releases."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from cnn.config import EMBEDDING_DIM
from cnnpipe.predictions.database import connect_for_writing, transaction
from cnnpipe.predictions.records import add_predictions, record_ground_truth, record_reference_profile
from cnnpipe.predictions.summary import DRIFT_VIEWS, LEGACY_SUMMARY, SUMMARY_KEYS, drift_query, rebuild_summary
from cnnpipe.settings import get_settings

LABELS = ("c0", "c1", "c2", "c3")

# The figures each drift view sums, straight from the predictions and embeddings, grouped as its summary is.
_PLAIN_FIGURES = """
    p.model_name, p.model_version, p.label, count(*) AS predicted,
    sum(coalesce(p.calibrated_confidence, p.confidence)) AS confidence_sum,
    count_if(coalesce(p.calibrated_confidence, p.confidence) < 0.5) AS low_confidence,
    sum(p.width) AS width_sum, count(p.width) AS sized, sum(p.height) AS height_sum,
    sum(p.brightness) AS brightness_sum, count(p.brightness) AS measured, count(e.embedding) AS embedded,
    CASE WHEN count(e.embedding) > 0 THEN [{sums}] END AS embedding_sum
FROM predictions p LEFT JOIN embeddings e USING (image_sha256, model_name, model_version) GROUP BY ALL
""".format(sums=", ".join(f"sum(e.embedding[{k}])" for k in range(1, EMBEDDING_DIM + 1)))
PLAIN_SOURCES = {
    "drift_by_run": "(SELECT coalesce(p.classify_run_id, '') AS classify_run, " + _PLAIN_FIGURES + ")",
    "drift_daily": "(SELECT CAST(p.predicted_at AS DATE) AS day, " + _PLAIN_FIGURES + ")",
}
PLAIN_ACCURACY = """
SELECT p.model_name, p.model_version, CAST(p.predicted_at AS DATE) AS day, count(*) AS labelled,
       count_if(g.label = p.label) / count(*) AS top1
FROM predictions p JOIN ground_truth g USING (image_sha256) GROUP BY ALL
"""
PLAIN_CLASS_COUNTS = """
SELECT CAST(predicted_at AS DATE) AS day, model_name, model_version, label, count(*) AS images
FROM predictions GROUP BY ALL
"""
# The simplest figures of each drift view, by a query that shares nothing with the views.
PLAIN_BATCHES = {
    "drift_by_run": "classify_run_id",
    "drift_daily": "CAST(predicted_at AS DATE)",
}


def _plain_batches(key: str) -> str:
    return (f"SELECT {key}, model_name, model_version, count(*), avg(coalesce(calibrated_confidence, confidence)) "
            "FROM predictions p WHERE EXISTS (SELECT 1 FROM reference_profiles r WHERE r.model_name = p.model_name "
            "AND r.model_version = p.model_version) GROUP BY ALL")


def predict(*parts: tuple) -> None:
    """Parts committed together as classify commits a part, each (run, version, first, last, hour,
    embedded): images img-FIRST..img-LAST classified by m/VERSION an hour apart from 2026-12-01
    HOUR:00 UTC, so that a run crosses midnight; some without a size, a brightness or a calibrated
    confidence, as predictions of older releases are; with embeddings if `embedded`."""
    with transaction(get_settings().predictions_db) as connection:
        for run, version, first, last, hour, embedded in parts:
            add_predictions(connection, f"""
                SELECT 'img-' || i AS image_sha256, 'inbox' AS source_uri, i || '.png' AS member_path,
                       'm' AS model_name, $version AS model_version, NULL::VARCHAR AS mlflow_run_id,
                       'c' || ((i * 7 + CAST($version AS INTEGER)) % 4) AS label,
                       ((i * 37) % 100) / 100.0 AS confidence, [{{'label': 'c0', 'probability': 0.5}}] AS top5,
                       CAST(CASE WHEN i % 5 = 0 THEN NULL ELSE 30 + i % 3 END AS INTEGER) AS width,
                       CAST(CASE WHEN i % 5 = 0 THEN NULL ELSE 20 + i % 4 END AS INTEGER) AS height,
                       $run::VARCHAR AS classify_run_id,
                       TIMESTAMPTZ '2026-12-01 00:00:00+00' + to_hours(CAST($hour + i - $first AS BIGINT))
                           AS predicted_at,
                       CASE WHEN i % 3 = 0 THEN NULL ELSE ((i * 13) % 100) / 100.0 END AS calibrated_confidence,
                       CASE WHEN i % 4 = 0 THEN NULL ELSE (i % 10) / 10.0 END AS brightness,
                       CASE WHEN $embedded THEN list_transform(range({EMBEDDING_DIM}),
                            lambda k: ((i * 31 + k) % 17) / 17.0)::FLOAT[] END AS embedding
                FROM range($first, $last) AS images(i)""",
                            {"version": version, "run": run, "hour": hour, "first": first, "last": last,
                             "embedded": embedded})
            if run is not None:
                connection.execute("INSERT INTO classify_runs (classify_run_id, model_name, model_version, "
                                   "finished_at, classified, rejected) VALUES (?, 'm', ?, TIMESTAMPTZ "
                                   "'2026-12-02 00:00:00+00', ?, ?)", [run, version, last - first, (last - first) % 3])


def label(dataset: str, labels: dict[int, str]) -> None:
    record_ground_truth(get_settings().predictions_db, dataset, "v1", pa.table(
        {"sha256": [f"img-{i}" for i in labels], "label": list(labels.values())}))


def reference(version: str) -> None:
    profile = {"images": 500, "temperature": 1.0, "top1": 0.9, "mean_confidence": 0.6, "low_confidence_share": 0.3,
               "width": {"mean": 31}, "height": {"mean": 21}, "brightness": {"mean": 0.45, "std": 0.2},
               "classes": [{"label": c, "predicted_share": share, "true_share": share}
                           for c, share in zip(LABELS, (0.4, 0.3, 0.2, 0.1))],
               "confidence_bins": [{"low": 0.0, "high": 1.0, "share": 1.0, "accuracy": 0.9}],
               "embedding": {"images": 500, "mean": [0.5] * EMBEDDING_DIM,
                             "std": [0.3] * (EMBEDDING_DIM - 2) + [0.0, 0.0]}}
    record_reference_profile(get_settings().predictions_db, "m", version, "v", profile)


def _sorted(rows: list[tuple], width: int) -> list[tuple]:
    return sorted(rows, key=lambda row: tuple(repr(value) for value in row[:width]))


def assert_same(actual: list[tuple], expected: list[tuple], width: int) -> None:
    """The same rows, keyed by their first `width` columns; sums of doubles to rounding."""
    assert len(actual) == len(expected)
    for got, wanted in zip(_sorted(actual, width), _sorted(expected, width)):
        assert got == tuple(pytest.approx(value, rel=1e-9, abs=1e-12) if isinstance(value, float) else value
                            for value in wanted)


def opened() -> duckdb.DuckDBPyConnection:
    """The database as it is, without the upgrade that `connect_for_writing` makes (and takes time for)."""
    return duckdb.connect(str(get_settings().predictions_db))


def assert_views_answer_as_plain_scans() -> dict[str, int]:
    """Each monitoring view, and class_counts, against the same answer from a plain scan; returns how
    many rows each gave, so that a caller knows they were not all empty."""
    answered = {}
    with opened() as connection:
        for name, view in DRIFT_VIEWS.items():
            rows = connection.execute(f"SELECT * FROM {name}").fetchall()
            assert_same(rows, connection.execute(drift_query(view, PLAIN_SOURCES[name])).fetchall(), 3)
            assert_same(connection.execute(f"SELECT {view.key_column}, model_name, model_version, images, "
                                           f"estimated_accuracy FROM {name}").fetchall(),
                        connection.execute(_plain_batches(PLAIN_BATCHES[name])).fetchall(), 3)
            answered[name] = len(rows)
        accuracy = connection.execute("SELECT * FROM production_accuracy").fetchall()
        assert_same(accuracy, connection.execute(PLAIN_ACCURACY).fetchall(), 3)
        answered["production_accuracy"] = len(accuracy)
        assert_same(connection.execute("SELECT * FROM class_counts").fetchall(),
                    connection.execute(PLAIN_CLASS_COUNTS).fetchall(), 4)
    return answered


def summaries() -> dict[str, list[tuple]]:
    with opened() as connection:
        return {table: _sorted(connection.execute(f"SELECT * FROM {table}").fetchall(), 4) for table in SUMMARY_KEYS}


LEGACY_GRAIN = """
CREATE TABLE prediction_summary AS
SELECT coalesce(p.classify_run_id, '') AS classify_run, CAST(p.predicted_at AS DATE) AS day, p.model_name,
       p.model_version, p.label, count(*) AS predicted,
       sum(coalesce(p.calibrated_confidence, p.confidence)) AS confidence_sum,
       count_if(coalesce(p.calibrated_confidence, p.confidence) < 0.5) AS low_confidence,
       CAST(sum(p.width) AS HUGEINT) AS width_sum, count(p.width) AS sized,
       CAST(sum(p.height) AS HUGEINT) AS height_sum,
       sum(p.brightness) AS brightness_sum, count(p.brightness) AS measured, count(g.label) AS labelled,
       count_if(g.label = p.label) AS correct{embeddings}
FROM predictions p LEFT JOIN ground_truth g USING (image_sha256)
LEFT JOIN embeddings e USING (image_sha256, model_name, model_version) GROUP BY ALL
"""
LEGACY_EMBEDDINGS = f""", count(e.embedding) AS embedded, CASE WHEN count(e.embedding) > 0 THEN
       CAST([{", ".join(f"sum(e.embedding[{k}])" for k in range(1, EMBEDDING_DIM + 1))}] AS DOUBLE[{EMBEDDING_DIM}])
       END AS embedding_sum"""


def test_each_monitoring_view_answers_as_a_plain_scan_as_predictions_and_labels_arrive():
    """Three versions (one without a reference profile), a run crossing midnight, one without a run
    id, embeddings for version 2 only, labels from two datasets arriving late, overriding each other,
    changed and withdrawn; then a rebuild, and upgrades from the summary of earlier releases."""
    for version in ("1", "2"):
        reference(version)
    predict(("run-a", "1", 0, 30, 20, False), ("run-b", "2", 0, 30, 22, True), (None, "1", 30, 40, 3, False))
    label("ds1", {i: LABELS[i % 4] for i in range(0, 40, 2)})  # late labels, some right, some wrong
    answered = assert_views_answer_as_plain_scans()
    assert answered["drift_by_run"] == 3 and answered["drift_daily"] > 0 and answered["production_accuracy"] > 0

    # New images, and new predictions of labelled ones; a second dataset overrides ds1's label of 36 and 38.
    predict(("run-c", "3", 10, 50, 1, False), ("run-d", "2", 30, 50, 30, True))
    label("ds2", {i: LABELS[(i + 1) % 4] for i in range(36, 48)})
    # ds1's next version: relabels some images, drops others, labels new ones; 36 and 38 go back to ds1.
    relabelled = {i: LABELS[(i * 3) % 4] for i in (*range(0, 20, 2), *range(21, 41, 3))}
    label("ds1", relabelled)
    answered = assert_views_answer_as_plain_scans()
    assert answered["drift_by_run"] == 4
    label("ds1", relabelled)  # the same labels again: nothing moves
    kept = summaries()
    with opened() as connection:
        # One row per day, version and label, however many runs the day had.
        assert len(kept["daily_summary"]) == connection.execute(
            "SELECT count(DISTINCT (CAST(predicted_at AS DATE), model_name, model_version, label)) FROM predictions"
        ).fetchone()[0]
        assert connection.execute("SELECT sum(embedded) FROM run_summary").fetchone()[0] == 50
        rebuild_summary(connection)
    assert_summaries(kept)

    # A database of an earlier release, with its summary per run and day: summed up from it when it has
    # embedding sums, else rebuilt from the predictions; either way the old table goes.
    for legacy in (LEGACY_EMBEDDINGS, ""):
        with opened() as connection:
            connection.execute("DROP TABLE run_summary; DROP TABLE daily_summary")
            connection.execute(LEGACY_GRAIN.format(embeddings=legacy))
        connect_for_writing(get_settings().predictions_db).close()
        assert_summaries(kept)
        with opened() as connection:
            assert not connection.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?",
                                          [LEGACY_SUMMARY]).fetchone()[0]
    predict(("run-e", "2", 50, 60, 50, True))  # and it goes on as a new database would
    label("ds2", {i: "c0" for i in range(40, 60)})
    assert assert_views_answer_as_plain_scans()["drift_by_run"] == 5


def assert_summaries(kept: dict[str, list[tuple]]) -> None:
    now = summaries()
    for table, rows in kept.items():
        assert_same(now[table], rows, 4)
