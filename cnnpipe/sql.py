"""One read-only SQL statement against the predictions database, on a hardened connection.

The statement is untrusted input: DuckDB's parser must find exactly one SELECT; the
connection is read-only, cannot reach files, the network or extensions, cannot change
its own settings, is capped in memory and threads, and is interrupted after a time limit.
The file is opened for the query alone, so a classify run waiting to commit is held up
for no longer than one query.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb

from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions import connect, ensure_database

HARDENED = {
    "enable_external_access": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "lock_configuration": True,
}


@dataclass(frozen=True)
class QueryLimits:
    timeout_seconds: float = 30.0
    memory_limit: str = "1GB"
    threads: int = 2
    max_rows: int = 1000


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple]
    truncated: bool


def check_statement(sql: str) -> None:
    """Exactly one SELECT, as DuckDB's own parser reads it."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise CnnpipeError(f"SQL does not parse: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise CnnpipeError(f"give exactly one statement, not {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise CnnpipeError(f"only SELECT queries are allowed, not {kind.name}")


def run_query(sql: str, database: Path, limits: QueryLimits = QueryLimits(), cap_rows: bool = True) -> QueryResult:
    check_statement(sql)
    ensure_database(database)
    config = {**HARDENED, "memory_limit": limits.memory_limit, "threads": limits.threads}
    try:
        connection = connect(database, read_only=True, config=config)
    except duckdb.Error as exc:
        raise CnnpipeError(f"{database}: cannot open for reading ({str(exc).splitlines()[0]})") from None
    timer = threading.Timer(limits.timeout_seconds, connection.interrupt)
    timer.start()
    try:
        cursor = connection.execute(sql)
        columns = [column[0] for column in cursor.description]
        rows = cursor.fetchmany(limits.max_rows + 1) if cap_rows else cursor.fetchall()
    except duckdb.InterruptException:
        raise CnnpipeError(f"query stopped after the {limits.timeout_seconds:g} s time limit") from None
    except duckdb.Error as exc:
        raise CnnpipeError(f"query refused or failed: {str(exc).splitlines()[0]}") from None
    finally:
        timer.cancel()
        connection.close()
    truncated = cap_rows and len(rows) > limits.max_rows
    return QueryResult(columns, rows[: limits.max_rows] if truncated else rows, truncated)
