"""The predictions database: its tables, the views users query with `cnnpipe sql`, and its connections.

DuckDB allows one writing process, and a reader holding the file also blocks a writer,
so writers open it only for short transactions and retry on the lock error. Rows go in
through `records.add_predictions` and champions change through `records.set_champion`, which keep
`latest_by_image` (behind the `latest_predictions` view) consistent in the same transaction.

Every row of `predictions` can be computed again, so a write-ahead log that DuckDB
cannot replay is set aside rather than left to fail every scheduled run: the database
opens at its last checkpoint, and the next classify run predicts what was lost. Promotions
cannot be computed again: they are checkpointed as they are written (`transaction(...,
checkpoint=True)`), so a log set aside never holds one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import duckdb

from cnn.config import EMBEDDING_DIM

from cnn.failpoints import failpoint
from cnnpipe.base.locks import file_lock
from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions.summary import (DRIFT_SCHEMA, LEGACY_SUMMARY, LOW_CONFIDENCE, SUMMARY_KEYS,
                                         change_thresholds, parse_thresholds, rebuild_summary, summary_from_legacy)

log = logging.getLogger("cnnpipe.predictions")

_PREDICTION_COLUMNS = """
    image_sha256 VARCHAR NOT NULL,
    source_uri VARCHAR NOT NULL,
    member_path VARCHAR NOT NULL,
    model_name VARCHAR NOT NULL,
    model_version VARCHAR NOT NULL,
    mlflow_run_id VARCHAR,
    label VARCHAR NOT NULL,
    confidence DOUBLE NOT NULL,
    top5 STRUCT(label VARCHAR, probability DOUBLE)[] NOT NULL,
    width INTEGER,
    height INTEGER,
    classify_run_id VARCHAR,
    predicted_at TIMESTAMPTZ NOT NULL,
    calibrated_confidence DOUBLE,
    brightness DOUBLE,
"""
# Columns added since the first release, added in place to an older database.
_ADDED_COLUMNS = (("calibrated_confidence", "DOUBLE"), ("brightness", "DOUBLE"))
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS predictions (
{_PREDICTION_COLUMNS}    PRIMARY KEY (image_sha256, model_name, model_version)
);
CREATE TABLE IF NOT EXISTS embeddings (
    image_sha256 VARCHAR, model_name VARCHAR, model_version VARCHAR, embedding FLOAT[{EMBEDDING_DIM}],
    PRIMARY KEY (image_sha256, model_name, model_version)
);
CREATE TABLE IF NOT EXISTS classify_runs (
    classify_run_id VARCHAR PRIMARY KEY, source_uri VARCHAR, model_name VARCHAR, model_version VARCHAR,
    started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, classified BIGINT, skipped BIGINT, rejected BIGINT,
    seconds DOUBLE, images_per_second DOUBLE, status VARCHAR
);
CREATE TABLE IF NOT EXISTS rejected_inputs (
    classify_run_id VARCHAR, source_uri VARCHAR, member_path VARCHAR, reason VARCHAR, detail VARCHAR,
    rejected_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS promotions (
    promoted_at TIMESTAMPTZ, model_name VARCHAR, from_version VARCHAR, to_version VARCHAR, metric VARCHAR,
    from_value DOUBLE, to_value DOUBLE, reason VARCHAR
);
CREATE TABLE IF NOT EXISTS champions (
    model_name VARCHAR PRIMARY KEY, model_version VARCHAR NOT NULL, updated_at TIMESTAMPTZ
);
-- The labels of every ingested image, by hash: what a prediction of the same image is scored
-- against once its label arrives, however late. An image in several datasets keeps the label
-- recorded last, so that scoring is a plain join.
CREATE TABLE IF NOT EXISTS ground_truth (
    image_sha256 VARCHAR NOT NULL, label VARCHAR NOT NULL, dataset VARCHAR NOT NULL,
    dataset_version VARCHAR NOT NULL, recorded_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (image_sha256)
);
-- Every label that `cnnpipe ingest --relabel` changed: in which dataset version, from what to what,
-- when, and from which file. Copied from the versions' version.json, so a copy that failed is
-- made by the next ingest into the dataset.
CREATE TABLE IF NOT EXISTS label_changes (
    dataset VARCHAR NOT NULL, dataset_version VARCHAR NOT NULL, image_sha256 VARCHAR NOT NULL,
    old_label VARCHAR NOT NULL, new_label VARCHAR NOT NULL, changed_at TIMESTAMPTZ NOT NULL, source_uri VARCHAR,
    PRIMARY KEY (dataset, dataset_version, image_sha256)
);
-- Each registered version's reference profile (cnn.monitoring), what its drift is measured
-- against: figures, then its class shares and confidence bins as rows, for SQL to join.
CREATE TABLE IF NOT EXISTS reference_profiles (
    model_name VARCHAR NOT NULL, model_version VARCHAR NOT NULL, dataset_version VARCHAR, images BIGINT,
    temperature DOUBLE, top1 DOUBLE, mean_confidence DOUBLE, low_confidence_share DOUBLE, mean_width DOUBLE,
    mean_height DOUBLE, mean_brightness DOUBLE, std_brightness DOUBLE, profile VARCHAR, created_at TIMESTAMPTZ,
    PRIMARY KEY (model_name, model_version)
);
CREATE TABLE IF NOT EXISTS reference_classes (
    model_name VARCHAR NOT NULL, model_version VARCHAR NOT NULL, label VARCHAR NOT NULL, predicted_share DOUBLE,
    true_share DOUBLE, PRIMARY KEY (model_name, model_version, label)
);
CREATE TABLE IF NOT EXISTS reference_confidence (
    model_name VARCHAR NOT NULL, model_version VARCHAR NOT NULL, bin INTEGER NOT NULL, low DOUBLE, high DOUBLE,
    share DOUBLE, accuracy DOUBLE, PRIMARY KEY (model_name, model_version, bin)
);
-- What `cnnpipe audit` found in a dataset (cnnpipe.monitoring.audit), replaced for the dataset by each audit:
-- pairs of stored images that are one picture (a twin in another split is a leak), labels that
-- confident learning doubts, and images far from every class.
CREATE TABLE IF NOT EXISTS near_duplicates (
    dataset VARCHAR NOT NULL, dataset_version VARCHAR, image_sha256 VARCHAR NOT NULL, split VARCHAR,
    twin_sha256 VARCHAR NOT NULL, twin_split VARCHAR, hash_distance INTEGER, embedding_distance DOUBLE,
    embedding_rank DOUBLE, thumbnail_correlation DOUBLE, PRIMARY KEY (dataset, image_sha256, twin_sha256)
);
CREATE TABLE IF NOT EXISTS label_issues (
    dataset VARCHAR NOT NULL, dataset_version VARCHAR, image_sha256 VARCHAR NOT NULL, split VARCHAR,
    given_label VARCHAR, suggested_label VARCHAR, label_quality DOUBLE, rank INTEGER,
    PRIMARY KEY (dataset, image_sha256)
);
CREATE TABLE IF NOT EXISTS outliers (
    dataset VARCHAR NOT NULL, dataset_version VARCHAR, image_sha256 VARCHAR NOT NULL, split VARCHAR, label VARCHAR,
    outlier_score DOUBLE, rank INTEGER, PRIMARY KEY (dataset, image_sha256)
);
CREATE OR REPLACE MACRO version_number(v) AS TRY_CAST(v AS BIGINT);
-- The k images whose embeddings by one model version lie nearest to a stored image's, by cosine
-- distance in a full scan: `SELECT * FROM similar_images('<sha256>', 'cnn-classifier', '3', 10)`.
CREATE OR REPLACE MACRO similar_images(query_sha, name, version, k) AS TABLE
SELECT n.image_sha256, array_cosine_distance(q.embedding, n.embedding) AS distance
FROM embeddings q JOIN embeddings n USING (model_name, model_version)
WHERE q.image_sha256 = query_sha AND q.model_name = name AND q.model_version = version
  AND n.image_sha256 <> query_sha
ORDER BY distance, n.image_sha256 LIMIT k;
-- One row per image: the champion's prediction, else the newest version's. Kept up to date
-- by every insert and rebuilt when the champion changes, so that queries over it stay fast
-- at tens of millions of predictions (bench/views.py).
CREATE TABLE IF NOT EXISTS latest_by_image (
{_PREDICTION_COLUMNS}    champion BOOLEAN NOT NULL,
    PRIMARY KEY (image_sha256)
);
CREATE OR REPLACE VIEW latest_predictions AS SELECT * EXCLUDE (champion) FROM latest_by_image;
CREATE OR REPLACE VIEW low_confidence AS
SELECT * FROM latest_predictions WHERE confidence < {LOW_CONFIDENCE};
CREATE OR REPLACE VIEW disagreements AS
SELECT a.image_sha256, a.member_path, a.model_name,
       a.model_version AS version_a, a.label AS label_a, a.confidence AS confidence_a,
       b.model_version AS version_b, b.label AS label_b, b.confidence AS confidence_b
FROM predictions a JOIN predictions b
  ON a.image_sha256 = b.image_sha256 AND a.model_name = b.model_name
 AND coalesce(version_number(a.model_version) < version_number(b.model_version), a.model_version < b.model_version)
WHERE a.label <> b.label;
""" + DRIFT_SCHEMA + """
-- The daily summary holds these counts already (`cnnpipe.predictions.summary`): no scan of predictions.
CREATE OR REPLACE VIEW class_counts AS
SELECT day, model_name, model_version, label, predicted AS images FROM daily_summary;
"""

# The schema that the last upgrade left, so that opening a current database skips the upgrade:
# running the schema script took 40 ms of each opening's 56 ms, and a classify run opens the
# file once per committed part and several times around them.
_SCHEMA_TABLE = "cnnpipe_schema"
SCHEMA_DIGEST = hashlib.sha256(repr((SCHEMA, _ADDED_COLUMNS, LEGACY_SUMMARY)).encode()).hexdigest()[:16]
_SCHEMA_TABLES = tuple(sorted(set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))))

T = TypeVar("T")
LOCK_RETRIES = 40
LOCK_BACKOFF_SECONDS = 0.05
# What DuckDB 2 says of a log that is damaged or belongs to another database file; other
# replay failures (out of memory, say) leave the log where it is.
_UNREPLAYABLE_WAL = ("Corrupt WAL file", "WAL does not match database file")


def is_lock_error(exc: Exception) -> bool:
    return "Could not set lock" in str(exc) or "Conflicting lock" in str(exc)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def retry_on_lock(action: Callable[[], T], database: Path, retries: int = LOCK_RETRIES) -> T:
    """Run `action`, retrying with capped backoff while another process holds `database`.
    Any other DuckDB failure (a full disk, a damaged file) is reported against the file."""
    delay = LOCK_BACKOFF_SECONDS
    for attempt in range(retries):
        try:
            return action()
        except duckdb.Error as exc:
            if not is_lock_error(exc):
                raise CnnpipeError(f"{database}: {_first_line(exc)}") from exc
            if attempt == retries - 1:
                raise CnnpipeError(f"{database}: another process still holds it after {retries} tries "
                                   f"({_first_line(exc)}); rerun once it lets go") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


def connect(path: Path, read_only: bool = False, config: dict | None = None) -> duckdb.DuckDBPyConnection:
    """Open the database, setting aside a write-ahead log that DuckDB cannot replay."""
    def open_database() -> duckdb.DuckDBPyConnection:
        return duckdb.connect(str(path), read_only=read_only, config=config or {})

    try:
        return open_database()
    except duckdb.Error as exc:
        if not _unreplayable(exc):
            raise
    # Under a lock, and only after failing again there: a process that set the log aside
    # a moment ago may already be writing a new one, which must stay.
    with file_lock(path.with_name(path.name + ".wal.lock")):
        try:
            return open_database()
        except duckdb.Error as exc:
            if not _unreplayable(exc):
                raise
            _quarantine_wal(path, exc)
        return open_database()


def _unreplayable(exc: duckdb.Error) -> bool:
    return any(reason in str(exc) for reason in _UNREPLAYABLE_WAL)


def _quarantine_wal(path: Path, exc: duckdb.Error) -> None:
    wal = path.with_name(path.name + ".wal")
    aside = wal.with_name(f"{wal.name}.corrupt-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}")
    os.rename(wal, aside)
    log.warning("%s: DuckDB cannot replay its write-ahead log (%s). Moved the log to %s and opened the "
                "last checkpoint: what was committed after it is gone from the database, and the next "
                "classify run predicts those images again.", path, _first_line(exc), aside.name)


def _schema_is_current(connection: duckdb.DuckDBPyConnection) -> bool:
    """Whether this release's upgrade already ran on the database and every table is still there
    (a table dropped by hand is made again)."""
    try:
        return connection.execute(
            f"SELECT (SELECT any_value(digest) FROM {_SCHEMA_TABLE}) = ? AND (SELECT count(*) FROM duckdb_tables() "
            "WHERE database_name = current_database() AND schema_name = 'main' AND table_name IN "
            f"({', '.join('?' * len(_SCHEMA_TABLES))})) = ?",
            [SCHEMA_DIGEST, *_SCHEMA_TABLES, len(_SCHEMA_TABLES)]).fetchone()[0] is True
    except duckdb.CatalogException:  # a database from before the digest, or a new one
        return False


def connect_for_writing(path: Path, retries: int = LOCK_RETRIES) -> duckdb.DuckDBPyConnection:
    """A short-lived writing connection with the schema in place."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def open_with_schema() -> duckdb.DuckDBPyConnection:
        connection = connect(path)
        if _schema_is_current(connection):
            return connection
        try:
            # One transaction: an upgrade happens whole or not at all, and one commit instead of one a
            # statement halves what opening costs (every classify part opens the file).
            connection.execute("BEGIN")
            connection.execute("".join(f"ALTER TABLE IF EXISTS {table} ADD COLUMN IF NOT EXISTS {name} {kind};"
                                       for table in ("predictions", "latest_by_image") for name, kind in _ADDED_COLUMNS))
            # The summary of earlier releases: absent (None), or whether it has its embedding sums, without
            # which it cannot stand in for the predictions and embeddings.
            legacy = connection.execute(
                "SELECT CASE WHEN count(*) > 0 THEN count(*) FILTER (column_name = 'embedding_sum') > 0 END FROM "
                "duckdb_columns() WHERE database_name = current_database() AND schema_name = 'main' AND "
                "table_name = ?", [LEGACY_SUMMARY]).fetchone()[0]
            connection.execute(SCHEMA)
            counts = connection.execute(
                "SELECT (SELECT count(*) FROM predictions), (SELECT count(*) FROM latest_by_image), "
                f"{', '.join(f'(SELECT count(*) FROM {table})' for table in SUMMARY_KEYS)}").fetchone()
            if counts[0]:  # a database from before these tables existed
                if not counts[1]:
                    rebuild_latest(connection)
                if not all(counts[2:]):
                    # Summed up from the old summary only where it still holds every prediction.
                    if legacy and connection.execute(f"SELECT sum(predicted) FROM {LEGACY_SUMMARY}").fetchone()[0] \
                            == counts[0]:
                        summary_from_legacy(connection)
                    else:
                        rebuild_summary(connection)
            if legacy is not None:  # the views no longer read it, and no writer keeps it up to date
                connection.execute(f"DROP TABLE {LEGACY_SUMMARY}")
            connection.execute(f"CREATE OR REPLACE TABLE {_SCHEMA_TABLE} AS SELECT ? AS digest, "
                               "current_timestamp AS upgraded_at", [SCHEMA_DIGEST])
            connection.execute("COMMIT")
        except BaseException:
            connection.close()
            raise
        return connection

    return retry_on_lock(open_with_schema, path, retries)


@contextmanager
def transaction(path: Path, retries: int = LOCK_RETRIES, checkpoint: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """One short writing transaction. If it cannot commit (a full disk, say), none of it is
    written, the database keeps what it held, and the error names the file. With `checkpoint`,
    what it wrote is in the database file, not only in the log, when it returns: for what
    cannot be computed again if a damaged log is set aside."""
    with connect_for_writing(path, retries) as connection:
        connection.execute("BEGIN")
        try:
            yield connection
            connection.execute("COMMIT")
        except duckdb.Error as exc:
            raise CnnpipeError(f"{path}: could not commit ({_first_line(exc)}); "
                               "the database keeps what it held before") from exc
        # Committed to the log, not yet checkpointed into the file: where a crash tests recovery.
        failpoint("duckdb.after_commit")
        if checkpoint:
            try:
                connection.execute("CHECKPOINT")
            except duckdb.Error as exc:
                raise CnnpipeError(f"{path}: committed, but could not checkpoint ({_first_line(exc)})") from exc


def record_label_changes(path: Path, changes: list[dict]) -> int:
    """Add the changes (`DatasetStore.label_changes`) the `label_changes` table lacks, in one
    transaction; returns how many were new. A change already there stays as first recorded."""
    if not changes:
        return 0
    import pyarrow as pa  # only when a dataset has relabel versions

    with transaction(path) as connection:
        connection.register("changes", pa.Table.from_pylist(changes))
        added = connection.execute("INSERT OR IGNORE INTO label_changes SELECT dataset, dataset_version, image_sha256, "
                                   "old_label, new_label, CAST(changed_at AS TIMESTAMPTZ), source_uri FROM changes "
                                   "RETURNING image_sha256").fetchall()
        connection.unregister("changes")
    return len(added)


def set_drift_thresholds(path: Path, assignments: Iterable[str]) -> list[tuple[str, float, float]]:
    """Change the drift thresholds from METRIC=VALUE assignments, all or none, and return (metric,
    old, new) for each. Checked before the database opens, and checkpointed like promotions: a
    team's thresholds cannot be computed again."""
    thresholds = parse_thresholds(assignments)
    with transaction(path, checkpoint=True) as connection:
        return change_thresholds(connection, thresholds)


_COLUMNS = tuple(line.split()[0] for line in _PREDICTION_COLUMNS.strip().splitlines())
# What the prediction summaries need of each new row.
_SUMMARISED = ("image_sha256", "classify_run_id", "predicted_at", "model_name", "model_version", "label", "confidence",
               "calibrated_confidence", "width", "height", "brightness")
# Versions that are not numbers (checkpoint hashes) rank below numbered ones.
_PREFERRED = """(new.champion > old.champion OR (new.champion = old.champion AND (
    coalesce(version_number(new.model_version), -1) > coalesce(version_number(old.model_version), -1) OR (
    coalesce(version_number(new.model_version), -1) = coalesce(version_number(old.model_version), -1)
    AND new.predicted_at > old.predicted_at))))"""
_FOLD_INTO_LATEST = f"""
INSERT INTO latest_by_image BY NAME
SELECT i.*, c.model_name IS NOT NULL AS champion FROM incoming i
LEFT JOIN champions c ON c.model_name = i.model_name AND c.model_version = i.model_version
ON CONFLICT (image_sha256) DO UPDATE SET {", ".join(f"{c} = EXCLUDED.{c}" for c in (*_COLUMNS[1:], "champion"))}
WHERE {_PREFERRED.replace("new.", "EXCLUDED.").replace("old.", "latest_by_image.")}
"""
_REBUILD_LATEST = """
DELETE FROM latest_by_image;
INSERT INTO latest_by_image BY NAME
SELECT * EXCLUDE (preference) FROM (
    SELECT p.*, c.model_name IS NOT NULL AS champion, row_number() OVER (
        PARTITION BY p.image_sha256
        ORDER BY c.model_name IS NOT NULL DESC, coalesce(version_number(p.model_version), -1) DESC,
                 p.predicted_at DESC) AS preference
    FROM predictions p
    LEFT JOIN champions c ON c.model_name = p.model_name AND c.model_version = p.model_version
) WHERE preference = 1;
"""


def rebuild_latest(connection: duckdb.DuckDBPyConnection) -> None:
    connection.execute(_REBUILD_LATEST)


def ensure_database(path: Path) -> None:
    """Create the file with its schema, so that read-only queries work before any classify run."""
    if not path.exists():
        connect_for_writing(path).close()
