"""Query results to the terminal or a file: a table, CSV, JSON or Parquet."""

from __future__ import annotations

import csv
import json
import sys
from contextlib import nullcontext

from cnnpipe.sql import QueryResult


def write_rows(columns: list[str], rows: list[tuple], output_format: str) -> None:
    """A listing (`models`, `datasets`) to stdout as a table, CSV or JSON."""
    write_result(QueryResult(columns, rows, truncated=False), output_format, None, count_rows=False)


def write_result(result: QueryResult, output_format: str, output: str | None, count_rows: bool = True) -> None:
    if output_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([dict(zip(result.columns, row)) for row in result.rows]), output)
        return
    if output_format == "table" and output is None:
        _print_table(result, count_rows)
        return
    with (open(output, "w", newline="") if output else nullcontext(sys.stdout)) as handle:
        if output_format == "json":
            json.dump([dict(zip(result.columns, row)) for row in result.rows], handle, default=str, indent=1)
            handle.write("\n")
        else:
            writer = csv.writer(handle)
            writer.writerow(result.columns)
            writer.writerows(result.rows)


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
