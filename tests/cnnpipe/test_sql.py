from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli
from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions.database import connect_for_writing, ensure_database
from cnnpipe.predictions.records import add_predictions, set_champion
from cnnpipe.predictions.sql import QueryLimits, check_relations, run_query
from cnnpipe.settings import get_settings


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


def test_csv_writes_lists_and_structs_as_json(database):
    import csv as csv_module

    result = sql("SELECT [1, 2] AS ids, {'label': 'cat', 'probability': 0.5::DOUBLE} AS top, 'x' AS plain", "--format", "csv")
    [row] = list(csv_module.DictReader(io.StringIO(result.output)))
    assert json.loads(row["ids"]) == [1, 2] and json.loads(row["top"]) == {"label": "cat", "probability": 0.5}
    assert row["plain"] == "x"


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

    from cnnpipe.predictions.database import rebuild_latest

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



# System relations that disclose paths or settings, and the forms that name them.
DISCLOSING_RELATIONS = ["pg_settings", "duckdb_settings", "duckdb_databases", "pragma_database_list", "pg_database",
                        "duckdb_logs"]
QUALIFIED = ["main.{}", "system.main.{}", "memory.main.{}", "temp.main.{}", "predictions.main.{}", '"pg_catalog".{}',
             "system.pg_catalog.{}", "information_schema.{}"]
# Each names the relation where a CTE of the same name is out of scope, so DuckDB reads the system view.
SHADOWED = [
    "SELECT * FROM (WITH {0} AS (SELECT 1) SELECT 1) a, {0}",
    "SELECT * FROM {0} WHERE EXISTS (WITH {0} AS (SELECT 1) SELECT 1)",
    "(WITH {0} AS (SELECT 1) SELECT 1) UNION ALL SELECT count(*) FROM {0}",
    "WITH {0} AS (SELECT * FROM {0}) SELECT * FROM {0}",
    "WITH a AS (SELECT * FROM {0}), {0} AS (SELECT 1) SELECT * FROM a",
    "WITH RECURSIVE {0} AS (SELECT 1 FROM {0} UNION ALL SELECT 1 FROM {0} WHERE false) SELECT * FROM {0}",
    "WITH q AS (SELECT (WITH {0} AS (SELECT 1) SELECT 1), * FROM {0}) SELECT * FROM q",
]




def test_system_relations_behind_a_cte_out_of_scope_are_refused():
    # A CTE named after a system view once made that name readable anywhere in the query:
    # the first showed DuckDB's settings (the temporary and secret directories), the second the database path.
    for statement in ["SELECT name, setting FROM (WITH pg_settings AS (SELECT 1) SELECT 1) a, pg_settings",
                      "SELECT path FROM (WITH duckdb_databases AS (SELECT 1) SELECT 1) a, duckdb_databases",
                      "WITH pg_settings AS (SELECT * FROM pg_settings) SELECT * FROM pg_settings",
                      "SELECT * FROM system.main.duckdb_databases"]:
        result = sql(statement, "--format", "csv")
        assert result.exit_code == 1 and result.output.startswith("Error: query refused: it may not read "), statement
        assert result.output.count("\n") == 1 and str(get_settings().predictions_db) not in result.output


def test_every_disclosing_relation_is_refused_in_every_form():
    # The whole matrix on one connection: through the CLI it would cost a process per statement.
    path = get_settings().predictions_db
    ensure_database(path)
    statements = [form.format(name) for name in DISCLOSING_RELATIONS
                  for form in SHADOWED + [f"SELECT * FROM {qualified}" for qualified in QUALIFIED]]
    with duckdb.connect(str(path), read_only=True) as connection:
        allowed = [statement for statement in statements if not refuses(connection, statement)]
    assert allowed == []


def refuses(connection, statement: str) -> bool:
    try:
        check_relations(connection, statement)
    except CnnpipeError as exc:
        return str(exc).startswith("query refused: it may not read ")
    return False


def test_queries_with_ctes_in_scope_still_answer(database):
    expected = {
        "WITH a AS (SELECT 1 AS x), b AS (SELECT x + 1 AS x FROM a) SELECT * FROM b": [(2,)],
        "WITH a AS (SELECT 1 AS x) SELECT * FROM (WITH b AS (SELECT x + 1 AS x FROM a) SELECT * FROM b)": [(2,)],
        "WITH a AS (SELECT 1 AS x) SELECT (SELECT max(x) FROM a) AS m WHERE EXISTS (SELECT 1 FROM a)": [(1,)],
        "WITH a AS (SELECT 1 AS x) SELECT x FROM a UNION ALL (WITH b AS (SELECT 2 AS x) SELECT a.x + b.x FROM a, b)":
            [(1,), (3,)],
        "WITH RECURSIVE n AS (SELECT 1 AS i UNION ALL SELECT i + 1 FROM n WHERE i < 3) SELECT sum(i) FROM n": [(6,)],
        "WITH predictions AS (SELECT * FROM predictions WHERE label = 'cat') SELECT count(*) FROM predictions": [(3,)],
        "WITH v AS MATERIALIZED (SELECT label FROM latest_predictions) SELECT count(*) FROM v, v AS w": [(9,)],
    }
    assert {statement: run_query(statement, database).rows for statement in expected} == expected


# Released when the file argv[2] appears: a pipe would not do, the query's forked process holds its end too.
HOLD_WRITE_LOCK = """import os, sys, time, duckdb
connection = duckdb.connect(sys.argv[1])
print("held", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.02)
connection.close()
"""


def test_a_query_waits_for_a_writer_to_let_go(database, tmp_path):
    # A classify run commits by opening the file for writing; a poll of `cnnpipe sql` then failed
    # with "Could not set lock" instead of waiting its turn.
    release = tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(database), str(release)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        held_throughout = sql("SELECT count(*) FROM predictions", "--timeout", "0.5")
        assert held_throughout.exit_code == 1
        assert held_throughout.output.startswith(f"Error: {database}: another process held it for the whole 0.5 s")
        assert held_throughout.output.count("\n") == 1
        threading.Timer(0.5, release.touch).start()
        started = time.perf_counter()
        answered = sql("SELECT count(*) AS n FROM predictions", "--format", "csv", "--timeout", "10")
        assert answered.exit_code == 0, answered.output
        assert answered.output == "n\n5\n" and time.perf_counter() - started >= 0.4
    finally:
        holder.kill()
        holder.wait()


def test_output_never_writes_inside_the_home(database, tmp_path):
    # `--output $CNNPIPE_HOME/predictions.duckdb` replaced the database, promotions and all, with a CSV.
    home, outside = database.parent, tmp_path / "outside"
    outside.mkdir()
    (outside / "database-link").symlink_to(database)
    (outside / "home-link").symlink_to(home)
    ways_in = [database, home / "new.csv", outside / ".." / home.name / "predictions.duckdb",
               outside / "database-link", outside / "home-link" / "new.csv"]
    before, listing = checksum(database), sorted(home.rglob("*"))
    for output in ways_in:
        for force in ([], ["--force"]):
            result = sql("SELECT 1", "--format", "csv", "--output", str(output), *force)
            assert result.exit_code == 1, (output, force, result.output)
            assert result.output.startswith(f"Error: {output}") and "inside CNNPIPE_HOME" in result.output
            assert result.output.count("\n") == 1
            assert checksum(database) == before and sorted(home.rglob("*")) == listing


def test_output_replaces_an_existing_file_only_with_force(database, tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()
    target = folder / "report.csv"
    target.write_text("keep me\n")
    refused = sql("SELECT 1 AS one", "--format", "csv", "--output", str(target))
    assert refused.exit_code == 1
    assert refused.output == f"Error: {target}: already exists; pass --force to replace it\n"
    assert target.read_text() == "keep me\n"
    for output_format in ("csv", "parquet"):
        replaced = sql("SELECT 1 AS one", "--format", output_format, "--output", str(target), "--force")
        assert replaced.exit_code == 0, replaced.output
    assert pq.read_table(target).to_pylist() == [{"one": 1}]
    assert list(folder.iterdir()) == [target]  # no temporary file left beside it


def test_the_schema_upgrade_runs_once_a_release_and_again_for_a_missing_table(database):
    def views() -> set[str]:
        with duckdb.connect(str(database)) as connection:
            return {name for (name,) in connection.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal")
                    .fetchall()}

    with duckdb.connect(str(database)) as connection:
        connection.execute("DROP VIEW low_confidence")
    connect_for_writing(database).close()
    assert "low_confidence" not in views()  # the upgrade was skipped: this release's already ran
    with duckdb.connect(str(database)) as connection:
        connection.execute("DROP TABLE outliers")
    connect_for_writing(database).close()
    assert "low_confidence" in views()
    with duckdb.connect(str(database)) as connection:
        assert connection.execute("SELECT count(*) FROM outliers").fetchone() == (0,)
        connection.execute("DROP VIEW low_confidence")
        connection.execute("UPDATE cnnpipe_schema SET digest = 'an earlier release'")
    connect_for_writing(database).close()
    assert "low_confidence" in views()
    assert run_query("SELECT count(*) FROM predictions", database).rows == [(5,)]
