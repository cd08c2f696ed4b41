from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli
from cnnpipe.predictions import add_predictions, connect_for_writing, set_champion
from cnnpipe.settings import get_settings
from cnnpipe.sql import QueryLimits, run_query


def add_prediction(connection, sha, version, label, confidence, day="2026-11-20", name="cnn-classifier"):
    add_predictions(connection, "SELECT ?::VARCHAR AS image_sha256, 'file:///inbox' AS source_uri, ? AS member_path, "
                    "? AS model_name, ? AS model_version, NULL AS mlflow_run_id, ? AS label, ? AS confidence, "
                    "?::STRUCT(label VARCHAR, probability DOUBLE)[] AS top5, 32 AS width, 32 AS height, "
                    "'run' AS classify_run_id, ?::TIMESTAMPTZ AS predicted_at",
                    [sha, f"{sha}.jpg", name, version, label, confidence,
                     [{"label": label, "probability": confidence}], datetime.fromisoformat(f"{day}T12:00:00+00:00")])


@pytest.fixture
def database():
    path = get_settings().predictions_db
    with connect_for_writing(path) as connection:
        add_prediction(connection, "a", "1", "cat", 0.9)
        add_prediction(connection, "a", "2", "dog", 0.4, day="2026-11-21")
        add_prediction(connection, "b", "1", "cat", 0.3)
        add_prediction(connection, "b", "2", "cat", 0.8, day="2026-11-21")
        add_prediction(connection, "c", "1", "eel", 0.95)
        set_champion(connection, "cnn-classifier", "1")
    return path


def checksum(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sql(*args):
    return CliRunner().invoke(cli, ["sql", *args])


def test_views_return_what_they_claim(database):
    rows = run_query("SELECT image_sha256, model_version, label FROM latest_predictions ORDER BY 1", database).rows
    assert rows == [("a", "1", "cat"), ("b", "1", "cat"), ("c", "1", "eel")]  # the champion, version 1
    with connect_for_writing(database) as connection:
        set_champion(connection, "cnn-classifier", None)
    rows = run_query("SELECT image_sha256, model_version FROM latest_predictions ORDER BY 1", database).rows
    assert rows == [("a", "2"), ("b", "2"), ("c", "1")]  # no champion: the newest version
    counts = run_query("SELECT day::VARCHAR, model_version, label, images FROM class_counts ORDER BY ALL", database).rows
    assert counts == [("2026-11-20", "1", "cat", 2), ("2026-11-20", "1", "eel", 1),
                      ("2026-11-21", "2", "cat", 1), ("2026-11-21", "2", "dog", 1)]
    assert run_query("SELECT image_sha256 FROM low_confidence", database).rows == [("a",)]
    assert run_query("SELECT image_sha256, version_a, label_a, version_b, label_b FROM disagreements",
                     database).rows == [("a", "1", "cat", "2", "dog")]


@pytest.mark.parametrize("statement", [
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/hostname')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM '/etc/hostname'",
    "COPY predictions TO '{tmp}/x.csv'",
    "ATTACH '{tmp}/other.duckdb'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SELECT * FROM read_csv('https://example.com/x.csv')",
    "SET enable_external_access = true",
    "SET memory_limit = '100GB'",
    "SELECT 1; DROP TABLE predictions",
    "DELETE FROM predictions",
    "DROP VIEW latest_predictions",
    "INSERT INTO champions VALUES ('x', '1', now())",
    "PRAGMA database_list",
    "SELECT getenv('HOME')",
    "SELECT * FROM duckdb_settings()",
    "SELECT path FROM duckdb_databases()",
    "SELECT * FROM duckdb_settings",
    "SELECT * FROM pragma_database_list",
    "SELECT * FROM pg_catalog.pg_settings",
    "SHOW DATABASES",
    "SELECT current_setting('temp_directory')",
    "SELECT * FROM query('SELECT * FROM duckdb_databases()')",
    "WITH s AS (SELECT * FROM duckdb_settings()) SELECT * FROM s",
    "SELECT (SELECT path FROM duckdb_databases() LIMIT 1)",
])
def test_hostile_statements_are_refused_and_change_nothing(statement, database, tmp_path):
    target = tmp_path / "outside"
    target.mkdir()
    before = checksum(database)
    result = sql(statement.format(tmp=target))
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("Error: ")
    assert checksum(database) == before
    assert list(target.iterdir()) == []
    assert str(database) not in result.output


def test_the_catalogue_a_user_needs_still_answers(database):
    assert ("predictions",) in run_query("SHOW TABLES", database).rows
    assert ("label",) in [row[:1] for row in run_query("DESCRIBE latest_predictions", database).rows]
    assert run_query("SELECT count(*) FROM information_schema.columns WHERE table_name = 'predictions'",
                     database).rows[0][0] > 5
    assert run_query("SELECT view_name FROM duckdb_views() WHERE view_name = 'class_counts'", database).rows == \
        [("class_counts",)]
    assert run_query("WITH n AS (SELECT range AS i FROM range(3)) SELECT sum(i) FROM n, unnest([1])",
                     database).rows == [(3,)]


@pytest.mark.parametrize("statement", [
    "SELECT length(repeat('x', 1000000000))",
    "SELECT length(repeat('x', 1000000000) || repeat('y', 1000000000))",
])
def test_a_query_past_the_memory_limit_is_stopped_in_one_line(statement, database):
    # DuckDB's own memory_limit let the first reach 2 GB and succeed, the second 7.9 GB.
    started = time.perf_counter()
    result = sql(statement)
    assert result.exit_code == 1
    assert result.output == "Error: query used more than 1024 MB and was stopped: select fewer rows or smaller values\n"
    assert time.perf_counter() - started < 10


def test_a_query_deaf_to_interrupts_is_killed_at_the_time_limit(database):
    # lpad() never checks for an interrupt: interrupt() alone let it run for 43 s past a 30 s limit.
    started = time.perf_counter()
    result = sql("SELECT length(lpad('x', 2000000000, 'y'))", "--timeout", "2")
    assert result.exit_code == 1 and result.output == "Error: query stopped after the 2 s time limit\n"
    assert time.perf_counter() - started < 6


def test_a_cross_join_bomb_is_interrupted_at_the_time_limit(database):
    started = time.perf_counter()
    result = sql("SELECT count(*) FROM range(1000000) a, range(1000000) b", "--timeout", "1")
    assert result.exit_code == 1 and "time limit" in result.output
    assert time.perf_counter() - started < 10


def test_table_output_is_capped(database):
    capped = run_query("SELECT * FROM range(50)", database, QueryLimits(max_rows=10))
    assert len(capped.rows) == 10 and capped.truncated
    result = sql("SELECT * FROM range(50)", "--max-rows", "10")
    assert result.exit_code == 0 and "capped" in result.output


def test_csv_json_and_parquet_output(database, tmp_path):
    query = "SELECT image_sha256, label, confidence FROM predictions ORDER BY ALL"
    assert sql(query, "--format", "csv", "--output", str(tmp_path / "p.csv")).exit_code == 0
    assert (tmp_path / "p.csv").read_text().splitlines()[:2] == ["image_sha256,label,confidence", "a,cat,0.9"]
    result = sql(query, "--format", "json")
    assert json.loads(result.output)[0] == {"image_sha256": "a", "label": "cat", "confidence": 0.9}
    written = sql(query, "--format", "parquet", "--output", str(tmp_path / "p.parquet"))
    assert written.exit_code == 0 and written.output.strip() == f"5 rows written to {tmp_path / 'p.parquet'} (parquet)"
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 5
    assert "needs --output" in sql(query, "--format", "parquet").output


def test_eight_threads_query_at_once(database):
    def count(_):
        return run_query("SELECT count(*) FROM predictions", database).rows[0][0]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(count, range(16))) == [5] * 16


def test_an_empty_database_answers():
    result = run_query("SELECT count(*) FROM latest_predictions", get_settings().predictions_db)
    assert result.rows == [(0,)]


def test_latest_by_image_stays_equal_to_a_full_recomputation(cnnpipe_home):
    import random

    from cnnpipe.predictions import rebuild_latest

    rng = random.Random(5)
    path = get_settings().predictions_db
    with connect_for_writing(path) as connection:
        for step in range(60):
            if rng.random() < 0.15:
                set_champion(connection, "cnn-classifier", rng.choice([None, "1", "2", "3", "abc123"]))
                continue
            add_prediction(connection, rng.choice("abcdefgh"), rng.choice(["1", "2", "3", "abc123"]),
                           rng.choice(["cat", "dog"]), rng.random(), day=f"2026-11-{10 + step % 20:02d}")
        incremental = connection.execute("SELECT * FROM latest_by_image ORDER BY image_sha256").fetchall()
        rebuild_latest(connection)
        assert connection.execute("SELECT * FROM latest_by_image ORDER BY image_sha256").fetchall() == incremental
    assert len(incremental) == len({row[0] for row in incremental}) > 3
