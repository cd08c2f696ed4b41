"""One read-only SQL statement against the predictions database, in a bounded child process.

The statement is untrusted input. DuckDB's parser must find exactly one SELECT, and every
relation it reads must be on an allowlist: the database's own tables and views, the
query's CTEs where they are in scope, row generators, and the catalogue functions that describe tables and
columns. File readers, `query()`, `duckdb_settings()`, `duckdb_databases()`, `SHOW
DATABASES` and every `pragma_*` function are refused before anything runs, and so is
`current_setting()`: settings and the database list hold paths. The connection is
read-only besides, cannot reach files, the network or extensions, and cannot change its
own settings.

DuckDB's `memory_limit` does not cover every allocation (a string built by `repeat()`
grows past it), so the query runs in a forked child whose address space is capped
(RLIMIT_AS), and which is killed at the time limit wherever it is. Forking costs tens of
milliseconds where a fresh interpreter would cost most of a second. The file is opened by
the child for the query alone, so a classify run waiting to commit is held up for no
longer than one query; while a classify run commits, the child waits its turn within the
time limit, as writers do.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import select
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import duckdb

from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions.database import LOCK_BACKOFF_SECONDS, connect, ensure_database, is_lock_error

HARDENED = {
    "enable_external_access": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "lock_configuration": True,
}
# Relations beyond the database's own that a query may read: they disclose nothing of the host.
# similar_images is the database's own table macro over its embeddings table.
ALLOWED_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "duckdb_tables", "duckdb_views",
                                     "duckdb_columns", "duckdb_types", "duckdb_functions", "duckdb_keywords",
                                     "similar_images"})
ALLOWED_INFORMATION_SCHEMA = frozenset({"tables", "columns"})
ALLOWED_SHOWS = frozenset({"tables", "__show_tables_expanded"})  # SHOW TABLES, SHOW ALL TABLES
# Settings include the temporary directory and home paths.
REFUSED_FUNCTIONS = frozenset({"current_setting"})
# Readers poll more often than writers back off: a commit holds the file for well under a second.
READ_BACKOFF_CAP_SECONDS = 0.25
# The child gives up waiting for the file this long before the time limit, to say why.
READ_WAIT_MARGIN_SECONDS = 0.2
# A fork copies every lock as it stands; one held by a thread busy in DuckDB would never be
# released in the child, so this process's own DuckDB calls and forks take turns.
_FORKING = threading.Lock()


@dataclass(frozen=True)
class QueryLimits:
    timeout_seconds: float = 30.0
    memory_mb: int = 1024
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


def check_relations(connection: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Every table, view, table function and SHOW the statement names is on the allowlist."""
    tree = json.loads(connection.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    if tree.get("error"):
        raise CnnpipeError(f"query refused: it cannot be checked ({tree.get('error_message')})")
    own = frozenset(name.lower() for (name,) in connection.execute(
        "SELECT table_name FROM duckdb_tables() WHERE NOT temporary "
        "UNION ALL SELECT view_name FROM duckdb_views() WHERE NOT internal AND NOT temporary").fetchall())
    database = connection.execute("SELECT current_database()").fetchone()[0].lower()
    refused = _Allowlist(own, database).first_refused(tree.get("statements"), frozenset())
    if refused:
        raise CnnpipeError(f"query refused: it may not read {refused}; it may read the tables and views "
                           "of the predictions database, range(), unnest(), similar_images() and the table and "
                           "column catalogue")


@dataclass(frozen=True)
class _Allowlist:
    own: frozenset[str]
    database: str

    def first_refused(self, tree, ctes: frozenset[str]) -> str | None:
        """The first thing `tree` reads off the allowlist, or None. `ctes` are the CTE names in
        scope, scoped as DuckDB's binder scopes them: a name outside its CTE's scope is the
        system view of that name, so one CTE named `pg_settings` must not clear them all."""
        if isinstance(tree, list):
            return next(filter(None, (self.first_refused(item, ctes) for item in tree)), None)
        if not isinstance(tree, dict):
            return None
        if "cte_map" in tree:
            return self._first_refused_in_query(tree, ctes)
        return self._refused(tree, ctes) or self.first_refused(list(tree.values()), ctes)

    def _first_refused_in_query(self, node: dict, ctes: frozenset[str]) -> str | None:
        """A query node's CTEs are seen in the node and the subqueries within it; each sees those
        defined before it in the same WITH, not itself nor later ones (DuckDB binds those names
        to tables, system views included), and a recursive CTE sees itself in its recursive term."""
        for entry in (node["cte_map"] or {}).get("map") or []:
            refused = self.first_refused(entry.get("value"), ctes)
            if refused:
                return refused
            ctes |= {str(entry.get("key")).lower()}
        rest = {key: value for key, value in node.items() if key != "cte_map"}
        if node.get("type") == "RECURSIVE_CTE_NODE":
            refused = self.first_refused(rest.pop("right", None), ctes | {str(node.get("cte_name")).lower()})
            if refused:
                return refused
        return self.first_refused(list(rest.values()), ctes)

    def _refused(self, node: dict, ctes: frozenset[str]) -> str | None:
        """What `node` itself reads that the allowlist does not name, or None."""
        kind = node.get("type")
        if kind == "TABLE_FUNCTION":
            name = node["function"].get("function_name", "").lower()
            return None if name in ALLOWED_TABLE_FUNCTIONS else f"{name}()"
        if kind == "BASE_TABLE":
            catalog, schema = node.get("catalog_name", "").lower(), node.get("schema_name", "").lower()
            name = node.get("table_name", "").lower()
            if catalog in ("", self.database) and schema in ("", "main") and \
                    (name in self.own or name in ALLOWED_TABLE_FUNCTIONS):
                return None
            if not catalog and not schema and name in ctes:
                return None
            if schema == "information_schema" and name in ALLOWED_INFORMATION_SCHEMA:
                return None
            return ".".join(part for part in (catalog, schema, name) if part)
        if kind == "SHOW_REF":
            name = node.get("table_name", "").strip('"').lower()
            return None if not name or name in self.own or name in ALLOWED_SHOWS else f"SHOW {name}"
        if node.get("class") == "FUNCTION" and node.get("function_name", "").lower() in REFUSED_FUNCTIONS:
            return f"{node['function_name']}()"
        return None


def run_query(sql: str, database: Path, limits: QueryLimits = QueryLimits(), cap_rows: bool = True) -> QueryResult:
    with _FORKING:
        check_statement(sql)
        ensure_database(database)
        read_end, write_end = os.pipe()
        deadline = time.monotonic() + limits.timeout_seconds
        child = os.fork()
    if child == 0:
        os.close(read_end)
        exit_status = 1
        try:
            _answer(sql, database, limits, cap_rows, deadline, write_end)
            exit_status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(exit_status)
    os.close(write_end)
    kind, value = _await_answer(child, read_end, limits, deadline)
    if kind == "error":
        raise CnnpipeError(value)
    return value


def _answer(sql: str, database: Path, limits: QueryLimits, cap_rows: bool, deadline: float, write_end: int) -> None:
    """In the child: run the query and write back ("result", QueryResult) or ("error", one line)."""
    try:
        try:
            answer = ("result", _query(sql, database, limits, cap_rows, deadline))
        except CnnpipeError as exc:
            answer = ("error", str(exc))
        payload = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
    except MemoryError:
        payload = pickle.dumps(("error", _over_memory(limits)))
    with open(write_end, "wb") as pipe:
        pipe.write(payload)


def _query(sql: str, database: Path, limits: QueryLimits, cap_rows: bool, deadline: float) -> QueryResult:
    connection = _open_for_reading(database, limits, deadline)
    _cap_address_space(limits.memory_mb)
    try:
        check_relations(connection, sql)
        cursor = connection.execute(sql)
        columns = [column[0] for column in cursor.description]
        rows = cursor.fetchmany(limits.max_rows + 1) if cap_rows else cursor.fetchall()
    except (duckdb.OutOfMemoryException, MemoryError):
        raise CnnpipeError(_over_memory(limits)) from None
    except duckdb.Error as exc:
        raise CnnpipeError(f"query refused or failed: {str(exc).splitlines()[0]}") from None
    finally:
        connection.close()
    truncated = cap_rows and len(rows) > limits.max_rows
    return QueryResult(columns, rows[: limits.max_rows] if truncated else rows, truncated)


def _open_for_reading(database: Path, limits: QueryLimits, deadline: float) -> duckdb.DuckDBPyConnection:
    """The hardened read-only connection, retried while a writer holds the file until shortly
    before the time limit, so that the child still answers why it gave up."""
    config = {**HARDENED, "memory_limit": f"{limits.memory_mb}MB", "threads": limits.threads}
    delay = LOCK_BACKOFF_SECONDS
    while True:
        try:
            return connect(database, read_only=True, config=config)
        except duckdb.Error as exc:
            reason = str(exc).strip().splitlines()[0]
            if not is_lock_error(exc):
                raise CnnpipeError(f"{database}: cannot open for reading ({reason})") from None
            if time.monotonic() + delay > deadline - READ_WAIT_MARGIN_SECONDS:
                raise CnnpipeError(f"{database}: another process held it for the whole {limits.timeout_seconds:g} s "
                                   f"time limit ({reason}); rerun once it lets go, or raise --timeout") from None
        time.sleep(delay)
        delay = min(delay * 2, READ_BACKOFF_CAP_SECONDS)


def _cap_address_space(memory_mb: int) -> None:
    # Counted from what the open connection has already reserved (thread stacks and malloc
    # arenas, hundreds of MB of address space that is barely touched), so that `memory_mb`
    # is what the query itself may add.
    with open("/proc/self/statm") as statm:
        reserved = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = reserved + memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _over_memory(limits: QueryLimits) -> str:
    return f"query used more than {limits.memory_mb} MB and was stopped: select fewer rows or smaller values"


def _await_answer(child: int, read_end: int, limits: QueryLimits, deadline: float) -> tuple[str, object]:
    """The child's answer; the child is killed at the `deadline`, or if this process is interrupted."""
    answer, at_end = bytearray(), False
    try:
        with open(read_end, "rb", buffering=0) as pipe:
            while chunk := _read_before(pipe, deadline):
                answer += chunk
            at_end = chunk == b""
    finally:
        if not at_end:
            os.kill(child, signal.SIGKILL)
        _, status = os.waitpid(child, 0)
    if not at_end:
        raise CnnpipeError(f"query stopped after the {limits.timeout_seconds:g} s time limit")
    if not answer:
        # Without an answer the child was ended by a signal or a failure it printed: at the
        # address-space cap that is an allocation that could not be reported (std::bad_alloc).
        how = f"signal {signal.Signals(-os.waitstatus_to_exitcode(status)).name}" if os.WIFSIGNALED(status) \
            else f"exit status {os.waitstatus_to_exitcode(status)}"
        raise CnnpipeError(f"the query's process ended with {how} and no answer, most likely past the "
                           f"{limits.memory_mb} MB memory limit")
    return pickle.loads(answer)


def _read_before(pipe, deadline: float) -> bytes | None:
    """The next bytes of `pipe` (b"" at its end), or None when `deadline` passes first."""
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([pipe], [], [], left)[0]:
        return None
    return pipe.read(1 << 20)
