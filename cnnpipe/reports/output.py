"""Query results to the terminal or a file: a table, CSV, JSON or Parquet.

A file is written beside its target under a temporary name and moved over it once complete,
so that a failed write leaves the target as it was. It is never written inside
$CNNPIPE_HOME: `--output $CNNPIPE_HOME/predictions.duckdb` once replaced the predictions
database, promotions and all, with a six-byte CSV.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions.sql import QueryResult
from cnnpipe.settings import get_settings


def write_rows(columns: list[str], rows: list[tuple], output_format: str) -> None:
    """A listing (`models`, `datasets`) to stdout as a table, CSV or JSON."""
    write_result(QueryResult(columns, rows, truncated=False), output_format, None, count_rows=False)


def write_result(result: QueryResult, output_format: str, output: str | None, count_rows: bool = True,
                 force: bool = False) -> None:
    """To stdout, or to the file `output` (a table goes there as CSV); over an existing file only with `force`."""
    if output is None:
        if output_format == "table":
            _print_table(result, count_rows)
        else:
            _write_text(result, output_format, sys.stdout)
        return
    with _replacing(output, force) as temporary:
        if output_format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist([dict(zip(result.columns, row)) for row in result.rows]), temporary)
        else:
            with open(temporary, "w", newline="") as handle:
                _write_text(result, output_format, handle)


def check_output(output: str, force: bool) -> Path:
    """The file `output` names, after symlinks and `..`: never inside $CNNPIPE_HOME, whose files
    are the pipeline's state, and an existing file only with `force`."""
    home, target = get_settings().home.resolve(), Path(output).resolve()
    named = output if target == Path(output).absolute() else f"{output} (that is, {target})"
    if target.is_relative_to(home):
        raise CnnpipeError(f"{named}: will not write inside CNNPIPE_HOME ({home}), which holds the pipeline's "
                           "state; write the result elsewhere")
    if target.exists() and not force:
        raise CnnpipeError(f"{named}: already exists; pass --force to replace it")
    return target


@contextmanager
def _replacing(output: str, force: bool) -> Iterator[Path]:
    """A new file beside `output` to write, moved over `output` once written."""
    target = check_output(output, force)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    temporary.touch(exist_ok=False)  # as a plain create would, with the umask's permissions
    try:
        yield temporary
        if force:
            os.replace(temporary, target)
            return
        try:
            os.link(temporary, target)  # unlike a rename, fails if the target appeared meanwhile
        except FileExistsError:
            raise CnnpipeError(f"{output}: already exists; pass --force to replace it") from None
        except OSError:  # a filesystem without hard links
            check_output(output, force)
            os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _write_text(result: QueryResult, output_format: str, handle) -> None:
    if output_format == "json":
        json.dump([dict(zip(result.columns, row)) for row in result.rows], handle, default=str, indent=1)
        handle.write("\n")
    else:
        writer = csv.writer(handle)
        writer.writerow(result.columns)
        writer.writerows([_csv_cell(value) for value in row] for row in result.rows)


def _csv_cell(value):
    """A list, struct or map as JSON, which a CSV reader's user can parse, not as Python's repr."""
    return json.dumps(value, default=str) if isinstance(value, (list, dict, tuple)) else value


def table_console():
    """A rich console that cuts no cell when piped: rich assumes 80 columns off a terminal,
    which turned `champion` into `champ…` for `cnnpipe models | grep champion`."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=100_000)


def _print_table(result: QueryResult, count_rows: bool = True) -> None:
    from rich.table import Table

    table = Table(*result.columns)
    for row in result.rows:
        table.add_row(*("" if value is None else str(value) for value in row))
    console = table_console()
    console.print(table)
    if not count_rows:
        return
    shown = f"{len(result.rows):,} row{'s' if len(result.rows) != 1 else ''}"
    console.print(f"{shown}, capped: raise --max-rows to see more" if result.truncated else shown)
