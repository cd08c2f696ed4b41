"""Query results to the terminal or a file: a table, CSV, JSON or Parquet."""

from __future__ import annotations

import csv
import json
import sys
from contextlib import nullcontext

from cnnpipe.sql import QueryResult


def write_result(result: QueryResult, output_format: str, output: str | None) -> None:
    if output_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([dict(zip(result.columns, row)) for row in result.rows]), output)
        return
    if output_format == "table" and output is None:
        _print_table(result)
        return
    with (open(output, "w", newline="") if output else nullcontext(sys.stdout)) as handle:
        if output_format == "json":
            json.dump([dict(zip(result.columns, row)) for row in result.rows], handle, default=str, indent=1)
            handle.write("\n")
        else:
            writer = csv.writer(handle)
            writer.writerow(result.columns)
            writer.writerows(result.rows)


def _print_table(result: QueryResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*result.columns)
    for row in result.rows:
        table.add_row(*("" if value is None else str(value) for value in row))
    console = Console()
    console.print(table)
    shown = f"{len(result.rows):,} row{'s' if len(result.rows) != 1 else ''}"
    console.print(f"{shown}, capped: raise --max-rows to see more" if result.truncated else shown)
