"""The predictions database: its tables and the views users query with `cnnpipe sql`.

DuckDB allows one writing process, and a reader holding the file also blocks a writer,
so writers open it only for short transactions and retry on the lock error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import duckdb

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
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
CREATE OR REPLACE MACRO version_number(v) AS TRY_CAST(v AS BIGINT);
CREATE OR REPLACE VIEW latest_predictions AS
SELECT * EXCLUDE (preference) FROM (
    SELECT p.*, row_number() OVER (
        PARTITION BY p.image_sha256
        ORDER BY c.model_version IS NOT NULL DESC, version_number(p.model_version) DESC NULLS LAST,
                 p.predicted_at DESC) AS preference
    FROM predictions p
    LEFT JOIN champions c ON c.model_name = p.model_name AND c.model_version = p.model_version
) WHERE preference = 1;
CREATE OR REPLACE VIEW class_counts AS
SELECT CAST(predicted_at AS DATE) AS day, model_name, model_version, label, count(*) AS images
FROM predictions GROUP BY ALL;
CREATE OR REPLACE VIEW low_confidence AS
SELECT * FROM latest_predictions WHERE confidence < 0.5;
CREATE OR REPLACE VIEW disagreements AS
SELECT a.image_sha256, a.member_path, a.model_name,
       a.model_version AS version_a, a.label AS label_a, a.confidence AS confidence_a,
       b.model_version AS version_b, b.label AS label_b, b.confidence AS confidence_b
FROM predictions a JOIN predictions b
  ON a.image_sha256 = b.image_sha256 AND a.model_name = b.model_name
 AND coalesce(version_number(a.model_version) < version_number(b.model_version), a.model_version < b.model_version)
WHERE a.label <> b.label;
"""

T = TypeVar("T")
LOCK_RETRIES = 40
LOCK_BACKOFF_SECONDS = 0.05


def is_lock_error(exc: Exception) -> bool:
    return "Could not set lock" in str(exc) or "Conflicting lock" in str(exc)


def retry_on_lock(action: Callable[[], T], retries: int = LOCK_RETRIES) -> T:
    """Run `action`, retrying with capped backoff while another process holds the file."""
    delay = LOCK_BACKOFF_SECONDS
    for attempt in range(retries):
        try:
            return action()
        except duckdb.IOException as exc:
            if not is_lock_error(exc) or attempt == retries - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


def connect_for_writing(path: Path, retries: int = LOCK_RETRIES) -> duckdb.DuckDBPyConnection:
    """A short-lived writing connection with the schema in place."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def connect() -> duckdb.DuckDBPyConnection:
        connection = duckdb.connect(str(path))
        connection.execute(SCHEMA)
        return connection

    return retry_on_lock(connect, retries)


def ensure_database(path: Path) -> None:
    """Create the file with its schema, so that read-only queries work before any classify run."""
    if not path.exists():
        connect_for_writing(path).close()
